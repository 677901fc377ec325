"""The Trainer: set-up (each step a method of its own), epochs of optimizer steps, evaluation,
EMA, the end-of-run test; ``run(config, resume=None)`` is the whole job (``train.py`` only parses
arguments).

Its other jobs live beside it: the optimizer step in :mod:`.steps` (shared with the memory
profiler), checkpoints and resume in :mod:`.run_state`, the run folder (layout, ``metrics.csv``,
the plot) in :mod:`.run_folder`, the log header and metric rows in :mod:`.progress`, the end of a
run (non-finite stops, the test of ``best.pt``, clean-up) in :mod:`.run_end`, process-wide
state and collectives in :mod:`scalable_equiformer.runtime`.

Units: energies eV and forces eV/Å inside; metrics in meV (per molecule) and meV/Å (per force
component), stated in every log header.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import runtime
from ..config import Config
from ..data.dataset import resolve_data_path
from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from . import checkpoint as ckpt_io
from . import steps
from .batches import BatchPlan, StepSampler, atom_counts, collate
from .ema import EMA
from .engine import DeepSpeedEngine, PlainEngine, use_deepspeed
from .metrics import evaluate
from .progress import ProgressLog
from .run_folder import RunFolder, create_run_folder, lock_run_folder, new_run_path
from .run_end import RunEnd
from .run_state import CheckpointSteps, check_same_data, data_fingerprint, read_resume_checkpoint
from .schedule import LRSchedule

log = logging.getLogger("scalable_equiformer.training")

# ---- the trainer ----------------------------------------------------------------------------

class Trainer(CheckpointSteps, ProgressLog, RunEnd):
    """One training run (``run`` makes one, calls ``setup``, ``train`` and ``close``)."""

    def __init__(self, cfg: Config, resume: Optional[str] = None, stop_after_epochs: Optional[int] = None):
        self.cfg = cfg
        self.resume = Path(resume) if resume is not None else None
        self.stop_after_epochs = stop_after_epochs
        self.handlers: list[logging.Handler] = []
        self.writer = None
        self.lock_fd = None  # rank 0: the run folder's lock, held until close()
        self.saved_epoch = None  # the epoch of the last.pt this run wrote or resumed from

    # -- set-up --
    def setup(self) -> None:
        """Everything before the first step, in order; each step is a method below."""
        cfg = self.cfg
        self.resume_ckpt = read_resume_checkpoint(self.resume, cfg) if self.resume is not None else None
        self._start_process()
        self._parallel_layout()
        exc = init = None
        try:  # the data and its statistics are checked before the run folder is made
            self._load_data()
            init = self._statistics()
        except (DataError, ConfigError) as e:
            exc = e
        runtime.error_everywhere(exc, self.info, self.device)
        self._open_run_folder()
        self.handlers += self._file_log()
        self._build_engine(init)
        self._schedule()
        self._initial_state()
        self._open_writers()
        self._log_header()

    def _start_process(self) -> None:
        """DeepSpeed or not, the process group and device, logging, TF32 off, seeds."""
        cfg = self.cfg
        info0 = runtime.launch_env()
        self.use_ds = use_deepspeed(cfg, info0.launcher, info0.world_size)
        if self.use_ds and cfg.train.compile:  # deepspeed.enabled=auto chose DeepSpeed for this launch
            raise ConfigError("train.compile=true is not supported under DeepSpeed (chosen by deepspeed.enabled=auto "
                              f"for {info0.world_size} ranks, launcher {info0.launcher}): set deepspeed.enabled=false "
                              "(plain torch data parallel) or train.compile=false")
        self.info, self.device = runtime.init_distributed(self.use_ds, cfg.train.device)
        self.handlers = runtime.setup_logging(self.info.is_main, cfg.logging.level, None)
        runtime.configure_tf32(False)
        runtime.seed_everything(cfg.train.seed)

    def _parallel_layout(self) -> None:
        """world = D data-parallel groups x P graph partitions; the batch plan over the D groups."""
        cfg, info = self.cfg, self.info
        P = cfg.parallel.graph_partitions
        self.partitions = P
        self.dp_group = self.part_group = None
        if P > 1:
            from ..parallel.partitioned import check_layout, make_groups
            check_layout(info.world_size, P, info.local_world_size)
            self.dp_group, self.part_group = make_groups(info.world_size, P)
        self.dp_world = info.world_size // P
        self.dp_rank = info.rank // P
        self.plan = BatchPlan.from_config(cfg, self.dp_world)

    def _statistics(self) -> Optional[dict]:
        """The normalisation statistics (resumed run: its own; ``train.init_from``: the checkpoint's
        when ``train.init_statistics`` says so; else the training split's). Returns the
        ``train.init_from`` checkpoint, or None."""
        from ..data.statistics import DatasetStatistics, compute_statistics

        cfg = self.cfg
        init = None
        if self.resume_ckpt is not None:
            self.stats = DatasetStatistics.from_dict(self.resume_ckpt["stats"])
        else:
            init = ckpt_io.read_init_checkpoint(cfg) if cfg.train.init_from else None
            if init is not None and cfg.train.init_statistics == "checkpoint":
                self.stats = DatasetStatistics.from_dict(init["stats"])
            else:
                self.stats = compute_statistics(self.train_ds, cfg.model.cutoff)
        return init

    def _build_model(self, init: Optional[dict]) -> torch.nn.Module:
        """The bare model on the device, seeded, with ``train.init_from`` weights."""
        from ..model import build_model, normalization_constants

        cfg = self.cfg
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
        return model.to(self.device)

    def _build_engine(self, init: Optional[dict]) -> None:
        """The model, its evaluation copy, the partition wrapper, the engine and the EMA."""
        import copy

        cfg, info = self.cfg, self.info
        model = self._build_model(init)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.template = copy.deepcopy(model)  # a plain module to evaluate EMA / gathered / best weights
        if self.partitions > 1:  # the levers' runner runs inside the partitioned model
            from ..memory import ForceRunner
            from ..parallel.partitioned import PartitionedModel

            runner = ForceRunner(cfg.memory)
            model = PartitionedModel(model, self.part_group, runner=runner)
            self.eval_wrapper = PartitionedModel(self.template, self.part_group, runner=runner)
        else:
            from ..memory import with_levers

            model, self.eval_wrapper = with_levers(model, cfg.memory), with_levers(self.template, cfg.memory)
        if self.use_ds:
            self.engine = DeepSpeedEngine(model, cfg, self.plan, info.world_size)
        else:
            self.engine = PlainEngine(model, cfg, self.plan, group=None, world=info.world_size)
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = EMA(dict(self.engine.named_full_parameters()), cfg.train.ema_decay)

    def _schedule(self) -> None:
        """Steps per epoch, the total (``train.max_steps`` caps it) and the LR schedule."""
        cfg = self.cfg
        self.steps_per_epoch = self.sampler.steps_per_epoch
        total = cfg.train.max_epochs * self.steps_per_epoch
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        self.total_steps = total
        self.schedule = LRSchedule.from_config(cfg.optim, self.steps_per_epoch, total)

    def _initial_state(self) -> None:
        """Epoch, step and best of a new run, or those of the resumed one (best.pt repaired)."""
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.best = math.inf
        self.best_epoch = None
        self.elapsed_before = 0.0
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
            exc = None
            if self.info.is_main:
                try:
                    self._repair_best()
                except CheckpointError as e:
                    exc = e
            runtime.error_everywhere(exc, self.info, self.device)

    def _load_data(self) -> None:
        from ..data import load_dataset, load_index_split, load_splits, make_splits

        cfg = self.cfg
        self.dataset = load_dataset(resolve_data_path(cfg.data.path, cfg.data.root) if cfg.data.path else cfg.data.name,
                                    root=cfg.data.root)
        n = len(self.dataset)
        self.data_fingerprint = data_fingerprint(self.dataset)  # recorded in every checkpoint
        if self.resume is not None:
            check_same_data(self.resume_ckpt, self.data_fingerprint, self.resume / "last.pt")
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
                    self.lock_fd = lock_run_folder(path, resume=True)
                else:
                    path = new_run_path(cfg)
                    self.lock_fd = create_run_folder(path, cfg, self.splits, self.dataset)
            except (ConfigError, OSError) as e:
                exc = e if isinstance(e, ConfigError) else ConfigError(f"{path}: cannot write the run folder ({e})")
        runtime.error_everywhere(exc, info, self.device)
        self.run = RunFolder(Path(runtime.broadcast_object(str(path), info)))

    def _file_log(self) -> list[logging.Handler]:
        """``train.log`` (rank 0); a log file that cannot be opened stops every rank in one line."""
        handlers, exc = [], None
        if self.info.is_main:
            try:
                handlers = [runtime.add_log_file(self.run / "train.log")]
            except OSError as e:
                exc = ConfigError(f"{self.run / 'train.log'}: cannot write ({ckpt_io.os_reason(e)})")
        runtime.error_everywhere(exc, self.info, self.device)
        return handlers

    # -- the weights evaluated --
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
                    self._log_interval(epoch, interval_loss / interval_n)
                    interval_loss, interval_n = 0.0, 0
            if bar is not None:
                bar.close()
            self.epoch = epoch
            self._end_of_epoch(epoch_loss / max(epoch_n, 1), final=done or epoch == cfg.train.max_epochs)
            epochs_this_session += 1
            if self.stop_after_epochs is not None and epochs_this_session >= self.stop_after_epochs \
                    and self.epoch < cfg.train.max_epochs and not done:
                log.info("stopping after %d epoch(s) as asked; continue with --resume %s", epochs_this_session,
                         self.run.path)
                return None
        return self._finish()

    def _train_step(self, epoch: int, s: int, order) -> float:
        """One optimizer step (:func:`.steps.optimizer_step`), then the EMA; returns the step's
        training loss (all ranks)."""
        global_idx = self.sampler.global_batch(epoch, s, order)
        try:
            loss = steps.optimizer_step(
                self.engine, self.sampler.micro_batches(global_idx), self.cfg, self.schedule(self.step),
                n_molecules=float(len(global_idx)), n_atoms=float(self.train_atoms[global_idx].sum()),
                loss_scale=self.loss_scale, load=lambda idx: collate(self.train_ds, idx, self.device),
                info=self.info, device=self.device)
        except steps.NonFiniteLoss:
            raise TrainingError(
                f"non-finite training loss at epoch {epoch}, batch {s + 1} of {self.steps_per_epoch} "
                f"(step {self.step + 1}); "
                f"stopped; {self._kept_hint()}") from None
        if self.ema is not None:
            self.ema.update(dict(self.engine.named_full_parameters()))
        return loss

    def _evaluate(self, indices, label: str) -> dict:
        module = self._eval_module()
        return evaluate(module, self.dataset, indices, self.cfg, self.device, rank=self.dp_rank, world=self.dp_world,
                        group=self.dp_group)

    def _end_of_epoch(self, train_loss: float, final: bool) -> None:
        cfg, info = self.cfg, self.info
        metrics = {}
        is_best = False
        self._check_finite_weights()
        if self.epoch % cfg.train.eval_every == 0 or final:
            if len(self.val_idx):
                metrics = self._evaluate(self.val_idx, "val")
                self._check_finite_metrics(metrics)
                f = metrics["force_mae_meV_per_A"]
                if f < self.best:
                    self.best, self.best_epoch, is_best = f, self.epoch, True
            elif self.best_epoch is None or final:
                is_best = True  # no validation frames: the latest weights are the best we know
                self.best_epoch = self.epoch
        lr = self.schedule(max(self.step - 1, 0))
        if info.is_main:
            self._log_epoch(train_loss, metrics, is_best, lr)
        self._save(metrics, is_best)



def run(config: Config, resume: Optional[str] = None, *, stop_after_epochs: Optional[int] = None) -> Optional[dict]:
    """Train with ``config``; with ``resume=RUN_DIR`` continue that run from its ``last.pt``.

    Returns the test results (also in ``results.json``), or None when stopped early by
    ``stop_after_epochs`` (a simulated interruption, for tests).
    """
    trainer = Trainer(config, resume=resume, stop_after_epochs=stop_after_epochs)
    threads = torch.get_num_threads()
    try:
        with runtime.sigterm_as_interrupt():  # SIGTERM (schedulers) stops like Ctrl-C, with a line
            trainer.setup()
            return trainer.train()
    except KeyboardInterrupt as exc:
        trainer.log_stop(exc)
        raise
    finally:
        trainer.close()
        runtime.shutdown_distributed()
        torch.set_num_threads(threads)


__all__ = ["run", "Trainer"]
