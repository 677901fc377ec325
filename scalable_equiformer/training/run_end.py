"""How a run ends: the non-finite stops (weights or validation), the test of ``best.pt`` and
``results.json`` (:meth:`RunEnd._finish`), the line for a run stopped by a signal
(:meth:`RunEnd.log_stop`) and the clean-up (:meth:`RunEnd.close`). A mixin of
:class:`~.trainer.Trainer`, which holds the state these methods read.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .. import runtime
from ..errors import CheckpointError, TrainingError
from . import checkpoint as ckpt_io
from .metrics import evaluate
from .run_folder import plot_learning_curve, unlock_run_folder

log = logging.getLogger("scalable_equiformer.training")


class RunEnd:
    """The end of a run (see the module docstring)."""

    def _last_good(self) -> str:
        """The last.pt this run wrote or resumed from (finite weights, finite validation), with its epoch."""
        if self.saved_epoch is None:
            return "none yet"
        return f"{self.run / 'last.pt'} (epoch {self.saved_epoch})"

    def _kept_hint(self) -> str:
        """The tail of every non-finite stop: which checkpoint is kept, and what to change."""
        return f"the last good checkpoint is kept: {self._last_good()} (lower optim.lr, or set train.grad_clip)"

    def _check_finite_weights(self) -> None:
        """Stop (every rank) before last.pt / best.pt are replaced when the weights, live or EMA,
        hold NaN or infinite values."""
        bad = ckpt_io.non_finite_tensor(self.engine.full_state_dict())  # every rank (ZeRO-3: gathered)
        if bad is None and self.ema is not None:
            bad = ckpt_io.non_finite_tensor(self.ema.shadow)
            bad = None if bad is None else f"EMA {bad}"
        exc = None if bad is None else TrainingError(
            f"non-finite weights ({bad}) after epoch {self.epoch} (step {self.step}); stopped before last.pt and "
            f"best.pt are replaced; {self._kept_hint()}")
        runtime.error_everywhere(exc, self.info, self.device)

    def _check_finite_metrics(self, metrics: dict) -> None:
        bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        exc = None if not bad else TrainingError(
            f"non-finite validation metrics after epoch {self.epoch} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(bad.items())) + "); stopped before last.pt and best.pt are "
            f"replaced; {self._kept_hint()}")
        runtime.error_everywhere(exc, self.info, self.device)

    def _finish(self) -> dict:
        cfg, info = self.cfg, self.info
        best_path = self.run / "best.pt"
        if not best_path.exists():
            runtime.barrier(info)
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
            "peak_memory_bytes": (int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda"
                                  else None),
            "units": "energy MAE meV per molecule; force MAE meV/Å per component; kcal/mol twins",
            "dataset": str(self.dataset.path),
        }
        if info.is_main:
            ckpt_io.write_json(self.run / "results.json", results)
            if metrics:
                log.info("test (best.pt, epoch %s, %d frames): energy MAE %.3f meV (%.4f kcal/mol), "
                         "force MAE %.3f meV/Å (%.4f kcal/mol/Å)", best.get("epoch"), results["n_test_frames"],
                         results["test_energy_mae_meV"], results["test_energy_mae_kcal_per_mol"],
                         results["test_force_mae_meV_per_A"],
                         results["test_force_mae_kcal_per_mol_per_A"])
            if cfg.logging.plot:
                plot_learning_curve(self.run.read_metrics(), self.run / "learning_curve.png")
            log.info("done in %.0f s; results: %s", self.elapsed(), self.run / "results.json")
        return results

    def log_stop(self, exc: KeyboardInterrupt) -> None:
        """One line on rank 0 for a run stopped by SIGTERM (:class:`runtime.Terminated`) or SIGINT:
        the signal, how far it got, its last checkpoint and how to continue; sets ``exc.logged``.
        Nothing before the run folder exists (``train.py`` says it then)."""
        run, info = getattr(self, "run", None), getattr(self, "info", None)
        if run is None or info is None or not info.is_main:
            return
        name = getattr(exc, "signal_name", "SIGINT (Ctrl-C)")
        step = getattr(self, "step", None)
        at = f" after step {step}" if step is not None else " during set-up"
        last = run / "last.pt"
        try:
            ck = ckpt_io.load_checkpoint(last) if last.is_file() else None
        except CheckpointError as e:
            log.warning("stopped by %s%s; the last checkpoint cannot be read: %s", name, at, e)
        else:
            if ck is None:
                log.warning("stopped by %s%s, before the first checkpoint (no %s): nothing to resume; start it "
                            "again after deleting %s (or with another train.run_name)", name, at, last, run.path)
            else:
                log.warning("stopped by %s%s; last checkpoint: %s (epoch %s, step %s); continue from it with: "
                            "python train.py --resume %s", name, at, last, ck.get("epoch"),
                            ck.get("step"), run.path)
        exc.logged = True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if getattr(self, "info", None) is not None and getattr(self, "run", None) is not None and self.info.is_main \
                and self.cfg.logging.plot and (self.run / "metrics.csv").exists() \
                and not (self.run / "learning_curve.png").exists():
            try:
                plot_learning_curve(self.run.read_metrics(), self.run / "learning_curve.png")
            except Exception:  # noqa: BLE001 - a plot never hides the real error
                pass
        runtime.teardown_logging(self.handlers)
        self.handlers = []
        unlock_run_folder(self.lock_fd)
        self.lock_fd = None
