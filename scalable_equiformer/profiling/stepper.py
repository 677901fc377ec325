"""One training step as the profiler runs it: the trainer's own engine, model call and loss.

``make_step(model, cfg)`` returns ``(step, engine)``; ``step(batch) -> dict`` runs what one
optimizer step of training runs (``training/engine.py`` ``PlainEngine`` and
``training/steps.py``): the force strategy of ``memory.checkpointing`` set on the model, each
micro-batch of ``memory.micro_batch_size`` molecules through ``model_call`` (forward, forces with
``create_graph=True``, under ``memory.precision``), its share of the loss, backward, then the
optimizer step. Only data loading is left out.
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


def make_step(model, cfg, world: int = 1):
    """``world`` > 1: ``model`` is a PartitionedModel over the ``world`` ranks of the default
    group (one partition group; the engine sums the ranks' partial gradients)."""
    from ..training.batches import BatchPlan
    from ..training.engine import PlainEngine
    from ..training.steps import compute_loss, configure_model

    configure_model(model, cfg)
    engine = PlainEngine(model, cfg, BatchPlan.from_config(cfg, 1), group=None, world=world)

    def step(batch) -> dict:
        n_mol = float(batch.num_graphs)
        n_at = float(batch.pos.shape[0])
        total = 0.0
        for mb in split(batch, cfg.memory.micro_batch_size):
            out = engine.micro_step(mb)
            loss = compute_loss(out, mb, cfg, 1.0, n_mol, n_at)
            engine.backward(loss)
            engine.after_micro()
            total += float(loss.detach())
            del out, loss
        engine.step(cfg.optim.lr)
        return {"loss": total}

    return step, engine
