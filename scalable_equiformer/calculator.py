"""ASE calculator: molecular dynamics, relaxations and single points with a trained Equiformer.

>>> from ase.io import read
>>> from ase.md.verlet import VelocityVerlet
>>> from scalable_equiformer.calculator import EquiformerCalculator
>>> atoms = read("ethanol.xyz")                                     # doctest: +SKIP
>>> atoms.calc = EquiformerCalculator("runs/md17_ethanol/best.pt")  # doctest: +SKIP
>>> VelocityVerlet(atoms, timestep=0.5 * ase.units.fs).run(1000)    # doctest: +SKIP

Units are ASE's and the model's: positions in Å, energy in eV, forces in eV/Å. The model is for
isolated molecules (no periodic boundary conditions); a periodic ``Atoms`` is refused, and so are
two atoms at the same position. Positions go to the model in float64 and each molecule is centred
before the cast to the model's dtype, so a molecule far from the origin gives the same numbers.

The calculator is a thin adapter: ``Atoms`` -> a one-molecule torch-geometric ``Batch`` (``pos`` float64,
``z``, ``batch``) -> ``model(batch, compute_forces=True)`` -> ``energy`` [1] and ``forces`` [N, 3].
It computes exactly what ``model(batch)`` computes (tested), in the model's dtype, on ``device``.
A checkpoint is read by :func:`scalable_equiformer.inference.load_model` (the loader
``tools/evaluate.py`` uses too): the run's evaluated weights, EMA when training kept one.

Graph partitions (``partitions=P``), for a system too big for one process: the calculator is then
one rank of an already initialised ``torch.distributed`` process group of P ranks (or of the
``group`` passed), and every rank runs the same ASE script with the same atoms; each call runs
the molecule's graph partitioned over the P ranks (:class:`scalable_equiformer.parallel.PartitionedModel`)
and every rank gets the full energy and forces, so the ranks' dynamics stay identical::

    # torchrun --nproc_per_node 2 md.py
    import torch.distributed as dist
    dist.init_process_group("gloo")                       # "nccl" with one GPU per rank
    atoms.calc = EquiformerCalculator("best.pt", device="cpu", partitions=2)
    VelocityVerlet(atoms, timestep=0.5 * ase.units.fs).run(1000)   # write files from rank 0 only

Without such a group, ``partitions > 1`` raises a UserError that says so (the calculator starts no
processes of its own).

Elements: a checkpoint records the elements of its training split. ``Atoms`` with an element the
model never saw are refused (UserError naming the element: the model would return finite,
meaningless energies); with ``strict=False`` they are computed and the calculator warns once per
element. Models passed as objects, and checkpoints written before elements were recorded, are not
checked (unless ``elements=`` is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from . import runtime
from .errors import UserError
from .parallel.partitioned import partitioned_model


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
            1 = the whole graph in this process; P > 1 needs an initialised process group of P
            ranks, all running the same script (see the module docstring).
        group: the process group of the P ranks (default: the world group, which must then have
            exactly P ranks), e.g. the partition group of
            :func:`scalable_equiformer.parallel.make_groups`.
        strict: refuse ``Atoms`` with an element the model never saw in training (UserError naming
            it); False computes them and warns once per element.
        elements: the atomic numbers the model was trained on (default: those the checkpoint
            records; None for a model object, or an older checkpoint = no check).
        **kwargs: passed to ``ase.calculators.calculator.Calculator`` (e.g. ``label``).

    Attributes:
        model: the torch module, in eval mode.
        device, dtype: where and in which precision the model runs (dtype is the model's).
        config: the run's ``Config`` when built from a checkpoint, else None.
        elements: the training elements checked against (sorted atomic numbers), or None.
    """

    implemented_properties = ["energy", "forces", "free_energy"]

    def __init__(self, checkpoint_or_model: Union[str, Path, torch.nn.Module], device=None, *,
                 dtype: Union[str, torch.dtype, None] = None, partitions: int = 1, group=None, strict: bool = True,
                 elements: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(**kwargs)
        self.strict = bool(strict)
        self.elements = sorted({int(z) for z in elements}) if elements is not None else None
        self._warned: set[int] = set()
        if int(partitions) < 1:
            raise UserError(f"partitions must be >= 1, not {partitions}")
        self.partitions = int(partitions)
        if isinstance(checkpoint_or_model, torch.nn.Module):
            self.device = runtime.parse_device(device) if device is not None else _module_device(checkpoint_or_model)
            self.model = checkpoint_or_model.to(self.device)
            self.checkpoint = None
            self.config = None
        elif isinstance(checkpoint_or_model, (str, Path)):
            self.device = runtime.parse_device(device)
            self.checkpoint = Path(checkpoint_or_model)
            # the force strategy stays plain autograd (no memory.checkpointing): nothing is kept for
            # a force loss at inference
            from .inference import load_model

            self.model, self.config, info = load_model(self.checkpoint, device=self.device)
            if self.elements is None:
                self.elements = info.get("elements")
        else:
            raise TypeError(f"EquiformerCalculator needs a checkpoint path or a torch module, "
                            f"not {type(checkpoint_or_model).__name__}")
        if dtype is not None:
            self.model = self.model.to(runtime.parse_dtype(dtype))
        self.model.eval()
        self.dtype = _module_dtype(self.model)
        self.max_atomic_number = getattr(self.model, "max_atomic_number", None)  # z must be below it
        self.partitioned = partitioned_model(self.model, self.partitions, group) if self.partitions > 1 else None

    # -- Atoms -> Batch -> model ---------------------------------------------------------------

    def atoms_to_batch(self, atoms):
        """A one-molecule torch-geometric ``Batch`` (``pos`` Å in float64, ``z``, ``batch``)."""
        from torch_geometric.data import Batch, Data

        if np.any(atoms.pbc):
            raise UserError("EquiformerCalculator: periodic boundary conditions are not supported "
                            "(the model is for isolated molecules); set atoms.pbc = False")
        if len(atoms) == 0:
            raise UserError("EquiformerCalculator: the Atoms object has no atoms; nothing to compute")
        from .checkpoint_io import check_atomic_numbers

        z = torch.as_tensor(np.asarray(atoms.numbers), dtype=torch.long, device=self.device)
        check_atomic_numbers(np.asarray(atoms.numbers).tolist(), max_atomic_number=self.max_atomic_number,
                             elements=self.elements, where=f"EquiformerCalculator({self._label()})",
                             strict=self.strict, warned=self._warned,
                             hint="EquiformerCalculator(..., strict=False) computes them with a warning")
        from .data.frames import check_no_coincident_atoms

        check_no_coincident_atoms(np.asarray(atoms.positions), f"EquiformerCalculator({self._label()})", what="")
        # float64 whatever the model dtype: the model centres each molecule before its cast
        # (nn/forces.prepare_inputs), so a molecule far from the origin keeps its geometry
        pos = torch.as_tensor(np.asarray(atoms.positions), dtype=torch.float64, device=self.device)
        return Batch.from_data_list([Data(pos=pos, z=z)])

    def _label(self) -> str:
        return str(self.checkpoint) if self.checkpoint is not None else type(self.model).__name__

    def _forward(self, batch) -> dict:
        """Energy [1] eV and forces [N, 3] eV/Å of a one-molecule batch; with ``partitions > 1``
        the graph runs over the partition group (every rank must call with the same atoms)."""
        model = self.partitioned if self.partitioned is not None else self.model
        with torch.enable_grad():
            return model(batch, compute_forces=True)

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


__all__ = ["EquiformerCalculator"]
