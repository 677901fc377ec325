"""Checkpoint files, read side (and the atomic file writes): plain ``torch.save`` dicts of tensors,
numbers, strings, lists and dicts only.

They load with ``torch.load(path, weights_only=True)``; a file that holds anything else (pickled
classes, functions) is refused, not executed. Written atomically: a temporary file in the same
folder, flushed and fsynced, then ``os.replace`` — a crash or a full disk never leaves half a
``last.pt`` (the previous file stays as it was, and the error says so).

Integrity: ``torch.save`` writes a zip archive whose members carry CRC-32 checksums (computed on
save: ``training.checkpoint.save_checkpoint`` turns torch's ``compute_crc32`` on). ``torch.load`` does not check
them, so :func:`load_checkpoint` does, on every load: a file with flipped bytes is refused with one
line naming it and saying whether the other checkpoint of the run folder (``last.pt`` /
``best.pt``) is intact.

Layout (``FORMAT`` = 1; keys of the top-level dict)::

    format        1
    kind          "scalable_equiformer"
    config        Config.to_dict() of the run (a nested dict of plain values)
    stats         DatasetStatistics.to_dict(): energy_per_atom_mean (eV/atom), force_rms (eV/Å),
                  avg_num_neighbors, avg_num_atoms — of the training split
    elements      sorted list of the atomic numbers (ints) in the training split: the elements the
                  model and ``stats`` have seen. Optional: checkpoints written before it existed
                  load with ``elements = None`` (unknown: no element check)
    data          the fingerprint of the data the run trains on: path, frames, atoms, sha256 over
                  z, positions, energies, forces as read (``--resume`` on other data is refused).
                  Optional: older checkpoints have none (not checked)
    model         state dict of the weights evaluated (EMA when train.ema_decay is set, else live);
                  consolidated: full tensors even under ZeRO-3; all finite (a checkpoint whose
                  weights hold NaN or infinite values is refused on load, and never written)
    epoch, step   epochs and optimizer steps completed when it was written
    metrics       that epoch's validation metrics (dict; empty without validation)
    units         a sentence naming the units
  last.pt only (to resume):
    live_model    live weights when an EMA is kept (else None)
    ema           EMA state (or None)
    engine        optimizer and engine state (plain torch engine; DeepSpeed: in deepspeed/<tag>)
    deepspeed_tag str or None
    trainer       epoch, step, best (best validation force MAE, meV/Å), best_epoch, elapsed,
                  steps_per_epoch, world_size, engine, zero_stage
    rng           random generator states (tensors)

The trainer writes ``last.pt`` first and then, when the epoch is the best so far, ``best.pt`` with
the same ``model`` weights. A run killed between the two is repaired on ``--resume``: ``best.pt``
is re-derived from ``last.pt`` when ``trainer.best_epoch`` says this epoch was the best.

This module is below ``training/``: inference (``inference.load_model``: the calculator,
``tools/evaluate.py``) reads checkpoints through it without importing the trainer;
``training/checkpoint.py`` writes them and imports the reading side from here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import torch

from .errors import CheckpointError, UserError

FORMAT = 1
KIND = "scalable_equiformer"
#: the two checkpoints of a run folder: each names the other when it is corrupt
SIBLING = {"last.pt": "best.pt", "best.pt": "last.pt"}


class WriteError(UserError):
    """A file could not be written (disk full, permissions, ...). ``path`` the file, ``reason``
    the system's words, ``intact``: an earlier version of the file exists and was not touched."""

    def __init__(self, path: Path, reason: str, intact: bool):
        self.path, self.reason, self.intact = Path(path), reason, intact
        state = f"the previous {self.path.name} is intact" if intact else f"no earlier {self.path.name} exists"
        super().__init__(f"{self.path}: cannot write ({reason}); {state}")


