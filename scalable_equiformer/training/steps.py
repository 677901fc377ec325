"""The one place where training calls the model and computes the loss.

``model_call(model, batch, cfg)`` runs the model (or a DeepSpeed engine / partitioned wrapper
around it) on a batch with forces, under the memory levers of ``cfg.memory``: the force strategy
(``memory.checkpointing``, set on the model by :func:`configure_model`) and mixed precision
(``memory.precision``). ``compute_loss(out, batch, cfg, ...)`` is :func:`.loss.loss_terms` with the
config's weights. The memory profiler imports both so it measures exactly what training runs.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..model import configure_model as _configure
from .loss import LossTerms, loss_terms


def base_model(model):
    """The Equiformer inside a DeepSpeed engine (``.module``) or a PartitionedModel (``.model``)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "model", None) if type(model).__name__ == "PartitionedModel" else None
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def configure_model(model, cfg) -> None:
    """Apply ``cfg.memory`` levers that live on the model (:func:`..model.configure_model`) to the
    Equiformer inside ``model`` (a DeepSpeed engine or partitioned wrapper, or the model itself)."""
    _configure(base_model(model), cfg)


def loss_scaler(precision: str, device):
    """A ``torch.amp.GradScaler`` for ``memory.precision=fp16`` (see ``nn/precision.py``), None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def model_call(model, batch, cfg) -> dict:
    """``{"energy": [B] eV, "forces": [N, 3] eV/Å}``; the graph is kept when ``model.training``."""
    precision = getattr(cfg.memory, "precision", "fp32")
    if precision == "fp32":
        return model(batch, compute_forces=True)
    from ..nn.precision import autocast

    with autocast(precision, batch.pos.device):
        return model(batch, compute_forces=True)


def compute_loss(out: dict, batch, cfg, scale: float = 1.0, n_molecules: Optional[float] = None,
                 n_atoms: Optional[float] = None) -> torch.Tensor:
    """The scalar training loss (see :mod:`.loss`)."""
    return loss_parts(out, batch, cfg, scale, n_molecules, n_atoms).loss


def loss_parts(out: dict, batch, cfg, scale: float = 1.0, n_molecules: Optional[float] = None,
               n_atoms: Optional[float] = None) -> LossTerms:
    t = cfg.train
    return loss_terms(out, batch, t.loss, t.energy_weight, t.force_weight, scale, n_molecules, n_atoms)


__all__ = ["base_model", "configure_model", "loss_scaler", "model_call", "compute_loss", "loss_parts"]
