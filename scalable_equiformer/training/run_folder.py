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

``metrics.csv`` has the columns :data:`CSV_COLUMNS`: one row per logged interval (``kind`` ``step``:
``train_loss`` is the mean over the ``train.log_every`` steps up to ``step``) and one per epoch
(``kind`` ``epoch``: ``train_loss`` the epoch's mean, the validation MAEs when it was evaluated). An
epoch's last step can have both rows, with the same ``step``: ``kind`` tells them apart. Appended by
:class:`RunFolder`, rewritten atomically when a resumed run drops later rows; files written before
``kind`` existed get it on reading (:func:`row_kinds`).
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path

from ..errors import ConfigError
from . import checkpoint as ckpt_io

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
        with p.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in CSV_COLUMNS})

    def keep_metrics_until(self, step: int, epoch: int) -> None:
        """Drop the rows written after the checkpoint a run resumes from."""
        rows = [r for r in self.read_metrics() if r.get("step") not in (None, "") and int(r["step"]) <= step
                and int(r["epoch"]) <= epoch]
        self.write_metrics(rows)


def dataset_label(cfg) -> str:
    if cfg.data.name:
        return cfg.data.name
    return Path(cfg.data.path).stem


def new_run_path(cfg) -> Path:
    """``<train.out_dir>/<train.run_name>``; without a name ``<dataset>_<date-time>``."""
    name = cfg.train.run_name or f"{dataset_label(cfg)}_{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


def create_run_folder(path: Path, cfg, splits: dict, dataset) -> Path:
    """Make the new run folder ``path`` (rank 0) and write ``config.yaml``, ``versions.json`` and
    ``splits.npz``. A folder that already holds a run is refused (ConfigError naming ``--resume``
    or why not)."""
    if RunFolder(path).holds_run():
        if not (path / "last.pt").exists():
            raise ConfigError(f"{path}: the run folder holds a run that stopped before its first "
                              f"checkpoint (no last.pt), which cannot be resumed; delete {path}, or "
                              "choose another train.run_name")
        raise ConfigError(f"{path}: the run folder already holds a run; resume it with "
                          f"--resume {path}, or choose another train.run_name")
    path.mkdir(parents=True, exist_ok=True)
    cfg.dump(path / "config.yaml")
    ckpt_io.write_json(path / "versions.json", ckpt_io.versions())
    from ..data import save_splits

    save_splits(splits, path, n_frames=len(dataset), source=dataset.path)
    return path


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


__all__ = ["CSV_COLUMNS", "EPOCH_ROW", "STEP_ROW", "RunFolder", "create_run_folder", "dataset_label", "learning_curve_series",
           "new_run_path", "plot_learning_curve", "row_kinds"]
