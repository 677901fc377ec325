"""Energy and forces, F = -dE/dpos, behind one strategy switch.

``energy_and_forces(model, batch, training, compute_forces=True, strategy=None)`` returns
``{"energy": [B] eV (float64), "forces": [N, 3] eV/Å (model dtype)}``.

Strategies (``strategy`` argument, else ``model.force_strategy``):
  * ``"autograd"`` — the plain path and the oracle: run the stages, then
    ``torch.autograd.grad(E.sum(), pos, create_graph=training)``. In training the graph is kept
    for ``loss.backward()``; at evaluation nothing is kept (energy and forces are detached).
  * ``"blocks"`` — the same with every block in a non-reentrant checkpoint
    (``memory.checkpointing=blocks``).
  * ``"forces"`` — force-aware block-by-block recomputation with explicit VJPs
    (``memory.checkpointing=forces``; ``nn/force_checkpoint.py``).

A new strategy goes into ``_STRATEGIES`` with the signature and result of ``_autograd``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .force_checkpoint import blockwise_forces, checkpointed_call


def prepare_inputs(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(pos in the model dtype, z long, batch vector, num_graphs) from a torch-geometric Batch."""
    pos = batch.pos.to(model.dtype)
    z = batch.z.long()
    vec = getattr(batch, "batch", None)
    if vec is None:
        vec = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    num_graphs = int(getattr(batch, "num_graphs", 0) or (int(vec.max()) + 1 if vec.numel() else 1))
    return pos, z, vec, num_graphs


def _autograd(model, pos, z, batch_vec, num_graphs, training: bool, run_block=None) -> dict[str, torch.Tensor]:
    with torch.enable_grad():
        if not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        energy = model.energy(pos, z, batch_vec, num_graphs, run_block=run_block)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=training)
    forces = -grad
    if not training:
        energy, forces = energy.detach(), forces.detach()
    return {"energy": energy, "forces": forces}


def _checkpointed_blocks(model, pos, z, batch_vec, num_graphs, training: bool) -> dict[str, torch.Tensor]:
    """The plain path with each block in a non-reentrant checkpoint."""
    return _autograd(model, pos, z, batch_vec, num_graphs, training, run_block=checkpointed_call)


_STRATEGIES: dict[str, Callable] = {"autograd": _autograd, "blocks": _checkpointed_blocks, "forces": blockwise_forces}


def energy_and_forces(model, batch, training: bool, compute_forces: bool = True, strategy: str | None = None) -> dict[str, torch.Tensor]:
    pos, z, batch_vec, num_graphs = prepare_inputs(model, batch)
    if not compute_forces:
        return {"energy": model.energy(pos, z, batch_vec, num_graphs)}
    name = strategy or getattr(model, "force_strategy", "autograd")
    if name not in _STRATEGIES:
        raise ValueError(f"unknown force strategy {name!r}; known: {sorted(_STRATEGIES)}")
    return _STRATEGIES[name](model, pos, z, batch_vec, num_graphs, training)

