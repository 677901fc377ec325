"""Errors in the paper's units, aggregated exactly over batches and ranks.

* energy MAE: mean over molecules of |E_pred - E_ref|, in **meV per molecule**;
* force MAE: mean over all atoms and all three Cartesian **components** of |F_pred - F_ref|, in
  **meV/Å** (the MD17 convention of Equiformer, NequIP, MACE);
* kcal/mol and kcal/mol/Å twins (1 eV = 23.060547830619026 kcal/mol) for sGDML comparisons.

:class:`ErrorSums` keeps sums of errors and counts in float64; across ranks the sums and counts are
all-reduced before dividing, so a D-rank evaluation equals a one-rank evaluation (not a mean of
per-rank means).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.units import KCAL_PER_EV
from .batches import collate, eval_shards
from .loss import errors

MEV_PER_EV = 1000.0
def units_header(twins_in: str = "results.json") -> str:
    """The units line of every log header; ``twins_in`` is the file that holds the kcal/mol twins."""
    return ("units: energy MAE in meV per molecule, force MAE in meV/Å per force component "
            f"(mean over atoms and x, y, z); kcal/mol twins in {twins_in}")


UNITS_HEADER = units_header()  # the trainer's: its results.json

_FIELDS = ("e_abs", "e_sq", "f_abs", "f_sq", "f_l2", "n_mol", "n_comp", "n_atoms")


class ErrorSums:
    def __init__(self):
        self.v = torch.zeros(len(_FIELDS), dtype=torch.float64)

    def add(self, out: dict, batch) -> None:
        de, df = errors(out, batch)
        de = de.detach().to(torch.float64).cpu()
        df = df.detach().to(torch.float64).cpu()
        self.v += torch.tensor([
            float(de.abs().sum()), float(de.pow(2).sum()), float(df.abs().sum()), float(df.pow(2).sum()),
            float(torch.linalg.vector_norm(df, dim=-1).sum()), de.numel(), df.numel(), df.shape[0],
        ], dtype=torch.float64)

    def all_reduce(self, group=None) -> "ErrorSums":
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = self.v.clone()
            if torch.distributed.get_backend(group) == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
            self.v = t.cpu()
        return self

    def metrics(self, prefix: str = "") -> dict:
        s = dict(zip(_FIELDS, self.v.tolist()))
        n_mol, n_comp, n_atoms = max(s["n_mol"], 1.0), max(s["n_comp"], 1.0), max(s["n_atoms"], 1.0)
        e_mae, f_mae = s["e_abs"] / n_mol, s["f_abs"] / n_comp  # eV, eV/Å
        out = {
            "energy_mae_meV": e_mae * MEV_PER_EV,
            "force_mae_meV_per_A": f_mae * MEV_PER_EV,
            "energy_rmse_meV": math.sqrt(s["e_sq"] / n_mol) * MEV_PER_EV,
            "force_rmse_meV_per_A": math.sqrt(s["f_sq"] / n_comp) * MEV_PER_EV,
            "force_l2mae_meV_per_A": s["f_l2"] / n_atoms * MEV_PER_EV,  # per atom, |ΔF| vector norm
            "energy_mae_kcal_per_mol": e_mae * KCAL_PER_EV,
            "force_mae_kcal_per_mol_per_A": f_mae * KCAL_PER_EV,
            "n_frames": int(s["n_mol"]),
        }
        return {prefix + k: v for k, v in out.items()}


def evaluate(model, dataset, indices, cfg, device, rank: int = 0, world: int = 1, group=None,
             batch_size: int | None = None, progress=None) -> dict:
    """Metrics of ``model`` on ``dataset[indices]``, this rank's share dealt round robin, summed
    over ``group``. Every rank of the group must call it."""
    from .steps import model_call

    was_training = model.training
    model.eval()
    sums = ErrorSums()
    try:
        for idx in eval_shards(np.asarray(indices), rank, world, batch_size or cfg.train.eval_batch_size):
            batch = collate(dataset, idx, device)
            out = model_call(model, batch, cfg)
            sums.add(out, batch)
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
    return sums.all_reduce(group).metrics()


__all__ = ["ErrorSums", "evaluate", "UNITS_HEADER", "MEV_PER_EV", "KCAL_PER_EV", "units_header"]
