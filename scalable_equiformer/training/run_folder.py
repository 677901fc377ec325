"""The run folder of a training run: making it, ``metrics.csv`` and the learning-curve plot.

``<train.out_dir>/<train.run_name>`` (default name ``<dataset>_<date-time>``, :func:`new_run_path`)
holds::

    config.yaml       resolved config (units, origin of each value)        create_run_folder
    versions.json     python, torch, e3nn, deepspeed, torch_geometric, numpy, git hash
    splits.npz        the frame indices of train / val / test
    train.log         the log of rank 0
    metrics.csv       epoch, step, lr, train_loss, val_energy_mae_meV, val_force_mae_meV_per_A, time, kind
    tensorboard/      TensorBoard events (same scalars)                    (training/progress.py)
    last.pt, best.pt  checkpoints (best by validation force MAE), written atomically (run_state.py)
    deepspeed/<tag>/  DeepSpeed's sharded optimizer state (DeepSpeed runs only)
    learning_curve.png, results.json  (test metrics of best.pt)            plot_learning_curve
    .lock             flock of the process that writes the folder (rank 0), "pid ... host ... since ..."

One process and one run per folder: rank 0 holds an exclusive ``flock`` on ``.lock`` for the whole
run (:func:`lock_run_folder`; the kernel drops it when the process dies, kill -9 too, so nothing is
left stale). A second start into the folder, or ``--resume`` of a run that is still training,
refuses in one line naming the holder. A new run makes its folder itself and refuses one that
exists; files are not written through a symbolic link planted in the folder (refused on start,
``metrics.csv`` appended without following links; the other files are replaced atomically).
Temporary files of atomic writes left by a kill (``.<name>.<random>.tmp``) are removed once the
lock is held.

``metrics.csv`` has the columns :data:`CSV_COLUMNS`: one row per logged interval (``kind`` ``step``:
``train_loss`` is the mean over the ``train.log_every`` steps up to ``step``) and one per epoch
(``kind`` ``epoch``: ``train_loss`` the epoch's mean, the validation MAEs when it was evaluated). An
epoch's last step can have both rows, with the same ``step``: ``kind`` tells them apart. Appended by
:class:`RunFolder`, rewritten atomically when a resumed run drops later rows; files written before
``kind`` existed get it on reading (:func:`row_kinds`).
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import socket
from datetime import datetime
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from . import checkpoint as ckpt_io

LOCK_FILE = ".lock"
#: the temporary files of :func:`scalable_equiformer.checkpoint_io.atomic_write_bytes` (and of the
#: splits.npz writes of earlier versions)
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(tmp|npz\.part)$")

CSV_COLUMNS = ["epoch", "step", "lr", "train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A", "time", "kind"]

#: ``kind`` of a metrics.csv row: a logged interval of steps, or an epoch's end
STEP_ROW, EPOCH_ROW = "step", "epoch"


def row_kinds(rows: list[dict]) -> list[dict]:
    """``rows`` with ``kind`` filled where a file written before the column existed lacks it: each
    epoch's rows end with its epoch row (the trainer writes it after the epoch's steps)."""
    if all(r.get("kind") for r in rows):
        return rows
    out = []
    for i, r in enumerate(rows):
        if not r.get("kind"):
            last_of_epoch = i + 1 == len(rows) or rows[i + 1].get("epoch") != r.get("epoch")
            has_val = r.get("val_force_mae_meV_per_A") not in ("", None)
            r = {**r, "kind": EPOCH_ROW if (last_of_epoch or has_val) else STEP_ROW}
        out.append(r)
    return out


def _fmt(x) -> str:
    return "" if x is None else (f"{x:.12g}" if isinstance(x, float) else str(x))


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def holds_run(self) -> bool:
        return any((self.path / n).exists() for n in ("config.yaml", "last.pt", "metrics.csv"))

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.csv"
        if not p.is_file():
            return []
        with p.open(newline="") as fh:
            return row_kinds(list(csv.DictReader(fh)))

    def write_metrics(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
        ckpt_io.atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def append_metrics(self, row: dict) -> None:
        p = self.path / "metrics.csv"
        new = not p.is_file()
        with open_no_follow(p) as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in CSV_COLUMNS})

    def keep_metrics_until(self, step: int, epoch: int) -> None:
        """Drop the rows written after the checkpoint a run resumes from."""
        rows = [r for r in self.read_metrics() if r.get("step") not in (None, "") and int(r["step"]) <= step
                and int(r["epoch"]) <= epoch]
        self.write_metrics(rows)


def open_no_follow(path: Path):
    """``open(path, "a")`` (text) that refuses a symbolic link at ``path`` (ConfigError) instead of
    writing through it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path}: is a symbolic link (to {os.readlink(path)}); refused: the run folder's "
                              "files are written in place, not through links") from None
        raise
    return os.fdopen(fd, "a", newline="", encoding="utf-8")


