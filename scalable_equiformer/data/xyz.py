"""Read extxyz / xyz trajectories through ASE (see :mod:`.sgdml` for the formats and the units)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .frames import RawData, to_raw_data
from .units import resolve_unit


def read_ase(
    path,
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
) -> RawData:
    """Read an extxyz/xyz trajectory through ASE and convert it to eV and Å.

    Each frame needs a total energy (``energy=`` in the comment line) and per-atom forces; all frames
    must be the same molecule (same atomic numbers in the same order). Units: a comment-line key
    ``energy_unit``/``e_unit`` (``length_unit``/``r_unit``) on the first frame, else the arguments,
    else eV and Å. See the module docstring.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    import ase.io  # local import: ASE is only needed for xyz files

    try:
        frames = ase.io.read(str(path), index=":", format="extxyz")
    except Exception as exc:  # ASE raises many types for malformed text
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot parse as extxyz ({type(exc).__name__}: {msg})") from exc
    if not frames:
        raise DataError(f"{path}: no frames")

    info0 = frames[0].info
    file_e = next((str(info0[k]) for k in ("energy_unit", "e_unit") if k in info0), None)
    file_r = next((str(info0[k]) for k in ("length_unit", "r_unit") if k in info0), None)
    e_unit = resolve_unit(file_e, energy_unit, "eV", "energy", path)
    r_unit = resolve_unit(file_r, length_unit, "Ang", "length", path)
    z, R, E, F = _frame_arrays(frames, path)
    return to_raw_data(
        z, R, E, F, path, energy_unit=e_unit, length_unit=r_unit,
        assumed="the ASE convention" if file_e is None and energy_unit is None else None,
        name=path.stem, theory=str(info0.get("theory", "")), md5=None, format="ase",
    )


def _frame_arrays(frames, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(z [N], R [n, N, 3], E [n], F [n, N, 3])`` of ASE frames as stored (one molecule, no pbc)."""
    z0 = frames[0].get_atomic_numbers()
    R, E, F = [], [], []
    for i, atoms in enumerate(frames):
        if len(atoms) != len(z0) or not np.array_equal(atoms.get_atomic_numbers(), z0):
            raise DataError(f"{path}: frame {i} is a different molecule than frame 0")
        if np.any(atoms.pbc):
            a, b, c = (float(x) for x in atoms.cell.lengths())
            raise DataError(f"{path}: frame {i} is periodic (pbc={''.join('T' if p else 'F' for p in atoms.pbc)}, "
                            f"cell {a:.4g} x {b:.4g} x {c:.4g} Å); the model is for isolated molecules: "
                            'write pbc="F F F" if the cell is only a box')
        energy = _frame_energy(atoms)
        forces = _frame_forces(atoms)
        if energy is None:
            raise DataError(f"{path}: frame {i} has no energy")
        if forces is None:
            raise DataError(f"{path}: frame {i} has no forces")
        R.append(atoms.get_positions())
        E.append(energy)
        F.append(forces)
    return z0, np.stack(R), np.asarray(E, float), np.stack(F)


def _frame_energy(atoms) -> float | None:
    calc = atoms.calc
    if calc is not None and "energy" in getattr(calc, "results", {}):
        return float(calc.results["energy"])
    for key in ("energy", "Energy", "E"):
        if key in atoms.info:
            return float(atoms.info[key])
    return None


def _frame_forces(atoms) -> np.ndarray | None:
    calc = atoms.calc
    if calc is not None and "forces" in getattr(calc, "results", {}):
        return np.asarray(calc.results["forces"], float)
    for key in ("forces", "force", "F"):
        if key in atoms.arrays:
            return np.asarray(atoms.arrays[key], float)
    return None


__all__ = ["read_ase"]
