"""Which frames each rank sees: global optimizer batches, data-parallel shards, micro-batches.

Per epoch the training frames are permuted with a generator seeded by ``(seed, epoch)`` (so a
resumed run sees the same order) and cut into global batches of ``train.batch_size`` frames; an
incomplete last batch is dropped, as in the original (``drop_last=True``). Global batch ``s`` is
split into ``D`` equal contiguous shards, one per data-parallel rank, and each shard into
``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` frames. Evaluation frames
are dealt round robin (``indices[rank::D]``) with no padding, so every frame counts exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # molecules per optimizer step, all ranks
    micro_batch_size: int  # molecules per forward on one rank
    dp_world: int  # data-parallel ranks
    grad_accum: int  # micro-batches per rank per step

    @classmethod
    def from_config(cls, cfg, dp_world: int) -> "BatchPlan":
        b = cfg.train.batch_size
        if b % dp_world:
            raise ConfigError(f"train.batch_size ({b}) must be a multiple of the data-parallel ranks ({dp_world})")
        per_rank = b // dp_world
        # a cap on molecules per forward (a memory bound, as the planner and the estimate read it): more
        # ranks leave fewer molecules per rank, so md22_atat.yaml's 4 on 4 ranks of batch 8 is 2, not an error
        micro = min(cfg.memory.micro_batch_size or per_rank, per_rank)
        if per_rank % micro:
            raise ConfigError(
                f"memory.micro_batch_size ({micro}) must divide the molecules per rank per step "
                f"(train.batch_size {b} / {dp_world} data-parallel ranks = {per_rank})")
        return cls(b, micro, dp_world, per_rank // micro)


class StepSampler:
    """Global batches of one epoch, and this rank's micro-batches of each."""

    def __init__(self, n_frames: int, plan: BatchPlan, seed: int, dp_rank: int):
        self.n = n_frames
        self.plan = plan
        self.seed = int(seed)
        self.dp_rank = dp_rank

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.plan.batch_size

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)

    def global_batch(self, epoch: int, step_in_epoch: int, order=None) -> np.ndarray:
        order = self.order(epoch) if order is None else order
        b = self.plan.batch_size
        return order[step_in_epoch * b:(step_in_epoch + 1) * b]

    def micro_batches(self, global_batch: np.ndarray) -> list[np.ndarray]:
        per_rank = self.plan.batch_size // self.plan.dp_world
        shard = global_batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        m = self.plan.micro_batch_size
        return [shard[i:i + m] for i in range(0, per_rank, m)]


def collate(dataset, indices, device) -> "torch_geometric.data.Batch":  # noqa: F821
    from torch_geometric.data import Batch

    return Batch.from_data_list([dataset[int(i)] for i in indices]).to(device)


def eval_shards(indices: np.ndarray, rank: int, world: int, batch_size: int) -> list[np.ndarray]:
    mine = np.asarray(indices)[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def atom_counts(dataset) -> np.ndarray:
    """Atoms per frame of ``dataset``."""
    n = len(dataset)
    num_atoms = getattr(dataset, "num_atoms", None)
    if isinstance(num_atoms, int):
        return np.full(n, num_atoms, dtype=np.int64)
    return np.array([int(dataset[i].pos.shape[0]) for i in range(n)], dtype=np.int64)


__all__ = ["BatchPlan", "StepSampler", "collate", "eval_shards", "atom_counts"]
