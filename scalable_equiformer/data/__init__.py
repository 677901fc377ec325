"""Data layer: read MD17 / rMD17 / MD22 files (units to eV, Å), the dataset catalog, seeded splits,
and :func:`radius_graph` (re-exported: the neighbour search is the model's first stage and lives in
:mod:`..nn.graph`, below this layer).

Units: positions Å, energies eV, forces eV/Å, all float64 on load; 1 eV = 23.060547830619026
kcal/mol (:data:`KCAL_PER_EV`).
"""

from ..nn.graph import radius_graph
from .catalog import CATALOG, DatasetInfo, dataset_file, get_info
from .dataset import MolecularDataset, load_dataset
from .frames import RawData
from .sgdml import dataset_md5, read_file
from .splits import check_splits, load_index_split, load_splits, make_splits, save_splits
from .units import KCAL_PER_EV

__all__ = [
    "KCAL_PER_EV",
    "CATALOG",
    "DatasetInfo",
    "get_info",
    "dataset_file",
    "MolecularDataset",
    "load_dataset",
    "RawData",
    "read_file",
    "dataset_md5",
    "radius_graph",
    "make_splits",
    "save_splits",
    "load_splits",
    "check_splits",
    "load_index_split",
]
