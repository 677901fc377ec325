"""The one place where training calls the model, computes the loss and takes an optimizer step.

``model_call(model, batch, cfg)`` runs the model (or a DeepSpeed engine / partitioned wrapper
around it) on a batch with forces, under mixed precision (``memory.precision``); the other levers
are the wrapper's (a ``memory.LeveredModel`` or ``PartitionedModel`` holding a
``memory.ForceRunner``). ``compute_loss(out, batch, cfg, ...)`` is :func:`.loss.loss_terms` with
the config's weights.

:func:`optimizer_step` is the whole optimizer step over one rank's micro-batches: forward with
forces, loss share, backward (loss scaling is the engine's), the engine's hook between
micro-batches, the check that the loss is finite on every rank, then the engine's update
(gradient reduction, clipping, AdamW). The trainer (``Trainer._train_step``) and the memory
profiler (``profiling/measured_step.py``) both call it, so the profiler measures the trainer's
own step.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .. import runtime
from ..errors import ConfigError, TrainingError
from ..memory.runner import LeveredModel
from ..parallel.partitioned import PartitionedModel
from .loss import LossTerms, loss_terms


def base_model(model):
    """The Equiformer inside a DeepSpeed engine or DDP (``.module``) or a :class:`PartitionedModel` /
    :class:`~..memory.LeveredModel` (``.model``)."""
    while True:
        inner = model.model if isinstance(model, (PartitionedModel, LeveredModel)) else getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def loss_scaler(precision: str, device):
    """A ``torch.amp.GradScaler`` for ``memory.precision=fp16`` (see ``nn/precision.py``), None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def model_call(model, batch, cfg) -> dict:
    """``{"energy": [B] eV, "forces": [N, 3] eV/Å}``; the graph is kept when ``model.training``.

    With ``train.compile: true`` a training call (``model.training``) runs the compiled
    energy-and-forces function of :mod:`.compiled` instead of the eager model; evaluation stays eager.
    """
    precision = cfg.memory.precision
    if getattr(cfg.train, "compile", False) and model.training:
        if base_model(model) is not model:
            raise ConfigError(f"train.compile=true runs on the plain model only, not inside {type(model).__name__} "
                              "(DeepSpeed or graph partitions): set train.compile=false")
        from .compiled import compiled_energy_and_forces

        return compiled_energy_and_forces(model, batch)
    if precision == "fp32":
        return model(batch, compute_forces=True)
    from ..memory.precision import autocast

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


class NonFiniteLoss(TrainingError):
    """The training loss of a step was not finite on some rank; the step was refused (no update)."""


def optimizer_step(engine, micro_batches: Sequence, cfg, lr: float, *, n_molecules: float, n_atoms: float,
                   loss_scale: float = 1.0, load: Optional[Callable] = None,
                   info: Optional[runtime.DistInfo] = None, device=None) -> float:
    """One optimizer step of ``engine`` (``training/engine.py``) over this rank's ``micro_batches``.

    Each micro-batch (``load(item)`` when ``load`` is given: batches are then made one at a
    time) runs ``engine.micro_step`` and its share of the loss (sums over the micro-batch divided
    by ``n_molecules`` / ``n_atoms`` of the global batch, and by ``loss_scale``, see :mod:`.loss`),
    then ``engine.backward`` inside ``engine.micro_context()``; ``engine.after_micro()`` runs
    *between* micro-batches (not after the last one: the update is ``engine.step``). The losses
    are summed over the ranks of ``info`` (all ranks call this together); a non-finite loss on any
    rank raises :class:`NonFiniteLoss` before any update. Returns the step's training loss: the
    sum over micro-batches and ranks, divided by ``parallel.graph_partitions`` (the ranks of a
    partition group share one molecule's loss).
    """
    local = 0.0
    last = len(micro_batches) - 1
    for i, item in enumerate(micro_batches):
        batch = load(item) if load is not None else item
        with engine.micro_context():
            out = engine.micro_step(batch)
            terms = loss_parts(out, batch, cfg, loss_scale, n_molecules, n_atoms)
            local += float(terms.loss.detach())
            # backward even for a non-finite loss: the other ranks' backward waits on this
            # rank's gradient collectives; the step is refused below, before any update
            engine.backward(terms.loss)
        del out, terms
        if i < last:
            engine.after_micro()
    finite = math.isfinite(local)
    t = torch.tensor([local if finite else 0.0, 0.0 if finite else 1.0], dtype=torch.float64)
    t = runtime.sum_over_ranks(t, info if info is not None else runtime.DistInfo(), device)
    if float(t[1]) > 0 or not math.isfinite(float(t[0])):
        raise NonFiniteLoss("non-finite training loss")
    engine.step(lr)
    partitions = cfg.parallel.graph_partitions
    return float(t[0]) / (partitions if partitions > 1 else 1)


__all__ = ["NonFiniteLoss", "base_model", "loss_scaler", "model_call", "compute_loss", "loss_parts",
           "optimizer_step"]
