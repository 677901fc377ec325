"""Training losses on energies (eV) and forces (eV/Å).

``train.loss`` selects the form (``w_E`` = ``train.energy_weight``, ``w_F`` = ``train.force_weight``):

* ``l2mae`` (the original Equiformer's MD17 loss): ``w_E * mean_molecules |ΔE| + w_F * mean_atoms ||ΔF||_2``
* ``mae``: ``w_E * mean |ΔE| + w_F * mean over force components |ΔF_c|``
* ``mse``: ``w_E * mean ΔE² + w_F * mean over force components ΔF_c²``

Normalisation (stated in the run log): both terms are divided by the model's energy scale ``s``
(eV; squared for ``mse``): the training split's total-energy standard deviation with
``model.energy_normalization: total_mean_std``, which makes the loss and its gradients exactly the
original's (it divides by that standard deviation too), or its force RMS with
``per_atom_mean_force_rms``. Energy and force errors share one divisor, so the ratio ``w_E : w_F``
means what it meant in the paper. Reported metrics are never normalised: meV and meV/Å.

Every term is a *sum* over this micro-batch divided by a count over the whole optimizer step
(molecules or atoms of the global batch, all ranks and micro-batches). Summing the micro-batch
losses over micro-batches and ranks therefore gives exactly the full-batch loss, whatever the
molecule sizes, and so do the gradients.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

LOSSES = ("l2mae", "mae", "mse")


class LossTerms(NamedTuple):
    loss: torch.Tensor  # scalar, normalised, differentiable
    energy: torch.Tensor  # scalar, the energy term before weighting and normalisation (detached)
    force: torch.Tensor  # scalar, the force term before weighting and normalisation (detached)


def errors(out: dict, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔE [B] eV, ΔF [N, 3] eV/Å) = prediction - reference."""
    e_pred = out["energy"].reshape(-1)
    de = e_pred - batch.energy.reshape(-1).to(e_pred.dtype)
    f_pred = out["forces"]
    df = f_pred - batch.forces.to(f_pred.dtype)
    return de, df


def loss_terms(
    out: dict,
    batch,
    kind: str,
    energy_weight: float,
    force_weight: float,
    scale: float = 1.0,
    n_molecules: Optional[float] = None,
    n_atoms: Optional[float] = None,
) -> LossTerms:
    """The loss of ``batch`` as a share of a step with ``n_molecules`` and ``n_atoms`` in total
    (default: this batch's own counts, i.e. the batch mean)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    de, df = errors(out, batch)
    n_mol = float(n_molecules if n_molecules is not None else de.numel())
    n_at = float(n_atoms if n_atoms is not None else df.shape[0])
    if kind == "l2mae":
        e_term = de.abs().sum() / n_mol
        f_term = torch.linalg.vector_norm(df, dim=-1).sum() / n_at
        div = scale
    elif kind == "mae":
        e_term = de.abs().sum() / n_mol
        f_term = df.abs().sum() / (3.0 * n_at)
        div = scale
    else:
        e_term = de.pow(2).sum() / n_mol
        f_term = df.pow(2).sum() / (3.0 * n_at)
        div = scale * scale
    loss = (energy_weight * e_term.to(torch.float64) + force_weight * f_term.to(torch.float64)) / div
    return LossTerms(loss, e_term.detach(), f_term.detach())


__all__ = ["LOSSES", "LossTerms", "errors", "loss_terms"]
