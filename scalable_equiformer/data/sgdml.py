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

Where it lives: this module reads npz files and dispatches by suffix (:func:`read_file`);
:mod:`.xyz` reads extxyz through ASE; :mod:`.frames` holds :class:`RawData` and the checks every
reader runs; :mod:`.units` the unit constants and markers. Their public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import DataError
from .frames import RawData, check_no_coincident_atoms, coincident_atoms, to_raw_data, validate_arrays
from .units import ENERGY_UNITS, KCAL_PER_EV, LENGTH_UNITS, check_energy_scale, resolve_unit, unit_factor
from .xyz import read_ase

SGDML_KEYS = ("R", "E", "F", "z")
_FORMAT_LABEL = {"sgdml": "sGDML", "rmd17": "rMD17"}
RMD17_KEYS = ("coords", "energies", "forces", "nuclear_charges")


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
    fmt, raw, meta = _npz_arrays(path)
    stored_md5 = meta.get("md5")
    if verify_md5 and stored_md5 is not None:
        computed = dataset_md5(raw)
        if computed != stored_md5:
            raise DataError(
                f"{path}: md5 fingerprint mismatch (file says {stored_md5}, data gives {computed})"
            )
    assumed = meta.get("e_unit") is None and energy_unit is None
    return to_raw_data(
        raw["z"], raw["R"], raw["E"], raw["F"], path,
        energy_unit=resolve_unit(meta.get("e_unit"), energy_unit, "kcal/mol", "energy", path),
        length_unit=resolve_unit(meta.get("r_unit"), length_unit, "Ang", "length", path),
        assumed="the sGDML and rMD17 convention" if assumed else None,
        name=meta.get("name", path.stem), theory=meta.get("theory", ""), md5=stored_md5, format=fmt,
    )


def _npz_arrays(path: Path) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """``(format, {"R", "E", "F", "z": arrays as stored}, {metadata key: text})`` of an npz file."""
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
    return fmt, raw, meta


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
