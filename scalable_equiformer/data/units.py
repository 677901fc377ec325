"""Units of the data files: the conversion constants, the unit markers files carry, and the check
that energies read in a unit are plausible for it. The package's units are eV, Å and eV/Å."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import DataError

log = logging.getLogger("scalable_equiformer.data.sgdml")  # the readers' logger, as before the split

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


def resolve_unit(in_file: str | None, given: str | None, default: str, kind: str, path) -> str:
    """The unit a file is read in: its own marker ``in_file`` (an explicit ``given`` that differs is
    an error), else ``given``, else the format's ``default``."""
    if in_file is not None:
        if given is not None and unit_factor(given, kind, path) != unit_factor(in_file, kind, path):
            raise DataError(
                f"{path}: file declares {kind} unit {in_file!r} but {given!r} was requested"
            )
        return in_file
    return given if given is not None else default


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


def log_assumed_unit(path, unit: str, why: str) -> None:
    log.info("%s: no energy unit marker in the file; energies and forces read as %s (%s)", path, unit, why)


__all__ = [
    "ANGSTROM_PER_BOHR",
    "ENERGY_UNITS",
    "EV_PER_HARTREE",
    "KCAL_PER_EV",
    "KJ_PER_EV",
    "LENGTH_UNITS",
    "check_energy_scale",
    "energy_scale_bound",
    "log_assumed_unit",
    "resolve_unit",
    "unit_factor",
]
