"""Load a trained model for inference: :func:`load_model` (the ASE calculator, ``tools/evaluate.py``).

It lives beside the model (``model.py``), not in ``training/``: a checkpoint is read by
:mod:`.checkpoint_io` and the model rebuilt by ``model.build_model`` from the stored config.
"""

from __future__ import annotations

import torch

from . import runtime
from .checkpoint_io import load_checkpoint, load_model_state, resolve_model_checkpoint
from .config import config_from_dict
from .data.statistics import DatasetStatistics
from .errors import CheckpointError, UserError
from .model import build_model


def load_model(path, device=None, dtype=None, ema: bool = True):
    """The trained model of a checkpoint, ready for inference: ``(model, config, info)``.

    The one loader behind ``tools/evaluate.py`` and the ASE calculator.

    Args:
        path: a checkpoint file (``best.pt`` / ``last.pt``) or a run folder (its ``best.pt``).
            Read with ``torch.load(weights_only=True)``; a missing, corrupt, truncated or foreign
            file raises a one-line :class:`CheckpointError` naming the file.
        device: where the model goes (``'cpu'``, ``'cuda:0'``, a ``torch.device``; None = CPU).
        dtype: None = the precision it was trained in (``model.dtype``); ``'float64'`` /
            ``torch.float64`` (or float32) casts it.
        ema: the weights the run evaluated: the EMA weights when training kept an EMA
            (``train.ema_decay``; the trainer stores them as ``model`` in both ``best.pt`` and
            ``last.pt``), else the live weights. ``ema=False`` asks for the live weights: those of
            ``last.pt`` (``live_model``); ``best.pt`` of an EMA run holds only the EMA weights
            (CheckpointError).

    Returns:
        model (eval mode, on ``device``), the run's :class:`~scalable_equiformer.config.Config`,
        and ``info``: ``{"path": the file read, "stats": DatasetStatistics or None, "epoch",
        "step", "metrics", "weights": "ema" | "live", "elements": the training split's atomic
        numbers (sorted list), or None for a checkpoint that predates them}``.
    """
    path = resolve_model_checkpoint(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        config = config_from_dict(ckpt["config"], origin=f"{path} (stored config)")
        stats = DatasetStatistics.from_dict(ckpt["stats"]) if ckpt.get("stats") is not None else None
    except UserError as exc:
        raise CheckpointError(f"{path}: stored config or statistics unusable: {exc}") from None
    has_ema = config.train.ema_decay is not None
    if ema or not has_ema:
        state, weights = ckpt["model"], ("ema" if has_ema else "live")
    elif ckpt.get("live_model") is not None:
        state, weights = ckpt["live_model"], "live"
    else:
        raise CheckpointError(f"{path}: holds only the EMA weights (train.ema_decay={config.train.ema_decay}); "
                              "the live weights are in the run's last.pt")
    try:
        with runtime.default_dtype(config.model.dtype):
            model = build_model(config, stats)
    except UserError as exc:
        raise CheckpointError(f"{path}: stored model config does not build: {exc}") from None
    load_model_state(model, state, path)
    if dtype is not None:
        model = model.to(runtime.parse_dtype(dtype))
    model = model.to(torch.device(device) if device is not None else "cpu").eval()
    info = {"path": path, "stats": stats, "epoch": ckpt.get("epoch"), "step": ckpt.get("step"),
            "metrics": ckpt.get("metrics"), "weights": weights, "elements": ckpt.get("elements")}
    return model, config, info


__all__ = ["load_model"]
