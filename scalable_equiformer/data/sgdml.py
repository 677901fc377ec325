"""Read and validate molecular-dynamics data files; convert to eV and Å.

Supported formats
-----------------
* **sGDML npz** (MD17, MD22, the sGDML CCSD(T) sets): ``R`` [n, N, 3] positions, ``E`` [n] or
  [n, 1] energies, ``F`` [n, N, 3] forces (F = -dE/dR), ``z`` [N] atomic numbers, plus optional
  metadata ``name``, ``theory``, ``type``, ``md5`` and the unit markers ``e_unit`` / ``r_unit``.
  Without markers the sGDML convention applies: kcal/mol and Å.
* **rMD17 npz**: ``nuclear_charges`` [N], ``coords`` [n, N, 3] Å, ``energies`` [n] kcal/mol,
  ``forces`` [n, N, 3] kcal/mol/Å (other keys such as ``old_indices`` are ignored).
* **extxyz / xyz** through ASE: per-frame ``energy`` and per-atom ``forces``. ASE does not convert
  units, and extxyz carries no standard unit field: the file's units are taken from an
  ``energy_unit=`` / ``e_unit=`` (and ``length_unit=`` / ``r_unit=``) key on the first comment line
  when present, else from the ``energy_unit`` / ``length_unit`` arguments, else eV and Å (the ASE
  convention). MD17 files converted to xyz (e.g. NequIP's aspirin.xyz) are in kcal/mol: pass
  ``energy_unit="kcal/mol"``.

Every reader returns a :class:`RawData` in the package's units: positions in Å, energies in eV,
forces in eV/Å, all float64; atomic numbers int64. Every bad input raises
:class:`~scalable_equiformer.errors.DataError` with one line naming the file and the problem.

Geometry: the model is for isolated molecules. Periodic frames (an extxyz frame with ``pbc`` true
in any direction, an sGDML file with a ``lattice``) and frames with two atoms at the same position
are refused. A unit taken by default (no marker in the file, none passed) is logged, and energies
larger per atom than the total electronic energy of the atoms can be (:func:`check_energy_scale`)
get a warning: the file is then in another unit.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

#: 1 eV = 23.060547830619026 kcal/mol (CODATA 2018 e, N_A and the thermochemical calorie).
KCAL_PER_EV = 23.060547830619026
#: 1 Hartree in eV (CODATA 2018).
EV_PER_HARTREE = 27.211386245988
#: 1 eV in kJ/mol (= KCAL_PER_EV * 4.184).
KJ_PER_EV = KCAL_PER_EV * 4.184
#: 1 Bohr in Å (CODATA 2018).
ANGSTROM_PER_BOHR = 0.529177210903

#: energy unit marker (lower case) -> how many of that unit make 1 eV (values are divided by it,
#: so kcal/mol converts as E / 23.060547830619026 exactly).
ENERGY_UNITS: dict[str, float] = {
    "kcal/mol": KCAL_PER_EV,
    "kcal mol-1": KCAL_PER_EV,
    "kcal": KCAL_PER_EV,
    "ev": 1.0,
    "mev": 1e3,
    "kj/mol": KJ_PER_EV,
    "ha": 1.0 / EV_PER_HARTREE,
    "hartree": 1.0 / EV_PER_HARTREE,
    "eh": 1.0 / EV_PER_HARTREE,
}
#: length unit marker (lower case) -> multiply by this to get Å.
LENGTH_UNITS: dict[str, float] = {
    "ang": 1.0,
    "angstrom": 1.0,
    "a": 1.0,
    "å": 1.0,
    "bohr": ANGSTROM_PER_BOHR,
    "au": ANGSTROM_PER_BOHR,
    "nm": 10.0,
}

SGDML_KEYS = ("R", "E", "F", "z")
_FORMAT_LABEL = {"sgdml": "sGDML", "rmd17": "rMD17"}
RMD17_KEYS = ("coords", "energies", "forces", "nuclear_charges")


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


def dataset_md5(arrays: Mapping[str, np.ndarray]) -> str:
    """The sGDML dataset fingerprint as a hex string.

    Same as ``sgdml.utils.io.dataset_md5``: md5 over the md5 digests of ``z``, ``R``, ``E`` (when
    present) and ``F``, each hashed as stored (dtype and shape of the file, C order). The arrays
    must be the raw file arrays (before any unit conversion).
    """
    h = hashlib.md5()
    keys = ["z", "R"] + (["E"] if "E" in arrays else []) + ["F"]
    for key in keys:
        h.update(hashlib.md5(np.ascontiguousarray(arrays[key]).ravel()).digest())
    return h.hexdigest()


def _text(value) -> str:
    """Decode a 0-d str/bytes array (as sGDML stores strings) into str."""
    value = np.asarray(value)
    if value.ndim != 0:
        value = value.ravel()
        if value.size != 1:
            return str(value.tolist())
        value = value[0]
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def unit_factor(marker: str, kind: str, path) -> float:
    """kind='energy': units of ``marker`` per eV (divide by it to get eV); kind='length': Å per
    ``marker`` (multiply by it to get Å).

    Raises DataError naming the file for an unknown marker.
    """
    table = ENERGY_UNITS if kind == "energy" else LENGTH_UNITS
    key = marker.strip().lower()
    if key not in table:
        known = sorted({k for k in table})
        raise DataError(
            f"{path}: unknown {kind} unit marker {marker!r} (known: {', '.join(known)})"
        )
    return table[key]


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


#: Thomas-Fermi total energy of a neutral atom, -0.7687 Z^(7/3) Hartree: larger in magnitude than
#: the exact (all-electron) energy of every atom; molecules add a few eV per atom of binding.
_TF_HARTREE = 0.7687


def energy_scale_bound(z: np.ndarray) -> float:
    """Upper bound (eV per atom) on |total energy| of a molecule of atoms ``z``: 1.5 times the
    Thomas-Fermi energy of its atoms, averaged over them (H 31 eV, C 2.1 keV, O 4.0 keV; the exact
    all-electron energies are H 13.6 eV, C 1.03 keV, O 2.04 keV). It catches all-electron energies in
    a unit 2 or more times smaller than the one assumed (kcal/mol read as eV, meV read as kcal/mol);
    energies relative to atomic references or of valence electrons only are much smaller and pass."""
    z = np.asarray(z, dtype=np.float64)
    return float(1.5 * _TF_HARTREE * EV_PER_HARTREE * np.mean(z ** (7.0 / 3.0)))


def check_energy_scale(z: np.ndarray, energies_ev: np.ndarray, unit: str, assumed: bool, path) -> bool:
    """Warn (log) when the energies, read in ``unit``, are larger per atom than any molecule of
    these atoms can have (:func:`energy_scale_bound`): the file is in another unit. Returns True
    when it warned."""
    per_atom = float(np.mean(np.abs(energies_ev))) / max(int(np.asarray(z).size), 1)
    bound = energy_scale_bound(z)
    if per_atom <= bound:
        return False
    how = "assumed: the file has no unit marker" if assumed else "as the file says"
    log.warning("%s: energies average %.4g eV per atom when read as %s (%s), more than the total electronic "
                "energy of these atoms can be (at most ~%.4g eV per atom): the file is probably in another unit; "
                "give its unit as a marker in the file (npz: e_unit, extxyz: energy_unit=)", path, per_atom, unit,
                how, bound)
    return True


def _log_assumed_unit(path, unit: str, why: str) -> None:
    log.info("%s: no energy unit marker in the file; energies and forces read as %s (%s)", path, unit, why)


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


def _open_npz(path: Path):
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        if magic.startswith(b"\x93NUM"):
            raise DataError(f"{path}: a single .npy array, not an npz archive")
        raise DataError(f"{path}: not an npz file (no zip header)")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: truncated or corrupt npz file ({type(exc).__name__}: {exc})") from exc


def _get(npz, key: str, path) -> np.ndarray:
    try:
        return npz[key]
    except KeyError as exc:
        raise DataError(f"{path}: missing key {key!r}") from exc
    except ValueError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "pickle" in msg.lower():
            raise DataError(f"{path}: key {key!r} holds pickled objects, which are not read") from exc
        raise DataError(f"{path}: key {key!r} is corrupt ({msg})") from exc
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path}: key {key!r} cannot be read, file truncated or corrupt ({type(exc).__name__})"
        ) from exc


def read_npz(
    path,
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    verify_md5: bool = False,
) -> RawData:
    """Read an sGDML or rMD17 npz file and convert it to eV and Å.

    Args:
        path: the .npz file.
        energy_unit: unit of E/F when the file carries no ``e_unit`` marker (default: kcal/mol, the
            sGDML and rMD17 convention). A marker in the file wins; a different explicit value is an
            error (the file says otherwise).
        length_unit: unit of R when the file carries no ``r_unit`` marker (default: Å).
        verify_md5: recompute the sGDML fingerprint and compare it with the stored ``md5`` (files
            without ``md5``, such as rMD17, pass).

    Returns:
        RawData with positions [n, N, 3] Å, energies [n] eV, forces [n, N, 3] eV/Å (float64),
        z [N] int64. Forces are converted with both factors (kcal/mol/Å: F / KCAL_PER_EV).
    """
    path = Path(path)
    npz = _open_npz(path)
    with npz:
        keys = set(npz.files)
        if "R" in keys or not ({"coords", "nuclear_charges"} & keys):
            fmt, names = "sgdml", SGDML_KEYS
        else:
            fmt, names = "rmd17", RMD17_KEYS
        missing = [k for k in names if k not in keys]
        if missing:
            raise DataError(
                f"{path}: missing key {missing[0]!r} ({_FORMAT_LABEL[fmt]} files need {', '.join(names)}; "
                f"found {', '.join(sorted(keys)) or 'none'})"
            )
        if "lattice" in keys:  # sGDML's periodic datasets carry their cell here
            raise DataError(f"{path}: has a 'lattice' (a periodic cell); the model is for isolated molecules "
                            "(no periodic boundary conditions)")
        raw = {short: _get(npz, key, path) for short, key in zip(("R", "E", "F", "z"), names)}
        meta = {k: _text(_get(npz, k, path)) for k in ("name", "theory", "md5", "e_unit", "r_unit") if k in keys}

    stored_md5 = meta.get("md5")
    if verify_md5 and stored_md5 is not None:
        computed = dataset_md5(raw)
        if computed != stored_md5:
            raise DataError(
                f"{path}: md5 fingerprint mismatch (file says {stored_md5}, data gives {computed})"
            )

    e_unit = _resolve_unit(meta.get("e_unit"), energy_unit, "kcal/mol", "energy", path)
    r_unit = _resolve_unit(meta.get("r_unit"), length_unit, "Ang", "length", path)
    e_fac = unit_factor(e_unit, "energy", path)
    r_fac = unit_factor(r_unit, "length", path)

    z, R, E, F = validate_arrays(raw["z"], raw["R"], raw["E"], raw["F"], path)
    assumed = meta.get("e_unit") is None and energy_unit is None
    if assumed:
        _log_assumed_unit(path, e_unit, "the sGDML and rMD17 convention")
    check_energy_scale(z, E / e_fac, e_unit, assumed, path)
    return RawData(
        z=z,
        positions=R * r_fac if r_fac != 1.0 else R,
        energies=E / e_fac,
        forces=F / e_fac / r_fac if r_fac != 1.0 else F / e_fac,
        path=path,
        name=meta.get("name", path.stem),
        theory=meta.get("theory", ""),
        md5=stored_md5,
        energy_unit=e_unit,
        length_unit=r_unit,
        format=fmt,
    )


def _resolve_unit(in_file: str | None, given: str | None, default: str, kind: str, path) -> str:
    if in_file is not None:
        if given is not None and unit_factor(given, kind, path) != unit_factor(in_file, kind, path):
            raise DataError(
                f"{path}: file declares {kind} unit {in_file!r} but {given!r} was requested"
            )
        return in_file
    return given if given is not None else default


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
    e_unit = _resolve_unit(file_e, energy_unit, "eV", "energy", path)
    r_unit = _resolve_unit(file_r, length_unit, "Ang", "length", path)

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
    z, R, E, F = validate_arrays(z0, np.stack(R), np.asarray(E, float), np.stack(F), path)
    e_fac = unit_factor(e_unit, "energy", path)
    r_fac = unit_factor(r_unit, "length", path)
    assumed = file_e is None and energy_unit is None
    if assumed:
        _log_assumed_unit(path, e_unit, "the ASE convention")
    check_energy_scale(z, E / e_fac, e_unit, assumed, path)
    return RawData(
        z=z,
        positions=R * r_fac if r_fac != 1.0 else R,
        energies=E / e_fac,
        forces=F / e_fac / r_fac if r_fac != 1.0 else F / e_fac,
        path=path,
        name=path.stem,
        theory=str(info0.get("theory", "")),
        md5=None,
        energy_unit=e_unit,
        length_unit=r_unit,
        format="ase",
    )


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


def read_file(
    path,
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    verify_md5: bool = False,
) -> RawData:
    """Read any supported file by its suffix: ``.npz`` (sGDML / rMD17), ``.xyz`` / ``.extxyz`` (ASE).

    All values come back in Å, eV, eV/Å. See :func:`read_npz` and :func:`read_ase`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return read_npz(path, energy_unit=energy_unit, length_unit=length_unit, verify_md5=verify_md5)
    if suffix in (".xyz", ".extxyz"):
        return read_ase(path, energy_unit=energy_unit, length_unit=length_unit)
    raise DataError(f"{path}: unknown file type {suffix or '(none)'!r} (expected .npz, .xyz, .extxyz)")


__all__ = [
    "KCAL_PER_EV",
    "ENERGY_UNITS",
    "LENGTH_UNITS",
    "RawData",
    "dataset_md5",
    "read_npz",
    "read_ase",
    "read_file",
    "check_energy_scale",
    "check_no_coincident_atoms",
    "coincident_atoms",
    "unit_factor",
    "validate_arrays",
]
