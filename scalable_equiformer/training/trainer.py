"""Training: epochs of optimizer steps, evaluation, EMA, LR schedule, checkpoints, resume, logs.

``run(config, resume=None)`` is the whole job (``train.py`` only parses arguments). The run folder
``<train.out_dir>/<train.run_name>`` holds::

    config.yaml       resolved config (units, origin of each value)
    versions.json     python, torch, e3nn, deepspeed, torch_geometric, numpy, git hash
    splits.npz        the frame indices of train / val / test
    train.log         the log of rank 0
    metrics.csv       epoch, step, lr, train_loss, val_energy_mae_meV, val_force_mae_meV_per_A, time
    tensorboard/      TensorBoard events (same scalars)
    last.pt, best.pt  checkpoints (best by validation force MAE), written atomically
    deepspeed/<tag>/  DeepSpeed's sharded optimizer state (DeepSpeed runs only)
    learning_curve.png, results.json  (test metrics of best.pt)

Units: energies eV and forces eV/Å inside; metrics in meV (per molecule) and meV/Å (per force
component), stated in every log header.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import runtime
from ..config import Config
from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from . import checkpoint as ckpt_io
from . import steps
from .batches import BatchPlan, StepSampler, atom_counts, collate
from .ema import EMA
from .engine import DeepSpeedEngine, PlainEngine, use_deepspeed
from .metrics import UNITS_HEADER, evaluate
from .schedule import LRSchedule

log = logging.getLogger("scalable_equiformer.training")

CSV_COLUMNS = ["epoch", "step", "lr", "train_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A", "time"]


# ---- helpers --------------------------------------------------------------------------------

def _setup_logging(is_main: bool, level: str, log_file: Optional[Path]) -> list[logging.Handler]:
    root = logging.getLogger("scalable_equiformer")
    root.setLevel(getattr(logging, level.upper()) if is_main else logging.WARNING)
    root.propagate = False
    handlers: list[logging.Handler] = []
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    handlers.append(h)
    if is_main and log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        handlers.append(fh)
    for x in handlers:
        root.addHandler(x)
    return handlers


def _teardown_logging(handlers) -> None:
    root = logging.getLogger("scalable_equiformer")
    for h in handlers:
        root.removeHandler(h)
        h.close()


def _broadcast_object(obj, info: runtime.DistInfo):
    if not info.initialized or info.world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(info: runtime.DistInfo) -> None:
    if info.initialized and info.world_size > 1:
        torch.distributed.barrier()


def _failed_ranks(ok: bool, info: runtime.DistInfo, device) -> int:
    """How many ranks have ``ok`` false."""
    if not info.initialized or info.world_size == 1:
        return 0 if ok else 1
    t = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=device if info.backend == "nccl" else "cpu")
    torch.distributed.all_reduce(t)
    return int(round(float(t)))


def _error_everywhere(exc: Optional[BaseException], info: runtime.DistInfo, device) -> None:
    """Raise ``exc`` on its rank and a short TrainingError on the others, so no rank hangs.
    An error that only some ranks hit is marked ``rank_specific``: ``train.py`` prints those on
    every rank (it prints errors that are the same everywhere on rank 0 only)."""
    failed = _failed_ranks(exc is None, info, device)
    if failed == 0:
        return
    if exc is not None:
        if failed < info.world_size:
            exc.rank_specific = True
        raise exc
    raise TrainingError("another rank stopped with an error (see its message)")


PACKAGE_DIR = Path(__file__).resolve().parents[1]


def resolve_data_path(path: str, root: Optional[str] = None) -> str:
    """``data.path`` as given when it exists (or under ``data.root``); else relative to the
    repository root or to the installed package (so the shipped demo file is found from
    anywhere). Unresolved paths are returned unchanged (the loader names them in its error)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.is_file() or (root is not None and (Path(root) / p).is_file()):
        return str(p)
    parts = p.parts
    candidates = [PACKAGE_DIR.parent / p]
    if parts and parts[0] == PACKAGE_DIR.name:
        candidates.append(PACKAGE_DIR.joinpath(*parts[1:]))
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(p)


def _dataset_label(cfg: Config) -> str:
    if cfg.data.name:
        return cfg.data.name
    return Path(cfg.data.path).stem


