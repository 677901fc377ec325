"""The trainer's state in checkpoints: what ``last.pt`` and ``best.pt`` hold, writing them at the
end of each epoch, and resuming a run from them (file format and safe writes: :mod:`.checkpoint`).

:func:`read_resume_checkpoint` checks a ``--resume`` folder against the config before anything
starts. :class:`CheckpointSteps` holds the :class:`~.trainer.Trainer`'s methods that read and write
its state (epoch, step, best, engine, EMA, RNG): ``_save`` each epoch (``last.pt`` first, then
``best.pt``, so a run stopped between the two is repaired by ``_repair_best`` on resume) and
``_restore`` from ``last.pt``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .. import runtime
from ..errors import CheckpointError, DataError, TrainingError
from . import checkpoint as ckpt_io
from .run_folder import check_not_locked

log = logging.getLogger("scalable_equiformer.training")

#: the data settings a resumed run must share with the run it continues
RESUME_DATA_KEYS = ("name", "path", "train_size", "val_size", "test_size", "seed", "split_index")


def data_fingerprint(dataset) -> dict:
    """What identifies the data a run trains on, recorded in every checkpoint (``data``): the file,
    frames, atoms and a sha256 over the arrays read (z, positions, energies, forces in package
    units, with their dtypes and shapes)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for t in (dataset.z, dataset.positions, dataset.energies, dataset.forces):
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return {"path": str(dataset.path), "frames": len(dataset), "atoms": dataset.num_atoms, "sha256": h.hexdigest()}


def check_same_data(ck: dict, now: dict, path: Path) -> None:
    """DataError naming what differs when the data of a resumed run are not those it trained on
    (checkpoints written before the fingerprint existed are not checked)."""
    was = ck.get("data")
    if not isinstance(was, dict) or "sha256" not in was:
        log.warning("%s: records no fingerprint of its data (written by an older version): not checked", path)
        return
    if was.get("sha256") == now["sha256"] and was.get("frames") == now["frames"]:
        return
    diff = []
    if was.get("path") != now["path"]:
        diff.append(f"file {was.get('path')} then, {now['path']} now")
    if was.get("frames") != now["frames"]:
        diff.append(f"{was.get('frames')} frames then, {now['frames']} now")
    if was.get("atoms") != now["atoms"]:
        diff.append(f"{was.get('atoms')} atoms then, {now['atoms']} now")
    diff.append(f"sha256 {str(was.get('sha256'))[:16]}... then, {now['sha256'][:16]}... now")
    raise DataError(f"{now['path']}: not the data the run in {path.parent} trained on ({'; '.join(diff)}); "
                    "--resume only on the same data (or start a new run)")


def read_resume_checkpoint(resume: Path, cfg) -> dict:
    """``<resume>/last.pt``, checked: no live process trains in ``resume``, the checkpoint exists,
    and it was written for the same model and data."""
    check_not_locked(resume, resume=True)
    if not (resume / "last.pt").exists() and (resume / "config.yaml").is_file():
        raise CheckpointError(
            f"{resume}: the run stopped before its first checkpoint (no last.pt), so there is nothing to "
            f"resume; start it again without --resume after deleting {resume} (or with another "
            "train.run_name)")
    ck = ckpt_io.load_checkpoint(resume / "last.pt")
    ckpt_io.check_same_model(ck["config"], cfg.to_dict(), resume / "last.pt")
    saved_data = ck["config"].get("data", {})
    for key in RESUME_DATA_KEYS:
        if saved_data.get(key) != getattr(cfg.data, key):
            raise CheckpointError(f"{resume / 'last.pt'}: data.{key} differs from the run being resumed "
                                  f"({saved_data.get(key)!r} vs {getattr(cfg.data, key)!r})")
    return ck


class CheckpointSteps:
    """The Trainer's checkpoint methods (a mixin: they read and set the Trainer's attributes)."""

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
            "data": self.data_fingerprint,
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
        runtime.error_everywhere(exc, self.info, self.device)  # also the barrier after the writes
        self.saved_epoch = self.epoch
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
            payload["data"] = ck.get("data", self.data_fingerprint)
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
        self.saved_epoch = self.epoch
        self.best = float(t["best"])
        self.best_epoch = t.get("best_epoch")
        self.elapsed_before = float(t.get("elapsed", 0.0))
        ckpt_io.set_rng_state(ck.get("rng"))


__all__ = ["CheckpointSteps", "RESUME_DATA_KEYS", "check_same_data", "data_fingerprint", "read_resume_checkpoint"]