class _RecordingWriter:
    """A file object that remembers the OSError of a failed write: ``torch.save`` turns it into
    a RuntimeError without the errno, which would hide a full disk."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as exc:
            self.error = exc
            raise

    def fileno(self) -> int:
        return self.fh.fileno()


def os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _open_temp(path: Path) -> tuple[int, str]:
    """A new temporary file ``.<name>.<8 random>.tmp`` next to ``path``, created with mode 0666 less
    the umask (as ``open(path, "w")`` would; ``mkstemp`` makes 0600: a group-shared run folder
    could not read its checkpoints)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT and SIGTERM that arrive within the block are delivered when it ends (to the handlers
    they had before), in the main thread: a stop never lands inside ``torch.save``, whose zip
    writer turns it into "unexpected pos" and a traceback instead of the stop it was."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in old.items():
        if handler is not None:  # None: a handler not set from Python, left alone
            signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            if handler is not None:
                signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then rename it over ``path``
    (a symbolic link at ``path`` is replaced, never written through). The file gets the mode that
    the umask gives new files.

    A failing write (a full disk, no permission) removes the temp file and raises
    :class:`WriteError`; ``path`` is then as it was before. Ctrl-C or SIGTERM during the write
    takes effect once the file is in place (:func:`_interrupts_deferred`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _open_temp(path)
    except OSError as exc:
        raise WriteError(path, os_reason(exc), path.is_file()) from None
    rec = None
    try:
        with _interrupts_deferred(), os.fdopen(fd, "wb") as fh:
            rec = _RecordingWriter(fh)
            write(rec)
            rec.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os_error = exc if isinstance(exc, OSError) else (rec.error if rec is not None else None)
        if os_error is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise WriteError(path, os_reason(os_error), path.is_file()) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False) + "\n")


def normalise_elements(elements: Optional[Iterable]) -> Optional[list[int]]:
    """Sorted unique atomic numbers as plain ints (None stays None)."""
    if elements is None:
        return None
    if torch.is_tensor(elements):
        elements = elements.reshape(-1).tolist()
    try:
        out = sorted({int(z) for z in elements})
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint elements must be atomic numbers, got {elements!r}") from None
    if any(z < 1 for z in out):
        raise CheckpointError(f"checkpoint elements must be atomic numbers >= 1, got {out}")
    return out


def zip_problem(path: Path) -> Optional[str]:
    """None when ``path`` is a zip archive whose members all match their CRC-32; else what is wrong."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        return f"not a zip archive as torch.save writes ({exc})"
    except Exception as exc:  # noqa: BLE001 - damaged headers raise all sorts (struct.error, OverflowError, ...)
        return f"damaged zip archive ({type(exc).__name__}: {exc})"
    if bad is not None:
        return f"CRC-32 mismatch in {bad}: bytes changed after it was written"
    return None


def _read(path: Path, map_location) -> dict:
    """``torch.load(weights_only=True)`` of a file whose CRCs were checked; CheckpointError otherwise."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:  # a class or function pickled into it
            m = re.search(r"GLOBAL ([\w.]+)", text)
            first = f"first: {m.group(1)}; " if m else ""
            raise CheckpointError(f"{path}: holds objects other than tensors: refused ({first}checkpoints load with "
                                  "torch.load(weights_only=True), which runs no code from the file)") from None
        msg = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {msg[:160]}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, OSError, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {msg[:160]}") from None


def non_finite_tensor(state) -> Optional[str]:
    """The name of the first floating-point tensor of ``state`` (a dict of tensors; other values are
    skipped) that holds NaN or infinite values; None when all are finite."""
    if not isinstance(state, dict):
        return None
    for k, v in state.items():
        if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            return str(k)
    return None


def _non_finite_weights(ckpt: dict) -> Optional[str]:
    """``"model tensor <name>"`` (or ``live_model``) when a checkpoint's weights are not all finite."""
    for key in ("model", "live_model"):
        bad = non_finite_tensor(ckpt.get(key))
        if bad is not None:
            return f"{key} tensor {bad}"
    return None


def _sibling_note(path: Path) -> str:
    """Whether the run folder's other checkpoint is intact, for the error about ``path``."""
    other_name = SIBLING.get(path.name)
    if other_name is None:
        return ""
    other = path.with_name(other_name)
    if not other.is_file():
        return f"; there is no {other_name} next to it"
    if zip_problem(other) is not None:
        return f"; {other_name} next to it is damaged too"
    try:
        ck = _read(other, "cpu")
    except CheckpointError:
        return f"; {other_name} next to it does not load either"
    if not isinstance(ck, dict) or ck.get("kind") != KIND:
        return f"; {other_name} next to it is not a scalable_equiformer checkpoint"
    if _non_finite_weights(ck) is not None:
        return f"; {other_name} next to it holds NaN or infinite weights too"
    return f"; {other_name} next to it is intact (epoch {ck.get('epoch')})"


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError (one line) otherwise.

    The zip CRCs are checked first (``torch.load`` does not): a damaged file is refused, naming
    it and the state of the other checkpoint of its run folder. Weights (``model``, ``live_model``)
    that hold NaN or infinite values are refused the same way. ``elements`` is None for
    checkpoints written before it was recorded."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    problem = zip_problem(path)
    if problem is not None:
        if problem.startswith("CRC"):
            raise CheckpointError(f"{path}: corrupt checkpoint ({problem}){_sibling_note(path)}")
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {problem[:160]}"
                              f"{_sibling_note(path)}")
    ckpt = _read(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a scalable_equiformer checkpoint")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt.get('format')} is not {FORMAT}")
    bad = _non_finite_weights(ckpt)
    if bad is not None:
        raise CheckpointError(f"{path}: weights hold NaN or infinite values ({bad}): refused (a run that "
                              f"diverged?){_sibling_note(path)}")
    ckpt["elements"] = normalise_elements(ckpt.get("elements"))
    return ckpt


