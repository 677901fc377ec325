"""Known datasets: file names, URLs, atoms, frames and standard splits of MD17, rMD17 and MD22.

Names are ``<family>_<molecule>``: ``md17_aspirin``, ``rmd17_aspirin``, ``md22_AT-AT``. A name
resolves to ``<root>/<file_name>`` (rMD17 also to ``<root>/rmd17/npz_data/<file_name>``, where the
figshare archive puts it). This module knows no network; ``tools/download.py`` fetches the files.

Sources (checked against public code, since quantum-machine.org and figshare cannot be reached from
the build machines):

* MD17 (Chmiela et al. 2017), DFT PBE+vdW-TS: ``http://www.quantum-machine.org/gdml/data/npz/
  md17_<mol>.npz``. File names, frame counts: torch_geometric ``datasets/md17.py`` (2.8.1).
  Atom counts from the molecular formulas.
* rMD17 (Christensen & von Lilienfeld 2020), PBE/def2-SVP, 100 000 frames per molecule (azobenzene
  99 988): one archive ``rmd17.tar.bz2`` on figshare (article 12672038, file 23950376) holding
  ``rmd17/npz_data/rmd17_<mol>.npz`` and the 5 published index splits
  ``rmd17/splits/index_train_0{1..5}.csv`` / ``index_test_0{1..5}.csv`` (1000 train and 1000 test
  frame indices each; member names as read by schnetpack's rMD17 module). The download tool
  extracts them under ``<root>/rmd17/``; :func:`scalable_equiformer.data.load_index_split` reads
  them from there.
* MD22 (Chmiela et al. 2023), PBE+MBD: ``http://www.quantum-machine.org/gdml/repo/datasets/
  md22_<name>.npz``. File names, frame counts and the paper's training-set sizes as in NequIP's
  ``MD22DataModule`` and openqdc; atom counts from the MD22 paper. The papers give no validation
  size: here ``val_size`` is a stated choice of 10 % of the training size, drawn from the frames
  outside the training set; test = the rest.

No per-file md5 is listed: sGDML files carry their own fingerprint (``md5``), which the download
tool recomputes; rMD17 files carry none and are checked by shape and atom count only.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

MD17_URL_BASE = "http://www.quantum-machine.org/gdml/data/npz"
MD22_URL_BASE = "http://www.quantum-machine.org/gdml/repo/datasets"
#: the rMD17 archive (figshare "Revised MD17 dataset (rMD17)", article 12672038).
RMD17_ARCHIVE_URL = "https://figshare.com/ndownloader/files/23950376"
RMD17_ARCHIVE_NAME = "rmd17.tar.bz2"
#: folder (relative to the data root) where the archive's npz files and index splits land.
RMD17_NPZ_DIR = "rmd17/npz_data"
RMD17_SPLIT_DIR = "rmd17/splits"


@dataclass(frozen=True)
class DatasetInfo:
    """One known dataset.

    Attributes:
        name: catalog name, e.g. ``md22_AT-AT``.
        family: ``md17``, ``rmd17`` or ``md22``.
        molecule: molecule name as in the file name.
        file_name: file name under the data root, e.g. ``md22_AT-AT.npz``.
        url: where the file (or, for rMD17, the archive holding it) is published.
        num_atoms: atoms per frame.
        num_frames: frames in the published file.
        theory: level of theory of the reference energies and forces.
        train_size / val_size / test_size: the standard split (test None = all remaining frames).
        split_seed: seed of the standard random split.
        archive_member: path of the file inside the archive (rMD17 only).
        index_splits: number of published index splits (rMD17: 5), else 0.
        note: anything a user should know (where a number comes from).
    """

    name: str
    family: str
    molecule: str
    file_name: str
    url: str
    num_atoms: int
    num_frames: int
    theory: str
    train_size: int
    val_size: int
    test_size: int | None = None
    split_seed: int = 1
    archive_member: str | None = None
    index_splits: int = 0
    note: str = ""

    def candidate_paths(self, root) -> list[Path]:
        """Where the file may sit under ``root``, in the order they are tried."""
        root = Path(root)
        paths = [root / self.file_name]
        if self.archive_member is not None:
            paths.append(root / self.archive_member)
        return paths

    def download_command(self, root) -> str:
        return f"python tools/download.py {self.name} --root {root}"


# ---- MD17 (sGDML "md17_*" files; Equiformer's split: 950 train / 50 val / rest test, seed 1) ----
_MD17 = {
    # molecule: (atoms, frames)
    "aspirin": (21, 211762),
    "benzene2017": (12, 627983),
    "ethanol": (9, 555092),
    "malonaldehyde": (9, 993237),
    "naphthalene": (18, 326250),
    "salicylic": (16, 320231),
    "toluene": (15, 442790),
    "uracil": (12, 133770),
}

# ---- rMD17: 100k frames each (azobenzene 99 988); 5 published splits of 1000 train / 1000 test ----
_RMD17 = {
    "aspirin": (21, 100000),
    "azobenzene": (24, 99988),
    "benzene": (12, 100000),
    "ethanol": (9, 100000),
    "malonaldehyde": (9, 100000),
    "naphthalene": (18, 100000),
    "paracetamol": (20, 100000),
    "salicylic": (16, 100000),
    "toluene": (15, 100000),
    "uracil": (12, 100000),
}

# ---- MD22: (atoms, frames, paper training size) ----
_MD22 = {
    "Ac-Ala3-NHMe": (42, 85109, 6000),
    "DHA": (56, 69753, 8000),
    "stachyose": (87, 27272, 8000),
    "AT-AT": (60, 20001, 3000),
    "AT-AT-CG-CG": (118, 10153, 2000),
    "buckyball-catcher": (148, 6102, 600),
    "double-walled_nanotube": (370, 5032, 800),
}


def _build() -> dict[str, DatasetInfo]:
    cat: dict[str, DatasetInfo] = {}
    for mol, (atoms, frames) in _MD17.items():
        name = f"md17_{mol}"
        cat[name] = DatasetInfo(
            name=name, family="md17", molecule=mol, file_name=f"{name}.npz",
            url=f"{MD17_URL_BASE}/{name}.npz", num_atoms=atoms, num_frames=frames,
            theory="DFT PBE+vdW-TS (FHI-aims)", train_size=950, val_size=50, test_size=None,
            split_seed=1, note="split as in Equiformer: 950 train / 50 val / rest test, seed 1",
        )
    for mol, (atoms, frames) in _RMD17.items():
        name = f"rmd17_{mol}"
        cat[name] = DatasetInfo(
            name=name, family="rmd17", molecule=mol, file_name=f"{name}.npz",
            url=RMD17_ARCHIVE_URL, num_atoms=atoms, num_frames=frames,
            theory="DFT PBE/def2-SVP (ORCA)", train_size=950, val_size=50, test_size=1000,
            split_seed=1, archive_member=f"{RMD17_NPZ_DIR}/{name}.npz", index_splits=5,
            note=(f"in the archive {RMD17_ARCHIVE_NAME}; standard split = published index split 1 "
                  f"({RMD17_SPLIT_DIR}/index_train_01.csv: 1000 frames, of which 50 seeded for "
                  "validation) and index_test_01.csv (1000 test frames)"),
        )
    for mol, (atoms, frames, train) in _MD22.items():
        name = f"md22_{mol}"
        cat[name] = DatasetInfo(
            name=name, family="md22", molecule=mol, file_name=f"{name}.npz",
            url=f"{MD22_URL_BASE}/{name}.npz", num_atoms=atoms, num_frames=frames,
            theory="DFT PBE+MBD (FHI-aims)", train_size=train, val_size=train // 10,
            test_size=None, split_seed=1,
            note="train size from the MD22 paper; val = 10 % of train (stated choice); test = rest",
        )
    return cat


#: every known dataset by catalog name.
CATALOG: dict[str, DatasetInfo] = _build()


def get_info(name: str) -> DatasetInfo:
    """The catalog entry for ``name`` (case-insensitive). Unknown names raise DataError listing
    the closest known names."""
    if name in CATALOG:
        return CATALOG[name]
    lower = {k.lower(): k for k in CATALOG}
    if name.lower() in lower:
        return CATALOG[lower[name.lower()]]
    close = difflib.get_close_matches(name.lower(), list(lower), n=4, cutoff=0.5)
    hint = ", ".join(lower[c] for c in close) if close else ", ".join(sorted(CATALOG)[:6]) + ", ..."
    raise DataError(f"unknown dataset name {name!r} (did you mean: {hint}?)")


def is_catalog_name(name: str) -> bool:
    """True when ``name`` (case-insensitive) is a catalog name."""
    return name in CATALOG or name.lower() in {k.lower() for k in CATALOG}


def dataset_file(name: str, root) -> Path:
    """The existing file of catalog dataset ``name`` under ``root``.

    Raises DataError with the URL and the download command when the file is missing.
    """
    info = get_info(name)
    if root is None:
        raise DataError(
            f"dataset {info.name}: no data root given (set data.root); the file is {info.file_name}"
        )
    for path in info.candidate_paths(root):
        if path.is_file():
            return path
    where = " or ".join(str(p) for p in info.candidate_paths(root))
    raise DataError(
        f"dataset {info.name}: file not found at {where}; download it from {info.url} "
        f"with: {info.download_command(root)}"
    )


__all__ = [
    "CATALOG",
    "DatasetInfo",
    "get_info",
    "is_catalog_name",
    "dataset_file",
    "MD17_URL_BASE",
    "MD22_URL_BASE",
    "RMD17_ARCHIVE_URL",
    "RMD17_ARCHIVE_NAME",
    "RMD17_NPZ_DIR",
    "RMD17_SPLIT_DIR",
]
