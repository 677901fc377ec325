"""The memory levers as one frozen value: :class:`Levers`, the only declaration of them.

A config's ``memory:`` section (and ``parallel.graph_partitions``) *is* a ``Levers`` once loaded
(``config.Config.memory``); the trainer, the profiler, the estimate and the planner take this
type, and the force runner (:mod:`.runner`) is built from it. A ``Levers`` is checked when it is
made, so every one in circulation is valid: nothing downstream re-validates it.

>>> Levers("forces", keep_blocks=2).label()
'ckpt=forces+keep=2'
>>> Levers("blocks", edge_chunk_size=100)
Traceback (most recent call last):
...
scalable_equiformer.memory.levers.LeverError: levers: memory.edge_chunk_size (100) needs memory.checkpointing=forces (under 'blocks' every chunk's graph is kept for the force loss)

``memory.checkpointing`` has one vocabulary from the YAML to the kernel: ``none`` (plain
autograd, the oracle), ``blocks`` (each block in a non-reentrant checkpoint) and ``forces``
(force-aware block-wise recomputation, :mod:`.force_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from .precision import PRECISIONS

CHECKPOINTING = ("none", "blocks", "forces")


class LeverError(ConfigError):
    """A lever value, or a combination of levers, that cannot run. ``key`` is the config key
    (``memory.keep_blocks``), ``detail`` the message without its origin (the config loader puts
    the file or ``--set`` that gave the key in front of it)."""

    def __init__(self, key: str, detail: str, origin: str = "levers"):
        super().__init__(f"{origin}: {detail}")
        self.key, self.detail = key, detail


@dataclass(frozen=True)
class Levers:
    """One key per memory lever; ``tools/memory_profile.py --levers`` uses these names."""

    checkpointing: str = "none"  # none | blocks (per-block activation checkpointing) | forces (block-wise force recomputation)
    micro_batch_size: Optional[int] = None  # at most this many molecules per forward on a rank (fewer when a rank has fewer); gradients accumulate to train.batch_size; None = whole batch
    edge_chunk_size: Optional[int] = None  # with checkpointing=forces: receiving atoms in chunks of at most this many incoming edges; None = all at once
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with loss scaling); norms, energy sums and forces stay fp32
    graph_partitions: int = field(default=1, metadata={"section": "parallel"})  # ranks that share one molecule's graph (halo exchange)
    keep_blocks: int = 0  # with checkpointing=forces: the last N blocks keep their graphs (not recomputed): faster, more memory

    def __post_init__(self):
        for key, ok, message in self._rules():
            if not ok:
                raise LeverError(key, message)

    def _rules(self):
        """``(config key, holds, message)`` of every rule, in the order they are reported."""
        ckpt, micro, chunk, keep, parts = (self.checkpointing, self.micro_batch_size, self.edge_chunk_size,
                                           self.keep_blocks, self.graph_partitions)
        yield ("memory.checkpointing", ckpt in CHECKPOINTING,
               f"memory.checkpointing: must be none, blocks or forces, not {ckpt!r}")
        yield "memory.micro_batch_size", micro is None or micro >= 1, "memory.micro_batch_size: must be >= 1 or null"
        yield "memory.edge_chunk_size", chunk is None or chunk >= 1, "memory.edge_chunk_size: must be >= 1 or null"
        yield ("memory.precision", self.precision in PRECISIONS,
               f"memory.precision: must be fp32, bf16 or fp16, not {self.precision!r}")
        yield "memory.keep_blocks", keep >= 0, "memory.keep_blocks: must be >= 0"
        yield "parallel.graph_partitions", parts >= 1, "parallel.graph_partitions: must be >= 1"
        yield ("memory.keep_blocks", not keep or ckpt == "forces",
               f"memory.keep_blocks ({keep}) needs memory.checkpointing=forces (it is the number of blocks that "
               f"force-aware checkpointing does not recompute)")
        yield ("memory.edge_chunk_size", chunk is None or ckpt == "forces",
               f"memory.edge_chunk_size ({chunk}) needs memory.checkpointing=forces (under {ckpt!r} every chunk's "
               "graph is kept for the force loss)")
        yield ("memory.edge_chunk_size", chunk is None or parts == 1,
               f"memory.edge_chunk_size ({chunk}) is single-process only, not with parallel.graph_partitions={parts}: "
               "unset it (the partitions divide the edges)")

    # -- the config's view ------------------------------------------------------------------------

    @staticmethod
    def section_of(name: str) -> str:
        """The config section of a lever: ``memory``, or ``parallel`` for ``graph_partitions``."""
        return _FIELDS[name].metadata.get("section", "memory")

    @classmethod
    def keys(cls, section: str) -> tuple[str, ...]:
        """The lever names that are keys of config section ``section``."""
        return tuple(f.name for f in dataclasses.fields(cls) if cls.section_of(f.name) == section)

    def section(self, section: str) -> dict:
        """The levers of one config section as ``{key: value}`` (``Config.to_dict`` and the profiler)."""
        return {k: getattr(self, k) for k in self.keys(section)}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Levers":
        """A copy with ``changes`` (checked like any new value)."""
        return dataclasses.replace(self, **changes)

    def overrides(self) -> list[str]:
        """``--set`` arguments that select these levers."""
        return [f"{self.section_of(k)}.{k}={'null' if v is None else v}" for k, v in self.as_dict().items()]

    def label(self) -> str:
        """Short name of a lever set (``P=4+ckpt=forces+keep=1+micro=2+bf16``; ``none`` when all are off)."""
        parts = []
        if self.graph_partitions != 1:
            parts.append(f"P={self.graph_partitions}")
        if self.checkpointing != "none":
            parts.append(f"ckpt={self.checkpointing}")
        if self.keep_blocks:
            parts.append(f"keep={self.keep_blocks}")
        if self.micro_batch_size is not None:
            parts.append(f"micro={self.micro_batch_size}")
        if self.edge_chunk_size is not None:
            parts.append(f"chunk={self.edge_chunk_size}")
        if self.precision != "fp32":
            parts.append(self.precision)
        return "+".join(parts) or "none"


_FIELDS = {f.name: f for f in dataclasses.fields(Levers)}

__all__ = ["CHECKPOINTING", "LeverError", "Levers"]