def element_label(z: int) -> str:
    """``"N (Z=7)"``."""
    from ase.data import chemical_symbols

    z = int(z)
    sym = chemical_symbols[z] if 0 < z < len(chemical_symbols) else "?"
    return f"{sym} (Z={z})"


def element_list(zs: Iterable[int]) -> str:
    """``"H, C, O"``."""
    from ase.data import chemical_symbols

    return ", ".join(chemical_symbols[int(z)] if 0 < int(z) < len(chemical_symbols) else f"Z={int(z)}" for z in zs)


def check_atomic_numbers(z, *, max_atomic_number: Optional[int], elements: Optional[Iterable[int]], where: str,
                         strict: bool = True, hint: str = "", warned: Optional[set] = None) -> list[int]:
    """Check the atomic numbers ``z`` of some input against a trained model.

    * ``z`` >= ``max_atomic_number`` (or < 1): the model cannot embed it; always a UserError.
    * an element outside ``elements`` (the training split's, from the checkpoint): the model never
      saw it and would return finite, meaningless numbers. ``strict``: UserError naming the
      element(s); else one ``UserWarning`` per element (remembered in ``warned``, so a calculator
      warns once). ``elements=None`` (unknown, an older checkpoint): no such check.

    Returns the unseen atomic numbers (sorted)."""
    import warnings

    zs = sorted({int(x) for x in (z.reshape(-1).tolist() if torch.is_tensor(z) else list(z))})
    if zs and zs[0] < 1:
        raise UserError(f"{where}: atomic number {zs[0]} is not an element (atomic numbers start at 1)")
    if max_atomic_number is not None and zs and zs[-1] >= int(max_atomic_number):
        raise UserError(f"{where}: atomic number {zs[-1]} ({element_label(zs[-1]).split(' ')[0]}) is not below the "
                        f"model's max_atomic_number ({int(max_atomic_number)}); this model cannot take it")
    if elements is None:
        return []
    known = set(int(x) for x in elements)
    unseen = [x for x in zs if x not in known]
    if not unseen:
        return []
    what = ", ".join(element_label(x) for x in unseen)
    noun = "element" if len(unseen) == 1 else "elements"
    trained = element_list(sorted(known))
    if strict:
        raise UserError(f"{where}: {noun} {what} never seen in training (the model was trained on {trained}); "
                        f"refused{'; ' + hint if hint else ''}")
    new = [x for x in unseen if warned is None or x not in warned]
    if new:
        warnings.warn(f"{where}: {noun} {', '.join(element_label(x) for x in new)} never seen in training "
                      f"(the model was trained on {trained}): its energies and forces are extrapolations",
                      UserWarning, stacklevel=3)
        if warned is not None:
            warned.update(new)
    return unseen


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


def resolve_model_checkpoint(path) -> Path:
    """The checkpoint file a user means: the file itself, or a run folder's ``best.pt``."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise CheckpointError(f"{path / 'best.pt'}: checkpoint not found (a run folder's best.pt; "
                                  "pass last.pt explicitly for the latest weights)")
        path = path / "best.pt"
    return path


__all__ = [
    "FORMAT", "KIND", "WriteError", "os_reason", "atomic_write_bytes", "atomic_write_text", "write_json",
    "zip_problem", "normalise_elements", "non_finite_tensor", "load_checkpoint", "element_label", "element_list",
    "check_atomic_numbers", "clean_state", "load_model_state", "resolve_model_checkpoint",
]
