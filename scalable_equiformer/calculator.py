"""ASE calculator: molecular dynamics, relaxations and single points with a trained Equiformer.

>>> from ase.io import read
>>> from ase.md.verlet import VelocityVerlet
>>> from scalable_equiformer.calculator import EquiformerCalculator
>>> atoms = read("ethanol.xyz")                                     # doctest: +SKIP
>>> atoms.calc = EquiformerCalculator("runs/md17_ethanol/best.pt")  # doctest: +SKIP
>>> VelocityVerlet(atoms, timestep=0.5 * ase.units.fs).run(1000)    # doctest: +SKIP

Units are ASE's and the model's: positions in Å, energy in eV, forces in eV/Å. The model is for
isolated molecules (no periodic boundary conditions); a periodic ``Atoms`` is refused.

The calculator is a thin adapter: ``Atoms`` -> a one-molecule torch-geometric ``Batch`` (``pos``,
``z``, ``batch``) -> ``model(batch, compute_forces=True)`` -> ``energy`` [1] and ``forces`` [N, 3].
It computes exactly what ``model(batch)`` computes (tested), in the model's dtype, on ``device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .errors import CheckpointError, UserError


def _pick_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but CUDA is not available here; use device='cpu'")
    return device


def load_checkpoint_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """The model stored in a training checkpoint (``best.pt`` / ``last.pt``, or a run folder: its
    ``best.pt``), in eval mode on ``device``: the config and training-split statistics stored in
    the checkpoint rebuild it, then its weights are loaded (the EMA weights when training used EMA).

    Returns ``(model, config)``. Raises CheckpointError (one line) for a missing, corrupt or
    foreign file.
    """
    from .config import config_from_dict
    from .data.statistics import DatasetStatistics
    from .model import build_model
    from .training.checkpoint import load_checkpoint, load_model_state

    path = Path(path)
    if path.is_dir() and (path / "best.pt").is_file():
        path = path / "best.pt"  # a run folder: its best checkpoint, as tools/evaluate.py
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        config = config_from_dict(ckpt["config"], origin=f"{path} (stored config)")
        stats = DatasetStatistics.from_dict(ckpt["stats"]) if ckpt.get("stats") is not None else None
    except UserError as exc:
        raise CheckpointError(f"{path}: stored config or statistics unusable: {exc}") from None
    model = build_model(config, stats)
    load_model_state(model, ckpt["model"], path)
    return model.to(device).eval(), config


class EquiformerCalculator(Calculator):
    """ASE calculator for a trained Equiformer (energy, forces, free_energy = energy).

    Args:
        checkpoint_or_model: path of a training checkpoint (``best.pt``), or a model object that
            takes a ``Batch`` and returns ``{'energy': [B], 'forces': [N, 3]}`` (eV, eV/Å). A model
            object is used as it is: moved to ``device`` and cast to ``dtype`` in place, set to eval.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'``, a ``torch.device``, or None/'auto' (GPU when
            there is one); for a model object None keeps the device it is on.
        dtype: None = the model's precision; ``'float64'`` (or ``torch.float64``) casts the model,
            e.g. to run MD in double precision with a model trained in float32.
        partitions: split the molecule's graph over this many ranks (``parallel.graph_partitions``).
            1 = the whole graph in this process; larger values need the partitioned runtime.
        **kwargs: passed to ``ase.calculators.calculator.Calculator`` (e.g. ``label``).

    Attributes:
        model: the torch module, in eval mode.
        device, dtype: where and in which precision the model runs (dtype is the model's).
        config: the run's ``Config`` when built from a checkpoint, else None.
    """

    implemented_properties = ["energy", "forces", "free_energy"]

    def __init__(self, checkpoint_or_model: Union[str, Path, torch.nn.Module], device=None, *,
                 dtype: Union[str, torch.dtype, None] = None, partitions: int = 1, **kwargs):
        super().__init__(**kwargs)
        if int(partitions) < 1:
            raise UserError(f"partitions must be >= 1, not {partitions}")
        self.partitions = int(partitions)
        if isinstance(checkpoint_or_model, torch.nn.Module):
            self.device = _pick_device(device) if device is not None else _module_device(checkpoint_or_model)
            self.model = checkpoint_or_model.to(self.device)
            self.checkpoint = None
            self.config = None
        elif isinstance(checkpoint_or_model, (str, Path)):
            self.device = _pick_device(device)
            self.checkpoint = Path(checkpoint_or_model)
            self.model, self.config = load_checkpoint_model(self.checkpoint, device=self.device)
        else:
            raise TypeError(f"EquiformerCalculator needs a checkpoint path or a torch module, "
                            f"not {type(checkpoint_or_model).__name__}")
        if dtype is not None:
            want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if want not in (torch.float32, torch.float64):
                raise UserError(f"dtype must be float32 or float64, not {dtype}")
            self.model = self.model.to(want)
        self.model.eval()
        self.dtype = _module_dtype(self.model)
        self.max_atomic_number = getattr(self.model, "max_atomic_number", None)  # z must be below it

    # -- Atoms -> Batch -> model ---------------------------------------------------------------

    def atoms_to_batch(self, atoms):
        """A one-molecule torch-geometric ``Batch`` (``pos`` Å in the model dtype, ``z``, ``batch``)."""
        from torch_geometric.data import Batch, Data

        if np.any(atoms.pbc):
            raise UserError("EquiformerCalculator: periodic boundary conditions are not supported "
                            "(the model is for isolated molecules); set atoms.pbc = False")
        z = torch.as_tensor(np.asarray(atoms.numbers), dtype=torch.long, device=self.device)
        if self.max_atomic_number is not None and int(z.max()) >= int(self.max_atomic_number):
            raise UserError(f"atomic number {int(z.max())} is not below the model's max_atomic_number "
                            f"({self.max_atomic_number})")
        pos = torch.as_tensor(np.asarray(atoms.positions), dtype=self.dtype, device=self.device)
        return Batch.from_data_list([Data(pos=pos, z=z)])

    def _forward(self, batch) -> dict:
        """Energy [1] eV and forces [N, 3] eV/Å of a one-molecule batch. The seam for the
        partitioned runtime: with ``partitions > 1`` it will run the graph over the partition group."""
        if self.partitions > 1:
            raise NotImplementedError(
                f"partitions={self.partitions}: graph partitions in the calculator need the partitioned "
                "runtime (scalable_equiformer.parallel); use partitions=1")
        with torch.enable_grad():
            return self.model(batch, compute_forces=True)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        out = self._forward(self.atoms_to_batch(self.atoms))
        energy = float(out["energy"].detach().reshape(-1)[0])
        forces = out["forces"].detach().to("cpu", torch.float64).numpy().reshape(len(self.atoms), 3)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


__all__ = ["EquiformerCalculator", "load_checkpoint_model"]
