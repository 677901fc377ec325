"""The batched engine: a trained Equiformer behind TorchSim's model interface.

`TorchSim <https://github.com/TorchSim/torch-sim>`_ (``pip install torch-sim-atomistic``; 0.3.0
is the last release for Python 3.11 and runs with this project's pinned torch) integrates and
relaxes many systems at once on one device: a :class:`torch_sim.SimState` holds the atoms of all
of them (``positions`` [n_atoms, 3] Å, ``atomic_numbers``, ``system_idx`` [n_atoms], ``cell``,
``pbc``), and every MD or optimizer step calls the model once for the whole state.
:class:`EquiformerModel` answers that call with one batched forward of the model over all the
molecules of the state: ``energy`` [n_systems] eV and ``forces`` [n_atoms, 3] eV/Å, the numbers
of :class:`~scalable_equiformer.md.Potential` (and of the ASE calculator) for each molecule alone.

The inference path is :class:`~scalable_equiformer.md.Potential`'s: eval mode, the forces from one
``autograd.grad`` over the positions (no ``create_graph``, no parameter gradient), each molecule
centred in float64 before the cast to the model's dtype, one Verlet neighbour list over all the
molecules (never a pair across two), the atomic numbers checked against the checkpoint's elements
when they change (TorchSim dropping converged systems, a new state), not per step.

Refused, in one line naming the model: a periodic state (the model is for isolated molecules; it
has no periodic images), ``compute_stress=True`` (no cell, hence no stress: a molecular model;
``NPT`` integrators and cell optimizers need one) and elements the model never saw. A model trained
without the smooth cutoff warns once (its NVE energy drifts).

>>> import torch_sim as ts                                                   # doctest: +SKIP
>>> model = EquiformerModel("runs/md22_atat/best.pt", device="cuda")         # doctest: +SKIP
>>> final = ts.integrate(system=[atoms] * 32, model=model, integrator=ts.nvt_langevin,
...                      n_steps=1000, temperature=300.0, timestep=0.0005)    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as exc:  # pragma: no cover - the md extra installs it
    raise ImportError(f"scalable_equiformer.md.torchsim needs TorchSim: pip install '.[md]' ({exc})") from exc

from ..errors import UserError
from .potential import DEFAULT_SKIN, Potential


class EquiformerModel(ModelInterface):
    """A trained Equiformer as a TorchSim model: many molecules per call, one forward.

    Args:
        model: a training checkpoint (``best.pt`` or a run folder), a trained
            :class:`~scalable_equiformer.nn.equiformer.Equiformer`, or a
            :class:`~scalable_equiformer.md.Potential`.
        device: where the model runs (None/'auto' = the GPU when there is one; a module passed in
            is moved there).
        dtype: the model's precision and TorchSim's (states are built in it): None = as trained;
            'float64' / torch.float64 or float32 casts it. Energies are summed in float64 inside
            the model whatever the dtype.
        compute_forces: False gives energies only (no gradient).
        compute_stress: must stay False: a non-periodic model has no stress (UserError otherwise).
        strict: refuse elements the model never saw (False: warn once per element).
        skin: Verlet skin in Å (0 = a neighbour search at every call).
        elements: for a module: the atomic numbers it was trained on (None = no check); a
            checkpoint brings its own.
    """

    def __init__(self, model: Union[str, Path, torch.nn.Module, Potential], device=None, dtype=None, *,
                 compute_forces: bool = True, compute_stress: bool = False, strict: bool = True,
                 skin: float = DEFAULT_SKIN, elements=None, label: Optional[str] = None) -> None:
        super().__init__()
        name = label or (str(model) if isinstance(model, (str, Path)) else "EquiformerModel")
        if compute_stress:
            raise UserError(f"{name}: compute_stress=True is not supported: the Equiformer is a non-periodic model "
                            "of isolated molecules and has no stress (use NVE/NVT integrators and position-only "
                            "optimizers)")
        if isinstance(model, Potential):
            potential = model
        elif isinstance(model, (str, Path)):
            potential = Potential.from_checkpoint(model, device=device, dtype=dtype, strict=strict, skin=skin,
                                                  label=name)
        elif isinstance(model, torch.nn.Module):
            from ..runtime import parse_device, parse_dtype

            if device is not None:
                model = model.to(parse_device(device))
            if dtype is not None:
                model = model.to(parse_dtype(dtype))
            potential = Potential(model, elements=elements, strict=strict, skin=skin, label=name)
        else:
            raise UserError(f"EquiformerModel: model must be a checkpoint path, an Equiformer or a Potential, "
                            f"not {type(model).__name__}")
        self.potential = potential
        self.model = potential.model  # a submodule: .to(), state_dict() and repr see it
        self.label = potential.label
        self._device = potential.device
        self._dtype = potential.dtype
        self._compute_forces = bool(compute_forces)
        self._compute_stress = False
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff: neighbours grow with density
        self._system_idx: Optional[torch.Tensor] = None
        self._n_systems = 0

    def _set_systems(self, atomic_numbers: torch.Tensor, system_idx: torch.Tensor) -> None:
        """A new set of molecules (the first call, or TorchSim dropped / added systems): check the
        elements once and start a new Verlet list."""
        self.potential.set_numbers(atomic_numbers.detach().to("cpu").numpy())
        self._system_idx = system_idx.detach().to(self._device, torch.long).clone()
        self._n_systems = int(self._system_idx.max()) + 1

    def forward(self, state: Union["ts.SimState", dict], **_) -> dict[str, torch.Tensor]:
        """``{"energy": [n_systems] eV, "forces": [n_atoms, 3] eV/Å}`` of all the molecules of
        ``state``, in the model's dtype; ``state`` is not modified."""
        if isinstance(state, dict):  # a StateDict: positions, atomic_numbers, system_idx (+ cell, pbc, masses)
            state, pos = dict(state), state["positions"]
            n_systems = int(state["system_idx"].max()) + 1 if state.get("system_idx") is not None else 1
            state.setdefault("masses", torch.ones(pos.shape[0], dtype=pos.dtype, device=pos.device))
            state.setdefault("cell", torch.zeros(n_systems, 3, 3, dtype=pos.dtype, device=pos.device))
            state.setdefault("pbc", False)
            state = ts.SimState(**state)
        if bool(torch.as_tensor(state.pbc).any()):
            raise UserError(f"{self.label}: the state is periodic (pbc=True), but the Equiformer is a non-periodic "
                            "model of isolated molecules; build the state with pbc=False (ASE: atoms.pbc = False)")
        z, system_idx = state.atomic_numbers, state.system_idx
        pot = self.potential
        if (self._system_idx is None or z.shape[0] != pot.num_atoms or not torch.equal(system_idx, self._system_idx)
                or not torch.equal(z.to(pot._z.device, torch.long), pot._z)):
            self._set_systems(z, system_idx)
        energy, forces = pot.evaluate(state.positions.detach(), self._system_idx, self._n_systems,
                                      forces=self._compute_forces)
        if forces is None:
            return {"energy": energy.to(self._dtype)}
        return {"energy": energy.to(self._dtype), "forces": forces.to(self._dtype)}

__all__ = ["EquiformerModel"]
