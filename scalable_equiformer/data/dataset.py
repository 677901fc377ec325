"""``MolecularDataset``: the frames of one molecule in package units, as torch_geometric ``Data``;
where a data file is (:func:`resolve_path` for the loader, :func:`resolve_data_path` for a
``data.path`` of a config or command line) and :func:`load_dataset`.

Units everywhere: positions Å, energies eV, forces eV/Å (float64); atomic numbers int64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .catalog import dataset_file, get_info, is_catalog_name
from .frames import RawData
from .sgdml import read_file


class MolecularDataset(Dataset):
    """Frames of one molecule (same atoms, same order in every frame).

    ``ds[i]`` is a ``torch_geometric.data.Data`` with ``pos`` [N, 3] float64 Å, ``z`` [N] long,
    ``energy`` [1] float64 eV, ``forces`` [N, 3] float64 eV/Å, ``natoms`` [1] long and ``idx`` [1]
    long (the frame's index in the file).

    Attributes:
        name, path, theory: from the file (name: catalog name when loaded by name).
        num_atoms: N.
        z: [N] long atomic numbers.
        positions: [n, N, 3] float64 Å; energies: [n] float64 eV; forces: [n, N, 3] float64 eV/Å
            (for a subset these are gathered, i.e. copies of the selected frames).
        indices: [n] long frame indices into the file.
    """

    def __init__(
        self,
        z: torch.Tensor,
        positions: torch.Tensor,
        energies: torch.Tensor,
        forces: torch.Tensor,
        *,
        name: str = "",
        path: Path | None = None,
        theory: str = "",
        indices: torch.Tensor | None = None,
    ):
        self._z = z
        self._positions = positions
        self._energies = energies
        self._forces = forces
        self.name = name
        self.path = path
        self.theory = theory
        self._indices = indices  # None = all frames of the file

    # ---- construction ----
    @classmethod
    def from_raw(cls, raw: RawData, name: str | None = None) -> "MolecularDataset":
        return cls(
            torch.from_numpy(np.ascontiguousarray(raw.z, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(raw.positions, dtype=np.float64)),
            torch.from_numpy(np.ascontiguousarray(raw.energies, dtype=np.float64)),
            torch.from_numpy(np.ascontiguousarray(raw.forces, dtype=np.float64)),
            name=name or raw.name,
            path=raw.path,
            theory=raw.theory,
        )

    def subset(self, indices) -> "MolecularDataset":
        """A view of the frames ``indices`` (positions into this dataset, not the file)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise DataError(f"{self.path}: subset index out of range for {n} frames")
        idx = torch.where(idx < 0, idx + n, idx)
        base = self.indices[idx]
        return MolecularDataset(
            self._z, self._positions, self._energies, self._forces,
            name=self.name, path=self.path, theory=self.theory, indices=base,
        )

    # ---- properties ----
    @property
    def num_atoms(self) -> int:
        return int(self._z.numel())

    @property
    def z(self) -> torch.Tensor:
        return self._z

    @property
    def indices(self) -> torch.Tensor:
        if self._indices is None:
            return torch.arange(self._positions.shape[0])
        return self._indices

    def _take(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._indices is None else t[self._indices]

    @property
    def positions(self) -> torch.Tensor:
        return self._take(self._positions)

    @property
    def energies(self) -> torch.Tensor:
        return self._take(self._energies)

    @property
    def forces(self) -> torch.Tensor:
        return self._take(self._forces)

    def __len__(self) -> int:
        return self._positions.shape[0] if self._indices is None else int(self._indices.numel())

    def __getitem__(self, i):
        from torch_geometric.data import Data

        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for {n} frames")
        i = i % n
        f = i if self._indices is None else int(self._indices[i])
        return Data(
            pos=self._positions[f].clone(),
            z=self._z,
            energy=self._energies[f : f + 1].clone(),
            forces=self._forces[f].clone(),
            natoms=torch.tensor([self.num_atoms], dtype=torch.long),
            idx=torch.tensor([f], dtype=torch.long),
        )

    def __repr__(self) -> str:
        return (f"MolecularDataset(name={self.name!r}, frames={len(self)}, atoms={self.num_atoms}, "
                f"path={str(self.path)!r})")


def resolve_path(path_or_name, root=None) -> tuple[Path, str | None]:
    """(file path, catalog name or None) for a file path or a catalog name.

    An existing file wins; else a catalog name resolves under ``root`` (DataError with URL and
    download command if the file is missing); else DataError for a missing file / unknown name.
    """
    s = str(path_or_name)
    p = Path(s).expanduser()
    if p.is_file():
        return p, None
    if root is not None and not p.is_absolute() and (Path(root) / p).is_file():
        return Path(root) / p, None
    looks_like_path = p.suffix.lower() in (".npz", ".xyz", ".extxyz") or "/" in s or "\\" in s
    if not looks_like_path or is_catalog_name(s):
        if is_catalog_name(s):
            info = get_info(s)
            return dataset_file(info.name, root), info.name
        get_info(s)  # raises with close names
    raise DataError(f"{p}: file not found")


#: the installed package (``scalable_equiformer/``); the shipped demo data lie under it
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def resolve_data_path(path: str, root=None) -> str:
    """``data.path`` as given when it exists (or under ``data.root``); else relative to the
    repository root or to the installed package (so the shipped demo file is found from
    anywhere). Unresolved paths are returned unchanged (the loader names them in its error)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.is_file() or (root is not None and (Path(root) / p).is_file()):
        return str(p)
    parts = p.parts
    candidates = [PACKAGE_DIR.parent / p]
    if parts and parts[0] == PACKAGE_DIR.name:
        candidates.append(PACKAGE_DIR.joinpath(*parts[1:]))
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(p)


def load_dataset(
    path_or_name,
    root=None,
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
) -> MolecularDataset:
    """Load a data file or a catalog dataset as a :class:`MolecularDataset` (Å, eV, eV/Å).

    Args:
        path_or_name: a file (.npz sGDML or rMD17; .xyz/.extxyz through ASE) or a catalog name such
            as ``md17_aspirin``, ``rmd17_aspirin``, ``md22_AT-AT`` that resolves to
            ``<root>/<file name>`` (e.g. ``<root>/md22_AT-AT.npz``).
        root: the data folder for catalog names (also tried for relative file paths).
        energy_unit, length_unit: units of a file without unit markers. Defaults: npz kcal/mol and Å
            (sGDML convention); extxyz eV and Å (ASE convention). A marker in the file wins.

    Raises:
        DataError: one line naming the file and the problem; for a missing catalog file it includes
            the URL and ``python tools/download.py NAME --root DIR``.
    """
    path, name = resolve_path(path_or_name, root)
    raw = read_file(path, energy_unit=energy_unit, length_unit=length_unit)
    if name is not None:
        info = get_info(name)
        if raw.z.size != info.num_atoms:
            raise DataError(
                f"{path}: has {raw.z.size} atoms but {info.name} has {info.num_atoms}"
            )
    return MolecularDataset.from_raw(raw, name=name)


__all__ = ["MolecularDataset", "PACKAGE_DIR", "load_dataset", "resolve_data_path", "resolve_path"]
