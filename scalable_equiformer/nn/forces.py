"""Energy and forces, F = -dE/dpos, by plain autograd: the path every memory lever is tested against.

``energy_and_forces(model, batch, training, compute_forces=True)`` returns
``{"energy": [B] eV (float64), "forces": [N, 3] eV/Å (model dtype)}``: the model's stages, then
``torch.autograd.grad(E.sum(), pos, create_graph=training)``. In training the graph is kept for
``loss.backward()``; at evaluation nothing is kept (energy and forces are detached). This is
``Equiformer.forward``. The levers that compute the same numbers with less memory (per-block
checkpointing, force-aware recomputation, edge chunks, kept blocks) are run by
``scalable_equiformer.memory.ForceRunner``; this package knows no lever (:func:`node_attr_once` is
a stage helper the runner's chains share with the graph-partitioned model).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


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


def node_attr_once(model):
    """``attr(x)``: ``model.node_attr`` of the first ``x`` it is given, that same tensor afterwards.

    The stage chains of the force-aware sweep (``memory.force_checkpoint``) call it with each block's
    input; the first is the embedding's output, from which the plain path computes the node
    attributes once (``Equiformer.energy``).
    """
    cache = []

    def attr(x):
        if not cache:
            cache.append(model.node_attr(x))
        return cache[0]

    return attr


def finish(energy: torch.Tensor, forces: torch.Tensor, training: bool) -> dict[str, torch.Tensor]:
    """The result dict; at evaluation (``training`` False) energy and forces are detached."""
    if not training:
        energy, forces = energy.detach(), forces.detach()
    return {"energy": energy, "forces": forces}


def requiring_grad(pos: torch.Tensor) -> torch.Tensor:
    """``pos`` itself when it requires grad (its gradient path is kept), else a leaf that does."""
    return pos if pos.requires_grad else pos.detach().requires_grad_(True)


def autograd_forces(energy_fn: Callable[[torch.Tensor], torch.Tensor], pos: torch.Tensor, training: bool,
                    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """``energy_fn(pos)`` [B] and ``-dE/dpos`` by ``autograd.grad`` (``create_graph=training``).

    ``reduce(grad)`` combines partial gradients (the graph-partitioned model sums its ranks' shares);
    ``None`` takes the gradient as it is."""
    with torch.enable_grad():
        pos = requiring_grad(pos)
        energy = energy_fn(pos)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=training)
        forces = -(grad if reduce is None else reduce(grad))
    return finish(energy, forces, training)


def energy_and_forces(model, batch, training: bool, compute_forces: bool = True) -> dict[str, torch.Tensor]:
    pos, z, batch_vec, num_graphs = prepare_inputs(model, batch)

    def energy_fn(p):
        return model.energy(p, z, batch_vec, num_graphs)

    if not compute_forces:
        return {"energy": energy_fn(pos)}
    return autograd_forces(energy_fn, pos, training)
