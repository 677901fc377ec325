"""The inference path made for molecular dynamics: one molecule's energy and forces per call.

Every MD engine of :mod:`scalable_equiformer.md` (OpenMM, i-PI, the batched engine) calls a
:class:`Potential`; it is what an MD step needs and nothing more:

* the model in eval mode; the only gradient taken is ``-dE/dpos`` (``autograd.grad`` with the
  positions as its one input), without ``create_graph``: no parameter gradient is formed or
  stored. The weights keep ``requires_grad``: with frozen weights ``torch.matmul`` stops folding
  the linear layers' batched products into one ``mm`` (it avoids a copy in a backward to the input
  alone) and runs ``bmm`` on an expanded weight instead, which made the paper model's step 1.3x slower;
* a Verlet neighbour list: candidate pairs within ``cutoff + skin`` are searched only when some
  atom has moved more than ``skin / 2`` since the last search; each step keeps the candidates
  closer than ``cutoff``, computed exactly as :func:`~scalable_equiformer.nn.graph.radius_graph`
  computes them (same positions, same dtype, same order), so the edges, and hence the numbers,
  are those of ``model(batch)``;
* the atomic numbers checked once per system (:meth:`Potential.set_numbers`), not per step;
* graph partitions (``partitions=P`` over an initialised process group) as in the calculator.

Units are the model's: positions in Å in, energy in eV and forces in eV/Å out (float64 numpy).
Engines convert at their boundary (OpenMM: nm, kJ/mol; i-PI: bohr, hartree).

>>> pot = Potential.from_checkpoint("runs/md22_atat/best.pt")          # doctest: +SKIP
>>> pot.set_numbers(atoms.numbers)                                     # doctest: +SKIP
>>> energy, forces = pot.compute(atoms.positions)                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import UserError

log = logging.getLogger(__name__)

#: default Verlet skin (Å): a search every few tens of femtoseconds at 300-500 K.
DEFAULT_SKIN = 1.0

#: what the warning for a model trained without the smooth cutoff says (once per model).
NOT_SMOOTH = ("{label}: this model was trained with model.smooth_cutoff=false (the original Equiformer's, e.g. the "
              "md17_* configs): its energy jumps when a pair crosses the {cutoff:g} Å cutoff, so NVE runs drift; train "
              "with model.smooth_cutoff=true (the md22_* and demo configs) for MD")


def warn_if_not_smooth(model, label: str) -> bool:
    """Warn (once per model object) when ``model`` has no smooth cutoff; True if it warned."""
    if getattr(model, "smooth_cutoff", True) or getattr(model, "_warned_not_smooth", False):
        return False
    model._warned_not_smooth = True
    warnings.warn(NOT_SMOOTH.format(label=label, cutoff=float(model.cutoff)), UserWarning, stacklevel=3)
    return True


class Potential:
    """Energy and forces of one molecule, for an MD engine.

    Args:
        model: a trained :class:`~scalable_equiformer.nn.equiformer.Equiformer` (put in eval mode).
        elements: the atomic numbers the model was trained on (from the checkpoint); None = no check.
        strict: refuse atoms of elements the model never saw (UserError); False warns once each.
        skin: Verlet skin in Å (0 = search the neighbours at every step).
        partitions, group: run the graph over ``partitions`` ranks of an initialised process group
            (see :class:`~scalable_equiformer.calculator.EquiformerCalculator`).
        label: how messages name the model (the checkpoint path).
    """

    def __init__(self, model: torch.nn.Module, *, elements: Optional[Sequence[int]] = None, strict: bool = True,
                 skin: float = DEFAULT_SKIN, partitions: int = 1, group=None, label: str = "model", config=None):
        if not float(skin) >= 0:
            raise UserError(f"{label}: the Verlet skin must be >= 0 Å, not {skin}")
        self.model = model.eval()
        self.config = config
        self.label = label
        self.elements = sorted({int(z) for z in elements}) if elements is not None else None
        self.strict = bool(strict)
        self.skin = float(skin)
        self.cutoff = float(model.cutoff)
        self.device = next(iter(model.parameters())).device
        self.dtype = model.dtype
        self.partitioned = None
        if int(partitions) > 1:
            from ..parallel import partitioned_model

            self.partitioned = partitioned_model(model, int(partitions), group)
        self._warned: set[int] = set()
        self._z: Optional[torch.Tensor] = None
        self._candidates: Optional[torch.Tensor] = None
        self._reference: Optional[torch.Tensor] = None
        #: how many neighbour searches and steps have run (the benchmark reports them)
        self.searches = 0
        self.steps = 0
        warn_if_not_smooth(model, label)

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[str, Path], device=None, dtype=None, **kwargs) -> "Potential":
        """A potential from a training checkpoint (``best.pt`` or a run folder): the weights the
        run evaluated (EMA when kept), in ``dtype`` (None = as trained), on ``device``
        (None/'auto' = the GPU when there is one)."""
        from ..runtime import parse_device
        from ..inference import load_model

        model, config, info = load_model(checkpoint, device=parse_device(device), dtype=dtype)
        kwargs.setdefault("elements", info.get("elements"))
        kwargs.setdefault("label", str(checkpoint))
        return cls(model, config=config, **kwargs)

    # -- per system ----------------------------------------------------------------------------

    def set_numbers(self, numbers: Sequence[int]) -> None:
        """The atomic numbers of the system (checked against the model's elements once)."""
        from ..checkpoint_io import check_atomic_numbers

        numbers = np.asarray(numbers).reshape(-1)
        if numbers.size == 0:
            raise UserError(f"{self.label}: the system has no atoms; nothing to compute")
        check_atomic_numbers(numbers.tolist(), max_atomic_number=getattr(self.model, "max_atomic_number", None),
                             elements=self.elements, where=self.label, strict=self.strict, warned=self._warned,
                             hint="pass strict=False to compute them with a warning")
        self._z = torch.as_tensor(numbers.astype(np.int64), device=self.device)
        self._candidates = self._reference = None

    @property
    def num_atoms(self) -> int:
        return 0 if self._z is None else int(self._z.shape[0])

    # -- per step ------------------------------------------------------------------------------

    def _positions(self, positions) -> torch.Tensor:
        pos = torch.as_tensor(np.asarray(positions, dtype=np.float64) if not torch.is_tensor(positions) else positions,
                              dtype=torch.float64, device=self.device)
        if self._z is None:
            raise UserError(f"{self.label}: call set_numbers(...) before computing")
        if pos.shape != (self.num_atoms, 3):
            raise UserError(f"{self.label}: positions must be [{self.num_atoms}, 3] (Å), got {tuple(pos.shape)}")
        if not bool(torch.isfinite(pos).all()):
            raise UserError(f"{self.label}: positions contain NaN or inf (the simulation has blown up)")
        return pos

    def edges(self, pos: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``edge_index`` of ``pos`` (centred, model dtype): the pairs closer than the cutoff, from
        the Verlet candidates (searched again when an atom has moved more than skin / 2).
        ``batch``: the molecule of each atom when ``pos`` holds several (no pair across two); the
        candidates belong to one set of atoms: :meth:`set_numbers` again when it changes."""
        from ..nn.graph import radius_graph

        pos = pos.detach()
        if self.skin == 0:
            self.searches += 1
            return radius_graph(pos, self.cutoff, batch)
        if self._candidates is not None:
            moved = (pos.to(torch.float64) - self._reference).norm(dim=-1).max()
            if float(moved) > 0.5 * self.skin:
                self._candidates = None
        if self._candidates is None:
            self._candidates = radius_graph(pos, self.cutoff + self.skin, batch)
            self._reference = pos.to(torch.float64)
            self.searches += 1
        src, dst = self._candidates
        # the arithmetic of radius_graph's exact check: pos's dtype (float32 at least), strict <
        p = pos if pos.dtype in (torch.float32, torch.float64) else pos.float()
        diff = p[src] - p[dst]
        keep = (diff * diff).sum(-1).sqrt() < self.cutoff
        return self._candidates[:, keep]

    def evaluate(self, positions, batch: Optional[torch.Tensor] = None, num_graphs: int = 1,
                 forces: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(energy [num_graphs] eV float64, forces [N, 3] eV/Å in the model dtype or None)`` as
        tensors on the model's device: the step of :meth:`compute`, for molecules of the system of
        :meth:`set_numbers` given by ``batch`` (the molecule of each atom; None = one molecule).
        Each molecule is centred in float64; the edges come from the Verlet list."""
        from ..nn.forces import centred_positions

        pos64 = self._positions(positions)
        self.steps += 1
        if batch is None:
            batch = torch.zeros(self.num_atoms, dtype=torch.long, device=self.device)
        pos = centred_positions(pos64, batch, num_graphs, self.dtype)
        edge_index = self.edges(pos, batch)
        if not forces:
            with torch.no_grad():
                return self.model.energy(pos, self._z, batch, num_graphs, edge_index=edge_index, check=False), None
        with torch.enable_grad():
            pos = pos.detach().requires_grad_(True)
            energy = self.model.energy(pos, self._z, batch, num_graphs, edge_index=edge_index, check=False)
            (grad,) = torch.autograd.grad(energy.sum(), pos)
        return energy.detach(), (-grad).detach()

    def compute(self, positions) -> tuple[float, np.ndarray]:
        """``(energy eV, forces [N, 3] eV/Å)`` at ``positions`` ([N, 3] Å) of the system of
        :meth:`set_numbers`; float64 whatever the model's dtype."""
        if self.partitioned is not None:
            self.steps += 1
            return self._compute_partitioned(self._positions(positions))
        energy, forces = self.evaluate(positions)
        return float(energy[0]), forces.to("cpu", torch.float64).numpy()

    def _compute_partitioned(self, pos64: torch.Tensor) -> tuple[float, np.ndarray]:
        from torch_geometric.data import Batch, Data

        batch = Batch.from_data_list([Data(pos=pos64, z=self._z)])
        with torch.enable_grad():
            out = self.partitioned(batch, compute_forces=True)
        return float(out["energy"].detach().reshape(-1)[0]), out["forces"].detach().to("cpu", torch.float64).numpy()


__all__ = ["Potential", "warn_if_not_smooth", "DEFAULT_SKIN"]