def _holder(lock: Path) -> str:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd) as fh:
            text = fh.read(200).strip()
    except OSError:
        text = ""
    return text or "a process that has not written its pid yet"


def _in_use(path: Path, resume: bool) -> ConfigError:
    how = ("wait until it has stopped, then --resume it" if resume
           else "wait until it has stopped, or choose another train.run_name")
    return ConfigError(f"{path}: the run folder is in use by a running training process "
                       f"({_holder(path / LOCK_FILE)}); {how}")


def check_not_locked(path: Path, resume: bool) -> None:
    """ConfigError naming the holder when a live process holds ``path``'s lock (nothing written)."""
    import fcntl

    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _in_use(path, resume) from None
    finally:
        os.close(fd)


def lock_run_folder(path: Path, resume: bool) -> int:
    """Take the exclusive lock of run folder ``path`` (rank 0, for the whole run): ``flock`` on
    ``<path>/.lock``, which then names this process. Returns the descriptor to keep open (closing it,
    or the process ending, releases the lock). ConfigError (one line) when another process holds it,
    when the folder cannot be written, or when it holds a symbolic link; then the stale temporary
    files of atomic writes are removed."""
    import fcntl

    lock = path / LOCK_FILE
    not_writable = ("--resume writes last.pt, metrics.csv and train.log into it" if resume
                    else "a new run writes into it")
    if resume:
        check_not_locked(path, resume)  # a live run is named even when this process could not write
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{lock}: is a symbolic link; refused (the run folder's lock is a plain file)") from None
        raise ConfigError(f"{path}: the run folder is not writable ({ckpt_io.os_reason(exc)}); "
                          f"{not_writable}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _in_use(path, resume) from None
            raise ConfigError(f"{lock}: cannot lock the run folder ({ckpt_io.os_reason(exc)})") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n"
                     .encode())
            if not os.access(path, os.W_OK | os.X_OK):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
            _refuse_links(path)
            for entry in os.scandir(path):
                if TEMP_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)  # left by a process killed while writing (we hold the lock)
        except OSError as exc:
            raise ConfigError(f"{path}: the run folder is not writable ({ckpt_io.os_reason(exc)}); "
                              f"{not_writable}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_links(path: Path) -> None:
    """ConfigError naming the first symbolic link among the run folder's entries."""
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_symlink():
            raise ConfigError(f"{entry.path}: is a symbolic link (to {os.readlink(entry.path)}); refused: the run "
                              "folder's files are written in place, not through links")


def unlock_run_folder(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


def dataset_label(cfg) -> str:
    if cfg.data.name:
        return cfg.data.name
    return Path(cfg.data.path).stem


def new_run_path(cfg) -> Path:
    """``<train.out_dir>/<train.run_name>``; without a name ``<dataset>_<date-time>``."""
    name = cfg.train.run_name or f"{dataset_label(cfg)}_{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


def create_run_folder(path: Path, cfg, splits: dict, dataset) -> int:
    """Make the new run folder ``path`` (rank 0), lock it (:func:`lock_run_folder`) and write
    ``config.yaml``, ``versions.json`` and ``splits.npz``; returns the lock's descriptor. A folder
    that exists is not this run's: refused (ConfigError naming the process that holds it, or
    ``--resume``, or why not)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        _refuse_existing(path)
    fd = lock_run_folder(path, resume=False)
    try:
        ckpt_io.atomic_write_text(path / "config.yaml", cfg.dump())
        ckpt_io.write_json(path / "versions.json", ckpt_io.versions())
        from ..data import save_splits

        save_splits(splits, path, n_frames=len(dataset), source=dataset.path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_existing(path: Path) -> None:
    """The ConfigError for a new run whose folder exists already."""
    if path.is_symlink() or not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a run folder; choose another train.run_name")
    check_not_locked(path, resume=False)  # a live run: named, and never 'delete it'
    if RunFolder(path).holds_run():
        if not (path / "last.pt").exists():
            # not locked: no live process writes it
            raise ConfigError(f"{path}: the run folder holds a run that stopped before its first "
                              f"checkpoint (no last.pt), which cannot be resumed; delete {path}, or "
                              "choose another train.run_name")
        raise ConfigError(f"{path}: the run folder already holds a run; resume it with "
                          f"--resume {path}, or choose another train.run_name")
    raise ConfigError(f"{path}: the folder exists and is not this run's (a new run makes its own folder); "
                      "choose another train.run_name")


def learning_curve_series(rows: list[dict]) -> dict:
    """What :func:`plot_learning_curve` draws: ``steps`` (step, loss) of the interval rows, the line;
    ``epoch_loss`` (step, loss) of the epoch rows, markers; ``epochs``, the epoch rows."""
    rows = row_kinds(rows)
    has_loss = [r for r in rows if r.get("train_loss") not in ("", None)]
    step_rows = [r for r in has_loss if r["kind"] == STEP_ROW]
    epoch_rows = [r for r in rows if r["kind"] == EPOCH_ROW]
    epoch_loss = [r for r in epoch_rows if r.get("train_loss") not in ("", None)]
    return {"steps": ([int(r["step"]) for r in step_rows], [float(r["train_loss"]) for r in step_rows]),
            "epoch_loss": ([int(r["step"]) for r in epoch_loss], [float(r["train_loss"]) for r in epoch_loss]),
            "epochs": epoch_rows}


def plot_learning_curve(rows: list[dict], path: Path) -> None:
    """``learning_curve.png``: the training loss of the logged intervals as a line over steps, each
    epoch's mean loss as a marker at its last step, validation MAEs per epoch (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = learning_curve_series(rows)
    ep = [r for r in series["epochs"] if r.get("val_force_mae_meV_per_A") not in ("", None)]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if series["steps"][0]:
        ax[0].plot(*series["steps"], lw=1, label="mean over train.log_every steps")
    if series["epoch_loss"][0]:
        ax[0].plot(*series["epoch_loss"], "o", ms=3, label="epoch mean")
        ax[0].legend()
    ax[0].set_xlabel("optimizer step")
    ax[0].set_ylabel("training loss (normalised)")
    ax[0].set_yscale("log")
    if ep:
        x = [int(r["epoch"]) for r in ep]
        ax[1].plot(x, [float(r["val_force_mae_meV_per_A"]) for r in ep], "o-", label="force MAE (meV/Å, per component)")
        ax[1].plot(x, [float(r["val_energy_mae_meV"]) for r in ep], "s-", label="energy MAE (meV per molecule)")
        ax[1].legend()
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation MAE")
    ax[1].set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100)
    plt.close(fig)
    ckpt_io.atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


__all__ = ["CSV_COLUMNS", "EPOCH_ROW", "LOCK_FILE", "STEP_ROW", "RunFolder", "check_not_locked", "create_run_folder",
           "dataset_label", "learning_curve_series", "lock_run_folder", "new_run_path", "open_no_follow",
           "plot_learning_curve", "row_kinds", "unlock_run_folder"]