def _fmt(x) -> str:
    return "" if x is None else (f"{x:.12g}" if isinstance(x, float) else str(x))


# ---- the run folder -------------------------------------------------------------------------

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
            return list(csv.DictReader(fh))

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


def plot_learning_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r for r in rows if r.get("val_force_mae_meV_per_A") not in ("", None)]
    tr = [r for r in rows if r.get("train_loss") not in ("", None)]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    if tr:
        ax[0].plot([int(r["step"]) for r in tr], [float(r["train_loss"]) for r in tr], lw=1)
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


# ---- the trainer ----------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None, stop_after_epochs: Optional[int] = None):
        self.cfg = cfg
        self.resume = Path(resume) if resume is not None else None
        self.stop_after_epochs = stop_after_epochs
        self.handlers: list[logging.Handler] = []
        self.writer = None

    # -- set-up --
    def setup(self) -> None:
        cfg = self.cfg
        self.resume_ckpt = None
        if self.resume is not None:
            if not (self.resume / "last.pt").exists() and (self.resume / "config.yaml").is_file():
                raise CheckpointError(
                    f"{self.resume}: the run stopped before its first checkpoint (no last.pt), so there is nothing to "
                    f"resume; start it again without --resume after deleting {self.resume} (or with another "
                    "train.run_name)")
            self.resume_ckpt = ckpt_io.load_checkpoint(self.resume / "last.pt")
            ckpt_io.check_same_model(self.resume_ckpt["config"], cfg.to_dict(), self.resume / "last.pt")
            saved_data = self.resume_ckpt["config"].get("data", {})
            for key in ("name", "path", "train_size", "val_size", "test_size", "seed", "split_index"):
                if saved_data.get(key) != getattr(cfg.data, key):
                    raise CheckpointError(f"{self.resume / 'last.pt'}: data.{key} differs from the run being resumed "
                                          f"({saved_data.get(key)!r} vs {getattr(cfg.data, key)!r})")
        info0 = runtime.launch_env()
        self.use_ds = use_deepspeed(cfg, info0.launcher, info0.world_size)
        self.info, self.device = runtime.init_distributed(self.use_ds, cfg.train.device)
        info = self.info
        self.handlers = _setup_logging(info.is_main, cfg.logging.level, None)
        runtime.configure_tf32(False)
        runtime.seed_everything(cfg.train.seed)

        # parallel layout: world = D data-parallel groups x P graph partitions
        P = cfg.parallel.graph_partitions
        self.partitions = P
        self.dp_group = self.part_group = None
        if P > 1:
            try:
                from ..parallel.partitioned import PartitionedModel, make_groups  # noqa: F401
            except ImportError as exc:
                raise ConfigError(f"parallel.graph_partitions > 1 needs scalable_equiformer.parallel.partitioned ({exc})") from None
            if info.world_size % P:
                raise ConfigError(f"parallel.graph_partitions={P} must divide the number of ranks ({info.world_size})")
            self.dp_group, self.part_group = make_groups(info.world_size, P)
        self.dp_world = info.world_size // P
        self.dp_rank = info.rank // P
        self.plan = BatchPlan.from_config(cfg, self.dp_world)

        # data
        exc = None
        try:
            self._load_data()
        except (DataError, ConfigError) as e:
            exc = e
        _error_everywhere(exc, info, self.device)

        # run folder
        self._open_run_folder()
        self.handlers += self._file_log()

        # statistics, model, engine
        from ..data.statistics import DatasetStatistics, compute_statistics

        init = None
        if self.resume_ckpt is not None:
            self.stats = DatasetStatistics.from_dict(self.resume_ckpt["stats"])
        else:
            init = ckpt_io.read_init_checkpoint(cfg) if cfg.train.init_from else None
            if init is not None and cfg.train.init_statistics == "checkpoint":
                self.stats = DatasetStatistics.from_dict(init["stats"])
            else:
                self.stats = compute_statistics(self.train_ds, cfg.model.cutoff)
        from ..model import build_model, normalization_constants

        runtime.seed_everything(cfg.train.seed)
        model = build_model(cfg, self.stats)
        self.loss_scale = normalization_constants(cfg, self.stats)[1]  # the model's energy scale, eV
        if init is not None:
            state = dict(init["model"])
            if cfg.train.init_statistics == "training_split":  # keep this run's normalisation buffers
                state.update({k: v for k, v in model.state_dict().items() if k in model.statistics()})
            ckpt_io.load_model_state(model, state, cfg.train.init_from)
            log.info("weights from %s (train.init_from); normalisation from the %s", cfg.train.init_from,
                     cfg.train.init_statistics.replace("_", " "))
        steps.configure_model(model, cfg)
        model = model.to(self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        import copy

        self.template = copy.deepcopy(model)  # a plain module to evaluate EMA / gathered / best weights
        self.eval_wrapper = self.template
        if P > 1:
            from ..parallel.partitioned import PartitionedModel

            model = PartitionedModel(model, self.part_group)
            self.eval_wrapper = PartitionedModel(self.template, self.part_group)
        if self.use_ds:
            self.engine = DeepSpeedEngine(model, cfg, self.plan, info.world_size)
        else:
            self.engine = PlainEngine(model, cfg, self.plan, group=None, world=info.world_size)
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = EMA(dict(self.engine.named_full_parameters()), cfg.train.ema_decay)

        # schedule
        self.steps_per_epoch = self.sampler.steps_per_epoch
        total = cfg.train.max_epochs * self.steps_per_epoch
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        self.total_steps = total
        self.schedule = LRSchedule.from_config(cfg.optim, self.steps_per_epoch, total)

        # state
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.best = math.inf
        self.best_epoch = None
        self.elapsed_before = 0.0
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
            exc = None
            if info.is_main:
                try:
                    self._repair_best()
                except CheckpointError as e:
                    exc = e
            _error_everywhere(exc, info, self.device)
        self._open_writers()
        self._log_header()

    def _load_data(self) -> None:
        from ..data import load_dataset, load_index_split, load_splits, make_splits

        cfg = self.cfg
        self.dataset = load_dataset(resolve_data_path(cfg.data.path, cfg.data.root) if cfg.data.path else cfg.data.name,
                                    root=cfg.data.root)
        n = len(self.dataset)
        if self.resume is not None:
            self.splits = load_splits(self.resume, n_frames=n)
        elif cfg.data.split_index is not None:
            self.splits = load_index_split(cfg.data.root, cfg.data.split_index + 1, val_size=cfg.data.val_size,
                                           seed=cfg.data.seed, n_frames=n)
        else:
            self.splits = make_splits(n, cfg.data.train_size, cfg.data.val_size, cfg.data.test_size, cfg.data.seed,
                                      source=self.dataset.path)
        self.train_ds = self.dataset.subset(self.splits["train"])
        # the elements the model and the statistics see; recorded in every checkpoint
        self.elements = sorted({int(x) for x in self.train_ds.z.reshape(-1).tolist()})
        z_max = int(self.dataset.z.max()) if self.dataset.num_atoms else 0
        if z_max >= cfg.model.max_atomic_number:  # checked before the run folder is made
            raise ConfigError(f"{self.dataset.path}: atomic number {z_max} ({ckpt_io.element_label(z_max).split()[0]}) "
                              f"is not below model.max_atomic_number ({cfg.model.max_atomic_number}); set "
                              f"model.max_atomic_number to {z_max + 1} or more")
        self.val_idx = np.asarray(self.splits["val"])
        if cfg.train.max_eval_frames is not None:
            self.val_idx = self.val_idx[: cfg.train.max_eval_frames]
        n_train = len(self.train_ds)
        if cfg.train.batch_size > n_train:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) is larger than the training split "
                              f"({n_train} frames, data.train_size)")
        self.train_atoms = atom_counts(self.train_ds)
        self.sampler = StepSampler(n_train, self.plan, cfg.train.seed, self.dp_rank)

    def _open_run_folder(self) -> None:
        cfg, info = self.cfg, self.info
        exc = None
        path = None
        if info.is_main:
            try:
                if self.resume is not None:
                    path = self.resume
                else:
                    name = cfg.train.run_name or f"{_dataset_label(cfg)}_{datetime.now():%Y%m%d-%H%M%S}"
                    path = Path(cfg.train.out_dir) / name
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

                    save_splits(self.splits, path, n_frames=len(self.dataset), source=self.dataset.path)
            except (ConfigError, OSError) as e:
                exc = e if isinstance(e, ConfigError) else ConfigError(f"{path}: cannot write the run folder ({e})")
        _error_everywhere(exc, info, self.device)
        self.run = RunFolder(Path(_broadcast_object(str(path), info)))

    def _file_log(self) -> list[logging.Handler]:
        if not self.info.is_main:
            return []
        root = logging.getLogger("scalable_equiformer")
        fh = logging.FileHandler(self.run / "train.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(fh)
        return [fh]

    def _open_writers(self) -> None:
        if not self.info.is_main:
            return
        if self.resume is not None:  # drop rows written after the checkpoint we resume from
            rows = [r for r in self.run.read_metrics() if r.get("step") not in (None, "") and int(r["step"]) <= self.step
                    and int(r["epoch"]) <= self.epoch]
            self.run.write_metrics(rows)
        if self.cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run / "tensorboard"), purge_step=self.step if self.resume else None)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")

    def _log_header(self) -> None:
        cfg, info = self.cfg, self.info
        log.info("run folder: %s%s", self.run.path, " (resumed)" if self.resume else "")
        log.info("%s", UNITS_HEADER)
        log.info("data: %s, %d frames, %d atoms; split train %d / val %d (evaluated %d) / test %d",
                 self.dataset.path, len(self.dataset), self.dataset.num_atoms, len(self.splits["train"]),
                 len(self.splits["val"]), len(self.val_idx), len(self.splits["test"]))
        log.info("statistics of the training split: %s", self.stats.describe())
        log.info("model: %d parameters, %s, lmax %d, %d blocks, irreps %s, memory: checkpointing=%s precision=%s",
                 self.n_params, cfg.model.dtype, cfg.model.lmax, cfg.model.num_blocks, cfg.model.irreps_node,
                 cfg.memory.checkpointing, cfg.memory.precision)
        ds = f"DeepSpeed ZeRO stage {cfg.deepspeed.zero_stage}" if self.use_ds else "plain torch"
        threads = f", {torch.get_num_threads()} torch thread(s) per rank (OMP_NUM_THREADS)" if self.device.type == "cpu" else ""
        log.info("parallel: %d rank(s) (%s, %s backend, launcher %s) = %d data-parallel x %d graph partitions; on %s%s",
                 info.world_size, ds, info.backend, info.launcher, self.dp_world, self.partitions, self.device, threads)
        log.info("batch %d molecules per step = %d rank(s) x %d micro-batch(es) x %d; %d steps per epoch, %d epochs, "
                 "%d steps in all", self.plan.batch_size, self.dp_world, self.plan.grad_accum, self.plan.micro_batch_size,
                 self.steps_per_epoch, cfg.train.max_epochs, self.total_steps)
        log.info("loss: %s, energy weight %g, force weight %g, divided by the model's energy scale %.4f eV (%s); "
                 "AdamW lr %g (warm-up %g epochs from %g, %s to %g), weight decay %g%s",
                 cfg.train.loss, cfg.train.energy_weight, cfg.train.force_weight, self.loss_scale, cfg.model.energy_normalization, cfg.optim.lr,
                 cfg.optim.warmup_epochs, cfg.optim.warmup_lr, cfg.optim.scheduler, cfg.optim.min_lr,
                 cfg.optim.weight_decay, f", EMA {cfg.train.ema_decay}" if self.ema else "")

    # -- checkpoints --
    def _eval_state(self) -> dict:
        """Weights evaluated and kept in best.pt: the EMA when on, else the live weights."""
        live = self.engine.full_state_dict()
        if self.ema is None:
            return live
        state = dict(live)
        state.update({k: v.clone() for k, v in self.ema.shadow.items()})
        return state

    def _eval_module(self) -> torch.nn.Module:
        """The module evaluated: live weights, or a plain copy holding the EMA / gathered ZeRO-3
        weights (wrapped in a PartitionedModel when the graph is partitioned)."""
        if self.ema is None and self.engine.zero_stage != 3:
            return self.engine.module
        self.template.load_state_dict(self._eval_state(), strict=False)
        return self.eval_wrapper

    def _payload(self, model_state: dict, metrics: dict) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "stats": self.stats.to_dict(),
            "model": model_state,
            "epoch": self.epoch,
            "step": self.step,
            "metrics": metrics,
            "units": "energy eV, forces eV/Å; metrics meV and meV/Å per component",
            "elements": self.elements,
        }

    def _save(self, metrics: dict, is_best: bool) -> None:
        live = self.engine.full_state_dict()
        eval_state = live if self.ema is None else {**live, **{k: v.clone() for k, v in self.ema.shadow.items()}}
        tag = f"epoch{self.epoch:05d}"
        ds_tag = self.engine.save_sharded(self.run.path, tag)  # collective under DeepSpeed
        exc = None
        if self.info.is_main:
            payload = self._payload(eval_state, metrics)
            payload.update({
                "live_model": live if self.ema is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "engine": self.engine.state_dict(),
                "deepspeed_tag": ds_tag,
                "trainer": {"epoch": self.epoch, "step": self.step, "best": self.best, "best_epoch": self.best_epoch,
                            "elapsed": self.elapsed(), "steps_per_epoch": self.steps_per_epoch,
                            "world_size": self.info.world_size, "engine": self.engine.kind,
                            "zero_stage": self.engine.zero_stage},
                "rng": ckpt_io.rng_state(),
            })
            # last.pt first: a run stopped between the two writes gets its best.pt back from last.pt
            # on --resume (see _repair_best)
            try:
                ckpt_io.save_checkpoint(self.run / "last.pt", payload)
                if is_best:
                    ckpt_io.save_checkpoint(self.run / "best.pt", self._payload(eval_state, metrics))
            except ckpt_io.CheckpointWriteError as e:
                exc = self._save_failed(e)
        _error_everywhere(exc, self.info, self.device)  # also the barrier after the writes
        if self.info.is_main and ds_tag is not None:
            self.engine.remove_sharded(self.run.path, keep=ds_tag)

    def _save_failed(self, e: "ckpt_io.CheckpointWriteError") -> TrainingError:
        """One line for a checkpoint that could not be written (disk full, ...): which file, what
        is intact, and how to go on."""
        run = self.run.path
        if e.path.name == "best.pt":
            how = (f"last.pt of epoch {self.epoch} was written; free space, then continue with: "
                   f"python train.py --resume {run} (best.pt is restored from last.pt)")
        elif e.intact:
            how = f"free space, then continue with: python train.py --resume {run}"
        else:
            how = (f"the run stopped before its first checkpoint: free space, delete {run} and start it again")
        return TrainingError(f"{e}; {how}")

    def _repair_best(self) -> None:
        """Make best.pt agree with last.pt when resuming (rank 0).

        last.pt is written before best.pt. A run stopped between the two has a last.pt whose
        ``trainer.best_epoch`` is its own epoch and a best.pt of an earlier epoch (or none): best.pt
        is then written again from last.pt, which holds the same weights (``model``)."""
        ck = self.resume_ckpt
        best_epoch = ck["trainer"].get("best_epoch")
        if best_epoch is None:
            return
        path = self.run / "best.pt"
        held, damage = None, None
        if path.is_file():
            try:
                held = ckpt_io.load_checkpoint(path).get("epoch")
            except CheckpointError as e:
                damage = e
        if damage is None and held == best_epoch:
            return
        if int(best_epoch) == int(ck["epoch"]):
            payload = {k: ck[k] for k in ("config", "stats", "model", "epoch", "step", "metrics", "units") if k in ck}
            payload["elements"] = ck.get("elements")
            if payload["elements"] is None:
                payload["elements"] = self.elements
            ckpt_io.save_checkpoint(path, payload)
            was = "was damaged" if damage is not None else ("was missing" if held is None else f"held epoch {held}")
            log.warning("best.pt %s, but last.pt records epoch %s as the best (the run stopped between writing the "
                        "two?): best.pt written again from last.pt, which holds the same weights", was, best_epoch)
            return
        if damage is not None:
            raise CheckpointError(f"{damage}; the best weights (epoch {best_epoch}) cannot be recovered from last.pt: "
                                  "move best.pt away to resume and track the best model again from the next evaluation")
        if held is None:
            log.warning("best.pt is missing (the best was epoch %s): the best model is tracked again from the next "
                        "evaluation", best_epoch)
            self.best, self.best_epoch = math.inf, None
            return
        raise CheckpointError(f"{path}: holds epoch {held}, but last.pt records the best validation at epoch "
                              f"{best_epoch}: best.pt was replaced since; move it away to track the best model "
                              "again from the next evaluation")

    def _restore(self, ck: dict) -> None:
        path = self.resume / "last.pt"
        t = ck["trainer"]
        if t.get("steps_per_epoch") != self.steps_per_epoch:
            raise CheckpointError(f"{path}: written with {t.get('steps_per_epoch')} steps per epoch, this run has "
                                  f"{self.steps_per_epoch} (train.batch_size or the split changed)")
        if (t.get("engine") == "deepspeed") != self.use_ds:
            raise CheckpointError(f"{path}: written by a {t.get('engine')} run; resume it the same way "
                                  f"({'with' if t.get('engine') == 'deepspeed' else 'without'} DeepSpeed)")
        live = ck["live_model"] if ck.get("live_model") is not None else ck["model"]
        if self.use_ds:
            self.engine.load_sharded(self.resume, ck.get("deepspeed_tag"), path)
        else:
            ckpt_io.load_model_state(self.engine.base, live, path)
            self.engine.load_state_dict(ck["engine"], path)
        if self.ema is not None:
            if ck.get("ema") is None:
                raise CheckpointError(f"{path}: no EMA state in it, but train.ema_decay is set")
            self.ema.load_state_dict(ck["ema"])
        self.epoch, self.step = int(t["epoch"]), int(t["step"])
        self.best = float(t["best"])
        self.best_epoch = t.get("best_epoch")
        self.elapsed_before = float(t.get("elapsed", 0.0))
        ckpt_io.set_rng_state(ck.get("rng"))

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self.t0)

    # -- the loop --
    def train(self) -> Optional[dict]:
        cfg, info = self.cfg, self.info
        self.t0 = time.time()
        epochs_this_session = 0
        interval_loss, interval_n = 0.0, 0
        done = self.step >= self.total_steps
        while self.epoch < cfg.train.max_epochs and not done:
            epoch = self.epoch + 1
            order = self.sampler.order(epoch)
            bar = self._bar(epoch)
            epoch_loss, epoch_n = 0.0, 0
            for s in range(self.steps_per_epoch):
                if self.step >= self.total_steps:
                    done = True
                    break
                loss = self._train_step(epoch, s, order)
                self.step += 1
                epoch_loss += loss
                epoch_n += 1
                interval_loss += loss
                interval_n += 1
                if bar is not None:
                    bar.update(self.plan.batch_size)
                    bar.set_postfix_str(f"loss {loss:.4g}, lr {self.schedule(self.step - 1):.3g}", refresh=False)
                if self.step % cfg.train.log_every == 0 and info.is_main:
                    row = {"epoch": epoch, "step": self.step, "lr": self.schedule(self.step - 1),
                           "train_loss": interval_loss / interval_n, "time": round(self.elapsed(), 3)}
                    self.run.append_metrics(row)
                    if self.writer is not None:
                        self.writer.add_scalar("train/loss", row["train_loss"], self.step)
                        self.writer.add_scalar("train/lr", row["lr"], self.step)
                    interval_loss, interval_n = 0.0, 0
            if bar is not None:
                bar.close()
            self.epoch = epoch
            self._end_of_epoch(epoch_loss / max(epoch_n, 1), final=done or epoch == cfg.train.max_epochs)
            epochs_this_session += 1
            if self.stop_after_epochs is not None and epochs_this_session >= self.stop_after_epochs \
                    and self.epoch < cfg.train.max_epochs and not done:
                log.info("stopping after %d epoch(s) as asked; continue with --resume %s", epochs_this_session, self.run.path)
                return None
        return self._finish()

    def _bar(self, epoch: int):
        if not (self.info.is_main and self.cfg.train.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch * self.plan.batch_size, unit="mol", unit_scale=False,
                    desc=f"epoch {epoch}/{self.cfg.train.max_epochs}", leave=False, dynamic_ncols=True,
                    file=sys.stderr, mininterval=1.0)

    def _train_step(self, epoch: int, s: int, order) -> float:
        """One optimizer step; returns the step's training loss (all ranks)."""
        cfg, info = self.cfg, self.info
        global_idx = self.sampler.global_batch(epoch, s, order)
        n_mol = float(len(global_idx))
        n_atoms = float(self.train_atoms[global_idx].sum())
        micro = self.sampler.micro_batches(global_idx)
        local = 0.0
        for i, idx in enumerate(micro):
            batch = collate(self.train_ds, idx, self.device)
            with self.engine.micro_context():
                out = self.engine.micro_step(batch)
                terms = steps.loss_parts(out, batch, cfg, self.loss_scale, n_mol, n_atoms)
                local += float(terms.loss.detach())
                # backward even for a non-finite loss: the other ranks' backward waits on this
                # rank's gradient collectives; the step is refused below, before any update
                self.engine.backward(terms.loss)
            del out, terms
            if i < len(micro) - 1:
                self.engine.after_micro()
        t = torch.tensor([local if math.isfinite(local) else 0.0, 0.0 if math.isfinite(local) else 1.0],
                         dtype=torch.float64)
        if info.initialized and info.world_size > 1:
            if info.backend == "nccl":
                t = t.to(self.device)
            torch.distributed.all_reduce(t)
            t = t.cpu()
        if float(t[1]) > 0 or not math.isfinite(float(t[0])):
            raise TrainingError(
                f"non-finite training loss at epoch {epoch}, batch {s + 1} of {self.steps_per_epoch} (step {self.step + 1}); "
                f"stopped; the last good checkpoint is kept: {self.run / 'last.pt' if (self.run / 'last.pt').exists() else 'none yet'}"
                " (lower optim.lr, or set train.grad_clip)")
        self.engine.step(self.schedule(self.step))
        if self.ema is not None:
            self.ema.update(dict(self.engine.named_full_parameters()))
        return float(t[0]) / (self.partitions if self.partitions > 1 else 1)

    def _evaluate(self, indices, label: str) -> dict:
        module = self._eval_module()
        return evaluate(module, self.dataset, indices, self.cfg, self.device, rank=self.dp_rank, world=self.dp_world,
                        group=self.dp_group)

    def _end_of_epoch(self, train_loss: float, final: bool) -> None:
        cfg, info = self.cfg, self.info
        metrics = {}
        is_best = False
        if self.epoch % cfg.train.eval_every == 0 or final:
            if len(self.val_idx):
                metrics = self._evaluate(self.val_idx, "val")
                f = metrics["force_mae_meV_per_A"]
                if f < self.best:
                    self.best, self.best_epoch, is_best = f, self.epoch, True
            elif self.best_epoch is None or final:
                is_best = True  # no validation frames: the latest weights are the best we know
                self.best_epoch = self.epoch
        lr = self.schedule(max(self.step - 1, 0))
        if info.is_main:
            row = {"epoch": self.epoch, "step": self.step, "lr": lr, "train_loss": train_loss,
                   "val_energy_mae_meV": metrics.get("energy_mae_meV"),
                   "val_force_mae_meV_per_A": metrics.get("force_mae_meV_per_A"), "time": round(self.elapsed(), 3)}
            self.run.append_metrics(row)
            if self.writer is not None and metrics:
                self.writer.add_scalar("val/energy_mae_meV", metrics["energy_mae_meV"], self.step)
                self.writer.add_scalar("val/force_mae_meV_per_A", metrics["force_mae_meV_per_A"], self.step)
                self.writer.add_scalar("train/epoch_loss", train_loss, self.step)
                self.writer.flush()
            if metrics:
                log.info("epoch %4d/%d  step %7d  lr %.3e  train loss %.5f  val energy MAE %9.3f meV  "
                         "val force MAE %9.3f meV/Å%s  [%.0f s]", self.epoch, cfg.train.max_epochs, self.step, lr,
                         train_loss, metrics["energy_mae_meV"], metrics["force_mae_meV_per_A"],
                         "  *best" if is_best else "", self.elapsed())
            else:
                log.info("epoch %4d/%d  step %7d  lr %.3e  train loss %.5f  [%.0f s]", self.epoch,
                         cfg.train.max_epochs, self.step, lr, train_loss, self.elapsed())
        self._save(metrics, is_best)

    def _finish(self) -> dict:
        cfg, info = self.cfg, self.info
        best_path = self.run / "best.pt"
        if not best_path.exists():
            _barrier(info)
        best = ckpt_io.load_checkpoint(best_path)
        best_val = (best.get("metrics") or {}).get("force_mae_meV_per_A")  # of the weights tested below
        if best_val is None and math.isfinite(self.best) and best.get("epoch") == self.best_epoch:
            best_val = self.best
        module = self.eval_wrapper
        ckpt_io.load_model_state(self.template, best["model"], best_path)
        test_idx = np.asarray(self.splits["test"])
        metrics = evaluate(module, self.dataset, test_idx, cfg, self.device, rank=self.dp_rank, world=self.dp_world,
                           group=self.dp_group) if len(test_idx) else {}
        results = {
            "test_energy_mae_meV": metrics.get("energy_mae_meV"),
            "test_force_mae_meV_per_A": metrics.get("force_mae_meV_per_A"),
            "test_energy_mae_kcal_per_mol": metrics.get("energy_mae_kcal_per_mol"),
            "test_force_mae_kcal_per_mol_per_A": metrics.get("force_mae_kcal_per_mol_per_A"),
            "test_energy_rmse_meV": metrics.get("energy_rmse_meV"),
            "test_force_rmse_meV_per_A": metrics.get("force_rmse_meV_per_A"),
            "n_test_frames": int(metrics.get("n_frames", 0)),
            "checkpoint": str(best_path),
            "best_epoch": best.get("epoch"),
            "best_val_force_mae_meV_per_A": best_val,
            "epochs": self.epoch,
            "steps": self.step,
            "wall_time_s": round(self.elapsed(), 1),
            "device": str(self.device),
            # CUDA: the largest memory_allocated of this rank over the run (training steps dominate)
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None,
            "units": "energy MAE meV per molecule; force MAE meV/Å per component; kcal/mol twins",
            "dataset": str(self.dataset.path),
        }
        if info.is_main:
            ckpt_io.write_json(self.run / "results.json", results)
            if metrics:
                log.info("test (best.pt, epoch %s, %d frames): energy MAE %.3f meV (%.4f kcal/mol), force MAE %.3f meV/Å "
                         "(%.4f kcal/mol/Å)", best.get("epoch"), results["n_test_frames"], results["test_energy_mae_meV"],
                         results["test_energy_mae_kcal_per_mol"], results["test_force_mae_meV_per_A"],
                         results["test_force_mae_kcal_per_mol_per_A"])
            if cfg.logging.plot:
                plot_learning_curve(self.run.read_metrics(), self.run / "learning_curve.png")
            log.info("done in %.0f s; results: %s", self.elapsed(), self.run / "results.json")
        return results

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if getattr(self, "info", None) is not None and getattr(self, "run", None) is not None and self.info.is_main \
                and self.cfg.logging.plot and (self.run / "metrics.csv").exists() and not (self.run / "learning_curve.png").exists():
            try:
                plot_learning_curve(self.run.read_metrics(), self.run / "learning_curve.png")
            except Exception:  # noqa: BLE001 - a plot never hides the real error
                pass
        _teardown_logging(self.handlers)
        self.handlers = []


def run(config: Config, resume: Optional[str] = None, *, stop_after_epochs: Optional[int] = None) -> Optional[dict]:
    """Train with ``config``; with ``resume=RUN_DIR`` continue that run from its ``last.pt``.

    Returns the test results (also in ``results.json``), or None when stopped early by
    ``stop_after_epochs`` (a simulated interruption, for tests).
    """
    trainer = Trainer(config, resume=resume, stop_after_epochs=stop_after_epochs)
    threads = torch.get_num_threads()
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()
        runtime.shutdown_distributed()
        torch.set_num_threads(threads)


__all__ = ["run", "Trainer", "CSV_COLUMNS", "plot_learning_curve"]
