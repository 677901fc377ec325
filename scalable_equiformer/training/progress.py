"""What a run reports while it trains: the log header, the progress bar, the ``metrics.csv`` rows and
TensorBoard scalars of each logged interval and epoch, and the epoch log line (rank 0 writes).

:class:`ProgressLog` holds these methods of the :class:`~.trainer.Trainer` (a mixin: they read the
Trainer's attributes). Units are stated in the header (:data:`.metrics.UNITS_HEADER`).
"""

from __future__ import annotations

import logging
import sys

import torch

from .metrics import UNITS_HEADER
from .run_folder import EPOCH_ROW, STEP_ROW

log = logging.getLogger("scalable_equiformer.training")

#: how best.pt is chosen (the trainer's ``_end_of_epoch``), as the log header says it
BEST_RULE = ("the evaluated epoch with the lowest validation force MAE (meV/Å per component), marked *best "
             "in the epoch lines")
BEST_RULE_NO_VAL = ("no validation frames (data.val_size 0), so no *best: the latest weights, written at the first "
                    "evaluation and at the end")


class ProgressLog:
    """The Trainer's reporting methods."""

    def _open_writers(self) -> None:
        if not self.info.is_main:
            return
        if self.resume is not None:  # drop rows written after the checkpoint we resume from
            self.run.keep_metrics_until(self.step, self.epoch)
        if self.cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run / "tensorboard"),
                                            purge_step=self.step if self.resume else None)
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
        threads = ""
        if self.device.type == "cpu":
            threads = f", {torch.get_num_threads()} torch thread(s) per rank (OMP_NUM_THREADS)"
        log.info("parallel: %d rank(s) (%s, %s backend, launcher %s) = %d data-parallel x %d graph partitions; on %s%s",
                 info.world_size, ds, info.backend, info.launcher, self.dp_world, self.partitions, self.device, threads)
        log.info("batch %d molecules per step = %d rank(s) x %d micro-batch(es) x %d; %d steps per epoch, %d epochs, "
                 "%d steps in all", self.plan.batch_size, self.dp_world, self.plan.grad_accum,
                 self.plan.micro_batch_size, self.steps_per_epoch, cfg.train.max_epochs, self.total_steps)
        log.info("loss: %s, energy weight %g, force weight %g, divided by the model's energy scale %.4f eV (%s); "
                 "AdamW lr %g (warm-up %g epochs from %g, %s to %g), weight decay %g%s",
                 cfg.train.loss, cfg.train.energy_weight, cfg.train.force_weight, self.loss_scale,
                 cfg.model.energy_normalization, cfg.optim.lr,
                 cfg.optim.warmup_epochs, cfg.optim.warmup_lr, cfg.optim.scheduler, cfg.optim.min_lr,
                 cfg.optim.weight_decay, f", EMA {cfg.train.ema_decay}" if self.ema else "")
        log.info("best.pt: %s", BEST_RULE if len(self.val_idx) else BEST_RULE_NO_VAL)

    def _bar(self, epoch: int):
        if not (self.info.is_main and self.cfg.train.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch * self.plan.batch_size, unit="mol", unit_scale=False,
                    desc=f"epoch {epoch}/{self.cfg.train.max_epochs}", leave=False, dynamic_ncols=True,
                    file=sys.stderr, mininterval=1.0)

    def _log_interval(self, epoch: int, train_loss: float) -> None:
        """A ``metrics.csv`` row (and TensorBoard scalars) of the mean loss since the last one (rank 0)."""
        row = {"epoch": epoch, "step": self.step, "lr": self.schedule(self.step - 1),
               "train_loss": train_loss, "time": round(self.elapsed(), 3), "kind": STEP_ROW}
        self.run.append_metrics(row)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", row["train_loss"], self.step)
            self.writer.add_scalar("train/lr", row["lr"], self.step)

    def _log_epoch(self, train_loss: float, metrics: dict, is_best: bool, lr: float) -> None:
        """The epoch's ``metrics.csv`` row, TensorBoard scalars and log line (rank 0)."""
        cfg = self.cfg
        row = {"epoch": self.epoch, "step": self.step, "lr": lr, "train_loss": train_loss,
               "val_energy_mae_meV": metrics.get("energy_mae_meV"),
               "val_force_mae_meV_per_A": metrics.get("force_mae_meV_per_A"), "time": round(self.elapsed(), 3),
               "kind": EPOCH_ROW}
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


__all__ = ["ProgressLog"]
