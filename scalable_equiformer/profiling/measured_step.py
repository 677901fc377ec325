"""What the memory profiler measures: the model (:func:`build`), a batch of molecules
(:func:`make_batch`) and the trainer's own optimizer step over it (:func:`make_step`).

``make_step(model, cfg)`` returns ``(step, engine)``; ``step(batch) -> dict`` is the trainer's
step, :func:`scalable_equiformer.training.steps.optimizer_step` with the trainer's
``PlainEngine``: the model run under the config's levers (``memory.with_levers``), each micro-batch
of ``memory.micro_batch_size`` molecules through ``model_call`` (forward, forces with
``create_graph=True``, under ``memory.precision``), its share of the loss, backward, the finite-loss
check, then the optimizer step (gradient sum over ranks, clipping, AdamW). Only data loading is
left out (the batch is made beforehand and cut into micro-batches by :func:`split`).
"""

from __future__ import annotations

import numpy as np
import torch


def build(cfg, device, num_atoms: int):
    """The model on ``device`` in the config's dtype. Null normalisation statistics (the
    training split's, irrelevant to memory) are set to this molecule's."""
    from ..model import build_model

    if cfg.model.avg_num_neighbors is None:
        cfg.model.avg_num_neighbors = 25.0
    if cfg.model.avg_num_atoms is None:
        cfg.model.avg_num_atoms = float(num_atoms)
    dtype = torch.float64 if cfg.model.dtype == "float64" else torch.float32
    model = build_model(cfg).to(device=device, dtype=dtype)
    model.train()
    return model, dtype


def make_batch(z: np.ndarray, frames: np.ndarray, dtype, device):
    """A torch_geometric Batch of ``len(frames)`` molecules (targets: zero energy and forces)."""
    from torch_geometric.data import Batch, Data

    zt = torch.as_tensor(np.asarray(z), dtype=torch.long)
    items = []
    for pos in np.asarray(frames):
        n = len(zt)
        items.append(Data(pos=torch.as_tensor(pos, dtype=dtype), z=zt.clone(),
                          energy=torch.zeros(1, dtype=dtype), forces=torch.zeros(n, 3, dtype=dtype),
                          natoms=torch.tensor([n])))
    return Batch.from_data_list(items).to(device)


def split(batch, size):
    """Micro-batches of ``size`` molecules (the whole batch when None)."""
    if size is None or size >= batch.num_graphs:
        return [batch]
    from torch_geometric.data import Batch

    data = batch.to_data_list()
    return [Batch.from_data_list(data[i:i + size]) for i in range(0, len(data), size)]


def make_step(model, cfg, world: int = 1, loss_scale: float = 1.0):
    """``world`` > 1: ``model`` is a PartitionedModel over the ``world`` ranks of the default
    group (one partition group, its runner built from ``cfg.memory``; the engine sums the ranks'
    partial gradients); else the bare model, run here under ``cfg.memory``. ``loss_scale``: the
    loss divisor (the trainer's is the model's energy scale; 1 without statistics)."""
    from .. import runtime
    from ..memory import with_levers
    from ..training.batches import BatchPlan
    from ..training.engine import PlainEngine
    from ..training.steps import optimizer_step

    if world == 1:
        model = with_levers(model, cfg.memory)
    plan = BatchPlan.from_config(cfg, 1)
    engine = PlainEngine(model, cfg, plan, group=None, world=world)
    info = runtime.current_dist_info()

    def step(batch) -> dict:
        loss = optimizer_step(engine, split(batch, plan.micro_batch_size), cfg, cfg.optim.lr,
                              n_molecules=float(batch.num_graphs), n_atoms=float(batch.pos.shape[0]),
                              loss_scale=loss_scale, info=info, device=batch.pos.device)
        return {"loss": loss}

    return step, engine
