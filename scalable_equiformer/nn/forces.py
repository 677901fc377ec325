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


def centred_positions(pos: torch.Tensor, batch_vec: torch.Tensor, num_graphs: int, dtype: torch.dtype) -> torch.Tensor:
    """``pos`` minus each molecule's mean position, formed in float64 and then cast to ``dtype``.

    The model is translation invariant, but float32 positions far from the origin (10^6 Å) keep only
    ~0.1 Å of resolution, which edge vectors ``pos[j] - pos[i]`` cannot recover: centring before
    the cast makes every molecule give the same numbers wherever it sits. The mean is a constant
    (detached): ``d(centred)/d(pos)`` is the identity, so forces are ``-dE/dpos`` exactly and a
    ``pos`` that requires grad keeps its gradient path.
    """
    p64 = pos.to(torch.float64)
    with torch.no_grad():
        count = torch.zeros(num_graphs, dtype=torch.float64, device=pos.device).index_add_(
            0, batch_vec, torch.ones(pos.shape[0], dtype=torch.float64, device=pos.device))
        mean = torch.zeros(num_graphs, 3, dtype=torch.float64, device=pos.device).index_add_(0, batch_vec, p64.detach())
        mean = mean / count.clamp(min=1.0)[:, None]
    return (p64 - mean.index_select(0, batch_vec)).to(dtype)


def prepare_inputs(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(pos in the model dtype, each molecule centred (:func:`centred_positions`), z long, batch
    vector, num_graphs) from a torch-geometric Batch. Pass ``batch.pos`` in float64 (the readers
    and the calculator do) so that a molecule far from the origin keeps its geometry."""
    z = batch.z.long()
    vec = getattr(batch, "batch", None)
    if vec is None:
        vec = torch.zeros(batch.pos.shape[0], dtype=torch.long, device=batch.pos.device)
    num_graphs = int(getattr(batch, "num_graphs", 0) or (int(vec.max()) + 1 if vec.numel() else 1))
    pos = centred_positions(batch.pos, vec, num_graphs, model.dtype)
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

