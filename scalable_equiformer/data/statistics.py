"""Normalisation statistics of a training split (never module constants).

``compute_statistics(dataset, cutoff)`` -> :class:`DatasetStatistics`:

* ``energy_per_atom_mean`` (eV/atom): mean over frames of E / n_atoms — the per-atom energy shift;
* ``force_rms`` (eV/Å): root mean square of all force components — the energy/force scale;
* ``avg_num_neighbors``: mean number of neighbours within ``cutoff`` per atom (edges / atoms);
* ``avg_num_atoms``: mean number of atoms per frame;
* ``energy_mean`` / ``energy_std`` (eV): mean and sample standard deviation (ddof 1) of the total
  energies of *all* training frames — the original Equiformer's target normalisation
  (``model.energy_normalization: total_mean_std``); ``num_atoms``: the atom count when every
  frame has the same one, else None. These three are None in statistics stored before they existed.

Frames are subsampled evenly to at most ``max_frames`` (default 2,000). Datasets with bulk
tensors (``positions`` [n, N, 3], ``energies`` [n], ``forces`` [n, N, 3], ``z`` [N]) are read
in bulk, including through a ``torch.utils.data.Subset``; anything else is iterated item by item
(``pos``, ``z``, ``energy``, ``forces``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import numpy as np
import torch

from ..errors import DataError

log = logging.getLogger(__name__)

_FIELDS = ("energy_per_atom_mean", "force_rms", "avg_num_neighbors", "avg_num_atoms")
_OPTIONAL = ("energy_mean", "energy_std", "num_atoms")


@dataclasses.dataclass(frozen=True)
class DatasetStatistics:
    energy_per_atom_mean: float  # eV / atom (energy shift per atom)
    force_rms: float  # eV / Å (energy and force scale)
    avg_num_neighbors: float  # neighbours within the cutoff, per atom
    avg_num_atoms: float  # atoms per frame
    energy_mean: Optional[float] = None  # eV, mean total energy
    energy_std: Optional[float] = None  # eV, sample standard deviation of the total energies
    num_atoms: Optional[int] = None  # atoms per frame when all frames have the same count

    def __post_init__(self) -> None:
        for name in _FIELDS + _OPTIONAL:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"statistic {name} must be a finite number, got {value!r}")
        bad = [f"{name}={getattr(self, name)!r}" for name in ("force_rms", "avg_num_neighbors", "avg_num_atoms")
               if getattr(self, name) <= 0]
        if bad:
            raise DataError("statistics force_rms, avg_num_neighbors and avg_num_atoms must be > 0, "
                            f"got {', '.join(bad)}")

    def to_dict(self) -> dict:
        out = {name: float(getattr(self, name)) for name in _FIELDS}
        for name in _OPTIONAL:
            value = getattr(self, name)
            out[name] = None if value is None else (int(value) if name == "num_atoms" else float(value))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetStatistics":
        unknown = sorted(set(d) - set(_FIELDS) - set(_OPTIONAL))
        missing = sorted(set(_FIELDS) - set(d))
        if unknown or missing:
            raise DataError(f"dataset statistics: unknown keys {unknown}, missing keys {missing}")
        opt = {name: d.get(name) for name in _OPTIONAL}
        opt = {k: (None if v is None else (int(v) if k == "num_atoms" else float(v))) for k, v in opt.items()}
        return cls(**{name: float(d[name]) for name in _FIELDS}, **opt)

    def describe(self) -> str:
        total = (f", total energy mean {self.energy_mean:.6f} eV, std {self.energy_std:.6f} eV"
                 if self.energy_mean is not None and self.energy_std is not None else "")
        return (
            f"energy per atom {self.energy_per_atom_mean:.6f} eV/atom, force RMS {self.force_rms:.6f} eV/Å, "
            f"avg neighbours {self.avg_num_neighbors:.4f}, avg atoms {self.avg_num_atoms:.4f}{total}"
        )


def _bulk(dataset):
    """(positions [n,N,3], energies [n], forces [n,N,3], z [N]) as tensors, or None."""
    indices = None
    base = dataset
    if isinstance(dataset, torch.utils.data.Subset):
        indices, base = list(dataset.indices), dataset.dataset
    if not all(hasattr(base, a) for a in ("positions", "energies", "forces", "z")):
        return None
    arrays = (getattr(base, a) for a in ("positions", "energies", "forces", "z"))
    pos, energies, forces, z = (t if torch.is_tensor(t) else torch.as_tensor(np.asarray(t)) for t in arrays)
    if indices is not None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        pos, energies, forces = pos[idx], energies[idx], forces[idx]
    return pos, energies.reshape(-1), forces, z.reshape(-1)


def count_edges(pos, cutoff: float) -> int:
    """Directed edges i != j with ``|r_ij| < cutoff`` (exact differences: what a radius graph without
    a neighbour cap gives), summed over frames. ``pos``: [N, 3] or [frames, N, 3] Å, tensor or array.

    The one neighbour counter of the package (statistics, memory estimates, the profiler). Memory:
    about 2M pair distances at a time (frames batched for small molecules, rows of one frame for
    large ones).
    """
    p = (pos if torch.is_tensor(pos) else torch.as_tensor(np.asarray(pos))).to(torch.float64)
    if p.dim() == 2:
        p = p.unsqueeze(0)
    frames, n_atoms = p.shape[0], p.shape[1]
    budget = 1 << 21
    r2 = cutoff * cutoff
    total = 0
    if n_atoms * n_atoms <= budget:
        chunk = max(1, budget // max(n_atoms * n_atoms, 1))
        for s in range(0, frames, chunk):
            c = p[s : s + chunk]
            total += int(((c[:, :, None, :] - c[:, None, :, :]).pow(2).sum(-1) < r2).sum())
    else:
        rows = max(1, budget // n_atoms)
        for f in p:
            for s in range(0, n_atoms, rows):
                total += int(((f[s : s + rows, None, :] - f[None, :, :]).pow(2).sum(-1) < r2).sum())
    return total - frames * n_atoms  # the self pairs (distance 0)


def shortest_distance(pos) -> float:
    """The shortest distance between two atoms of one frame (Å) over ``pos`` [N, 3] or
    [frames, N, 3]; inf with fewer than two atoms."""
    p = (pos if torch.is_tensor(pos) else torch.as_tensor(np.asarray(pos))).to(torch.float64)
    if p.dim() == 2:
        p = p.unsqueeze(0)
    n_atoms = p.shape[1]
    best = math.inf
    if n_atoms < 2:
        return best
    eye = torch.eye(n_atoms, dtype=torch.bool)
    for f in p:  # only on an error path
        d2 = (f[:, None, :] - f[None, :, :]).pow(2).sum(-1).masked_fill(eye, math.inf)
        best = min(best, float(d2.min().sqrt()))
    return best


def check_training_split(path, n_atoms_min: int, f_rms: float, edges: int, cutoff: float, frames: int,
                         pos=None) -> None:
    """One DataError line naming the file for a training split the model cannot learn from: a
    one-atom molecule, no two atoms within ``cutoff`` in any frame (graphs without edges), or all
    forces zero. ``frames``: the frames looked at; ``pos``: their positions (for the message)."""
    where = f"{path}: " if path is not None else ""
    if n_atoms_min < 2:
        raise DataError(f"{where}a molecule of the training split has {n_atoms_min} atom(s); the model learns "
                        "from atom pairs and needs molecules of at least 2 atoms")
    if edges == 0:
        shortest = f" (shortest distance {shortest_distance(pos):.4g} Å)" if pos is not None else ""
        raise DataError(f"{where}no two atoms are closer than model.cutoff = {cutoff:g} Å in the {frames} training "
                        f"frames read{shortest}: the radius graph has no edges; raise model.cutoff")
    if not f_rms > 0:
        raise DataError(f"{where}every force of the {frames} training frames read is zero: the energy and force "
                        "scale (force RMS) is undefined; the file's forces are missing or not stored")


def _even_subsample(n: int, max_frames: int) -> torch.Tensor:
    if n <= max_frames:
        return torch.arange(n)
    return torch.linspace(0, n - 1, max_frames, dtype=torch.float64).round().long()


def compute_statistics(dataset, cutoff: float, max_frames: int = 2000) -> DatasetStatistics:
    """Statistics of ``dataset`` (the training split) for a model with this ``cutoff`` (Å)."""
    n = len(dataset)
    if n == 0:
        raise DataError("cannot compute statistics of an empty training split")
    bulk = _bulk(dataset)
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    path = getattr(base, "path", None)
    if bulk is not None:
        pos, energies, forces, z = bulk
        energies_all = energies
        sel = _even_subsample(pos.shape[0], max_frames)
        pos, energies, forces = (t[sel].to(torch.float64) for t in (pos, energies, forces))
        n_atoms = z.numel()
        e_per_atom = float((energies / n_atoms).mean())
        f_rms = float(forces.pow(2).mean().sqrt())
        edges = count_edges(pos, cutoff)
        check_training_split(path, n_atoms, f_rms, edges, cutoff, pos.shape[0], pos)
        avg_neighbors = edges / (pos.shape[0] * n_atoms)
        avg_atoms = float(n_atoms)
        all_e = energies_all.to(torch.float64)
        fixed_atoms = n_atoms
    else:
        sel = _even_subsample(n, max_frames).tolist()
        e_sum = f_sq = 0.0
        f_count = edges = atoms = 0
        min_atoms = None
        for i in sel:
            item = dataset[i]
            p = torch.as_tensor(item.pos, dtype=torch.float64)
            na = p.shape[0]
            e_sum += float(torch.as_tensor(item.energy, dtype=torch.float64).reshape(-1)[0]) / na
            f = torch.as_tensor(item.forces, dtype=torch.float64)
            f_sq += float(f.pow(2).sum())
            f_count += f.numel()
            edges += count_edges(p, cutoff)
            atoms += na
            min_atoms = na if min_atoms is None else min(min_atoms, na)
        e_per_atom = e_sum / len(sel)
        f_rms = math.sqrt(f_sq / max(f_count, 1))
        check_training_split(path, min_atoms, f_rms, edges, cutoff, len(sel))
        avg_neighbors = edges / atoms
        avg_atoms = atoms / len(sel)
        items = [dataset[i] for i in range(n)]
        all_e = torch.tensor([float(torch.as_tensor(it.energy, dtype=torch.float64).reshape(-1)[0]) for it in items],
                             dtype=torch.float64)
        counts = {int(torch.as_tensor(it.pos).shape[0]) for it in items}
        fixed_atoms = counts.pop() if len(counts) == 1 else None
    e_mean = float(all_e.mean())
    e_std = float(all_e.std()) if all_e.numel() > 1 else None  # torch's default: sample std (ddof 1), as the original
    stats = DatasetStatistics(e_per_atom, f_rms, float(avg_neighbors), float(avg_atoms), e_mean, e_std, fixed_atoms)
    log.info("training-split statistics (%d of %d frames, cutoff %.3f Å): %s", len(sel), n, cutoff, stats.describe())
    return stats
