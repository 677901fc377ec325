"""One file's frames in package units (:class:`RawData`), the checks every reader runs on the raw
arrays (:func:`validate_arrays`: shapes, dtypes, finite values, distinct atom positions), and
:func:`to_raw_data`, the readers' common last step (validate, convert to eV and Å, check the scale)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .units import check_energy_scale, log_assumed_unit, unit_factor


@dataclass
class RawData:
    """One file's frames in package units (numpy, float64).

    Attributes:
        z: [N] int64 atomic numbers (one molecule for all frames).
        positions: [n, N, 3] Å.
        energies: [n] eV.
        forces: [n, N, 3] eV/Å.
        path: the file read.
        name: dataset name stored in the file (or the file stem).
        theory: level of theory stored in the file ('' when absent).
        md5: the sGDML fingerprint stored in the file (hex string) or None.
        energy_unit / length_unit: the units the file was in (as written in the file or assumed).
        format: 'sgdml', 'rmd17' or 'ase'.
    """

    z: np.ndarray
    positions: np.ndarray
    energies: np.ndarray
    forces: np.ndarray
    path: Path
    name: str
    theory: str
    md5: str | None
    energy_unit: str
    length_unit: str
    format: str


def _check_finite(arr: np.ndarray, key: str, path) -> None:
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)).ravel()
        raise DataError(
            f"{path}: {key} contains NaN or inf in {bad.size} frame(s), first at frame {int(bad[0])}"
        )


def _as_float(arr: np.ndarray, key: str, path) -> np.ndarray:
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: {key} has dtype {arr.dtype}, expected numbers")
    return np.asarray(arr, dtype=np.float64)


def coincident_atoms(R: np.ndarray) -> tuple[int, int, int] | None:
    """(frame, i, j) of the first frame with two atoms i < j at the same position (distance 0),
    else None. ``R``: [n, N, 3] or [N, 3]. Sorts each frame's atoms by (x, y, z): O(n N log N)."""
    R = np.asarray(R)
    if R.ndim == 2:
        R = R[None]
    if R.shape[1] < 2:
        return None
    order = np.lexsort((R[..., 2], R[..., 1], R[..., 0]), axis=-1)  # [n, N]
    S = np.take_along_axis(R, order[..., None], axis=1)
    same = (S[:, 1:] == S[:, :-1]).all(-1)  # [n, N - 1]: neighbours in sorted order coincide
    if not same.any():
        return None
    f, k = (int(v) for v in np.argwhere(same)[0])
    i, j = sorted((int(order[f, k]), int(order[f, k + 1])))
    return f, i, j


def check_no_coincident_atoms(R: np.ndarray, path, what: str = "frame") -> None:
    """DataError naming the file, the frame and the two atoms when two atoms of a frame coincide
    (edge vectors of length 0: NaN forces, or a meaningless number)."""
    hit = coincident_atoms(R)
    if hit is not None:
        f, i, j = hit
        where = f"{what} {f}: " if what else ""
        raise DataError(f"{path}: {where}atoms {i} and {j} are at the same position (distance 0); "
                        "a molecule needs distinct atom positions")


def validate_arrays(z, R, E, F, path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes, dtypes and finiteness of raw z, R, E, F; return (z int64, R, E [n], F) float64.

    Shape rules: R [n, N, 3], F == R.shape, E [n] or [n, 1], z [N] (or [n, N] identical rows), with
    n >= 1, N >= 1. Atomic numbers are integers in 1..118.
    """
    z = np.asarray(z)
    R = np.asarray(R)
    E = np.asarray(E)
    F = np.asarray(F)
    if R.ndim != 3 or R.shape[-1] != 3:
        raise DataError(f"{path}: positions have shape {R.shape}, expected [frames, atoms, 3]")
    n, N = R.shape[0], R.shape[1]
    if n == 0 or N == 0:
        raise DataError(f"{path}: no frames or no atoms (positions shape {R.shape})")
    if F.shape != R.shape:
        raise DataError(f"{path}: forces shape {F.shape} does not match positions shape {R.shape}")
    if E.shape not in ((n,), (n, 1)):
        raise DataError(
            f"{path}: energies shape {E.shape} does not match {n} frames (expected [{n}] or [{n}, 1])"
        )
    if z.ndim == 2 and z.shape[0] == n:  # per-frame atomic numbers: must all be the same molecule
        if not (z == z[:1]).all():
            raise DataError(f"{path}: atomic numbers change between frames (one molecule expected)")
        z = z[0]
    if z.shape != (N,):
        raise DataError(f"{path}: atomic numbers shape {z.shape} does not match {N} atoms in positions")
    if z.dtype.kind not in "iuf" or (z.dtype.kind == "f" and not np.all(z == np.round(z))):
        raise DataError(f"{path}: atomic numbers must be integers, got dtype {z.dtype}")
    z = z.astype(np.int64)
    if z.min() < 1 or z.max() > 118:
        raise DataError(f"{path}: atomic numbers outside 1..118 (min {z.min()}, max {z.max()})")
    R = _as_float(R, "positions", path)
    F = _as_float(F, "forces", path)
    E = _as_float(E, "energies", path).reshape(n)
    _check_finite(R, "positions", path)
    _check_finite(E.reshape(n, 1), "energies", path)
    _check_finite(F, "forces", path)
    check_no_coincident_atoms(R, path)
    return z, R, E, F


def to_raw_data(z, R, E, F, path: Path, *, energy_unit: str, length_unit: str, assumed: str | None,
                **meta) -> RawData:
    """Validate the raw arrays of a file (:func:`validate_arrays`) and convert them from
    ``energy_unit`` / ``length_unit`` to eV and Å (forces with both factors). ``assumed``: why the
    energy unit was taken by default (logged; None when the file or the caller named it). ``meta``:
    the remaining :class:`RawData` fields (``name``, ``theory``, ``md5``, ``format``)."""
    e_fac = unit_factor(energy_unit, "energy", path)
    r_fac = unit_factor(length_unit, "length", path)
    z, R, E, F = validate_arrays(z, R, E, F, path)
    if assumed is not None:
        log_assumed_unit(path, energy_unit, assumed)
    check_energy_scale(z, E / e_fac, energy_unit, assumed is not None, path)
    return RawData(
        z=z,
        positions=R * r_fac if r_fac != 1.0 else R,
        energies=E / e_fac,
        forces=F / e_fac / r_fac if r_fac != 1.0 else F / e_fac,
        path=path,
        energy_unit=energy_unit,
        length_unit=length_unit,
        **meta,
    )


__all__ = ["RawData", "check_no_coincident_atoms", "coincident_atoms", "to_raw_data", "validate_arrays"]
