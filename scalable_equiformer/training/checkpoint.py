"""Checkpoints of a training run: written here (:func:`save_checkpoint`, atomically, with CRC-32s),
resumed and used to start a run (:func:`read_init_checkpoint`).

The file format, reading (CRC check, ``weights_only``), the atomic writes and the weight loading
live in :mod:`scalable_equiformer.checkpoint_io` (below ``training/``, so that inference reads
checkpoints without the trainer); loading a trained model for inference is
:func:`scalable_equiformer.inference.load_model`. The names of ``checkpoint_io`` that the trainer
uses are imported here.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint_io import (  # noqa: F401  (the trainer reaches them as checkpoint.<name>)
    FORMAT,
    KIND,
    WriteError,
    atomic_write_bytes,
    atomic_write_text,
    check_atomic_numbers,
    clean_state,
    element_label,
    element_list,
    load_checkpoint,
    load_model_state,
    non_finite_tensor,
    normalise_elements,
    os_reason,
    resolve_model_checkpoint,
    write_json,
    zip_problem,
)
from ..errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[2]


class CheckpointWriteError(CheckpointError):
    """:class:`WriteError` of a checkpoint (same attributes)."""

    def __init__(self, err: WriteError):
        self.path, self.reason, self.intact = err.path, err.reason, err.intact
        state = (f"the previous {self.path.name} is intact" if self.intact
                 else f"no earlier {self.path.name} exists")
        CheckpointError.__init__(self, f"{self.path}: cannot write the checkpoint ({self.reason}); {state}")


def _save_crc32_on():
    """torch's switch for CRC-32s in saved archives (on by default; forced on while we save)."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch: always computes them
        return None
    return config.save


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` (plus ``format`` and ``kind``) atomically to ``path``.

    ``payload["elements"]`` (the training split's atomic numbers), when given, is stored sorted and
    unique. A failed write raises :class:`CheckpointWriteError` (one line: the file, the reason,
    whether the previous file is intact)."""
    path = Path(path)
    payload = {"format": FORMAT, "kind": KIND, **payload}
    if "elements" in payload:
        payload["elements"] = normalise_elements(payload["elements"])
    switch = _save_crc32_on()
    before = switch.compute_crc32 if switch is not None else None
    try:
        if switch is not None:
            switch.compute_crc32 = True
        atomic_write_bytes(path, lambda fh: torch.save(payload, fh))
    except WriteError as exc:
        raise CheckpointWriteError(exc) from None
    finally:
        if switch is not None:
            switch.compute_crc32 = before


#: model keys that do not change the model's function or parameters (resume / init_from may change them)
_SAME_MODEL_WHATEVER = ("tensor_product",)


def check_same_model(saved: dict, current: dict, path) -> None:
    """CheckpointError naming the first model keys that differ between two config dicts
    (``model.tensor_product`` aside: it is how the same function is computed, with the same weights)."""
    a, b = saved.get("model", {}), current.get("model", {})
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in _SAME_MODEL_WHATEVER]
    if diff:
        shown = ", ".join(f"model.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}" for k in diff[:3])
        raise CheckpointError(f"{path}: checkpoint from a different model config ({shown}"
                              + (f", and {len(diff) - 3} more" if len(diff) > 3 else "") + ")")


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


__all__ = [
    "FORMAT", "WriteError", "CheckpointWriteError", "zip_problem", "normalise_elements", "check_atomic_numbers",
    "element_label", "element_list", "atomic_write_bytes", "atomic_write_text", "save_checkpoint", "load_checkpoint",
    "resolve_model_checkpoint", "read_init_checkpoint",
    "check_same_model", "load_model_state", "clean_state", "rng_state", "set_rng_state", "versions", "git_hash",
    "write_json",
]
