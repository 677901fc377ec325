"""Checkpoints: plain ``torch.save`` dicts of tensors, numbers, strings, lists and dicts only.

They load with ``torch.load(path, weights_only=True)``. Written atomically: a temporary file in the
same folder, flushed and fsynced, then ``os.replace`` — a crash never leaves half a ``last.pt``.

Layout (``FORMAT`` = 1)::

    format, kind ("scalable_equiformer"), config (Config.to_dict()), stats (DatasetStatistics.to_dict()),
    model (state dict, consolidated: full tensors even under ZeRO-3), ema (or None),
    optimizer (plain torch engine; None under DeepSpeed, whose state lives in deepspeed/<tag>),
    deepspeed_tag (str or None), trainer (epoch, step, best, elapsed, ...), rng (tensors),
    metrics (the epoch's validation metrics), versions
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError

FORMAT = 1
KIND = "scalable_equiformer"
REPO_ROOT = Path(__file__).resolve().parents[2]


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": FORMAT, "kind": KIND, **payload}
    atomic_write_bytes(Path(path), lambda fh: torch.save(payload, fh))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError (one line) otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, Exception) as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {msg[:160]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a scalable_equiformer checkpoint")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt.get('format')} is not {FORMAT}")
    return ckpt


def check_same_model(saved: dict, current: dict, path) -> None:
    """CheckpointError naming the first model keys that differ between two config dicts."""
    a, b = saved.get("model", {}), current.get("model", {})
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"model.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}" for k in diff[:3])
        raise CheckpointError(f"{path}: checkpoint from a different model config ({shown}"
                              + (f", and {len(diff) - 3} more" if len(diff) > 3 else "") + ")")


def _derived(key: str) -> bool:
    """State-dict entries that are derived constants, not weights (e3nn's compiled tensor-product
    code registers its constants lazily, after the first forward)."""
    return "_compiled_main" in key or "._tensor_constant" in key


def clean_state(state: dict) -> dict:
    """A model state dict without derived constants, detached copies."""
    return {k: v.detach().clone() for k, v in state.items() if not _derived(k)}


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """``load_state_dict`` with a one-line CheckpointError on missing/unexpected/mis-shaped keys."""
    state = {k: v for k, v in state.items() if not _derived(k)}
    own = {k: v for k, v in model.state_dict().items() if not _derived(k)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if shapes:
            k = shapes[0]
            parts.append(f"shape of {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise CheckpointError(f"{path}: weights do not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=False)


def read_init_checkpoint(cfg) -> dict:
    """The checkpoint of ``train.init_from`` (a run's ``best.pt``/``last.pt``, or one written by
    ``tools/import_original.py``), checked against the run's model config: every ``model.*`` key
    but ``dtype`` must match (the weights are cast to the run's dtype)."""
    path = resolve_model_checkpoint(cfg.train.init_from)
    ckpt = load_checkpoint(path)
    saved = {k: v for k, v in ckpt["config"].get("model", {}).items() if k != "dtype"}
    current = {k: v for k, v in cfg.to_dict()["model"].items() if k != "dtype"}
    if "energy_normalization" not in saved:  # written before the key existed
        saved["energy_normalization"] = "per_atom_mean_force_rms"
    check_same_model({"model": saved}, {"model": current}, path)
    if ckpt.get("stats") is None and cfg.train.init_statistics == "checkpoint":
        raise CheckpointError(f"{path}: holds no statistics; use train.init_statistics=training_split")
    return ckpt


def resolve_model_checkpoint(path) -> Path:
    """The checkpoint file a user means: the file itself, or a run folder's ``best.pt``."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise CheckpointError(f"{path / 'best.pt'}: checkpoint not found (a run folder's best.pt; "
                                  "pass last.pt explicitly for the latest weights)")
        path = path / "best.pt"
    return path


def load_model(path, device=None, dtype=None, ema: bool = True, configure: bool = True):
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
        configure: apply the model-side ``memory.*`` levers of the stored config (force
            strategy; same numbers either way).

    Returns:
        model (eval mode, on ``device``), the run's :class:`~scalable_equiformer.config.Config`,
        and ``info``: ``{"path": the file read, "stats": DatasetStatistics or None, "epoch",
        "step", "metrics", "weights": "ema" | "live"}``.
    """
    from .. import runtime
    from ..config import config_from_dict
    from ..data.statistics import DatasetStatistics
    from ..errors import UserError
    from ..model import build_model

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
    if configure:
        from .steps import configure_model

        configure_model(model, config)
    load_model_state(model, state, path)
    if dtype is not None:
        want = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
        if want not in (torch.float32, torch.float64):
            raise UserError(f"dtype must be float32 or float64, not {dtype}")
        model = model.to(want)
    model = model.to(torch.device(device) if device is not None else "cpu").eval()
    info = {"path": path, "stats": stats, "epoch": ckpt.get("epoch"), "step": ckpt.get("step"),
            "metrics": ckpt.get("metrics"), "weights": weights}
    return model, config, info


def rng_state() -> dict:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: Optional[dict]) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def git_hash() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("torch", "e3nn", "deepspeed", "torch_geometric", "numpy", "scalable_equiformer"):
        try:
            out[pkg] = md.version(pkg.replace("_", "-")) if pkg != "torch_geometric" else md.version("torch_geometric")
        except md.PackageNotFoundError:
            try:
                out[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["git"] = git_hash()
    out["platform"] = platform.platform()
    return out


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False) + "\n")


__all__ = [
    "FORMAT", "atomic_write_bytes", "atomic_write_text", "save_checkpoint", "load_checkpoint", "load_model",
    "resolve_model_checkpoint", "read_init_checkpoint",
    "check_same_model", "load_model_state", "clean_state", "rng_state", "set_rng_state", "versions", "git_hash", "write_json",
]
