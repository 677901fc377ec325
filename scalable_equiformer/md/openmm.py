"""The trained potential in OpenMM, through openmm-ml: ``MLPotential("equiformer", checkpoint=...)``.

Registered as the openmm-ml potential ``"equiformer"`` (entry point ``openmmml.potentials`` in
``pyproject.toml``; ``pip install '.[md]'`` installs OpenMM and openmm-ml)::

    from openmmml import MLPotential
    potential = MLPotential("equiformer", checkpoint="runs/md22_atat/best.pt")
    system = potential.createSystem(topology)                      # the whole molecule on the model
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms, mlLongRange=False)   # ML/MM

Each system gets an :class:`openmm.PythonForce` (OpenMM >= 8.5: no TorchScript, no compiled
plugin) applied to the ML atoms through ``setParticles()``; every force evaluation calls
:meth:`scalable_equiformer.md.Potential.compute` (eval mode, no ``create_graph``, a Verlet list),
converting nm -> Å on the way in and eV -> kJ/mol, eV/Å -> kJ/mol/nm on the way out. It runs on
any OpenMM platform (Reference, CPU, CUDA: the model runs on its own ``device``, the positions
cross over each step).

Arguments of ``MLPotential("equiformer", ...)``:

* ``checkpoint``: a training checkpoint (``best.pt``) or run folder (required);
* ``device``: ``'cpu'``, ``'cuda'``, ``'cuda:1'``; None / ``'auto'`` = the GPU when there is one;
* ``dtype``: ``'float32'`` / ``'float64'``; None = the precision the model was trained in;
* ``partitions``, ``group``: the graph over ``partitions`` ranks of an initialised process group,
  as in the ASE calculator (every rank runs the same OpenMM script);
* ``skin``: the Verlet skin in Å (default :data:`~scalable_equiformer.md.potential.DEFAULT_SKIN`);
* ``strict``: refuse elements the model never saw (default); False computes them with a warning.

The model is for isolated molecules: it has no periodic images and no long-range terms. A
periodic topology or MM system therefore needs ``mlLongRange=False`` (openmm-ml's option: the ML
region's interactions with its own periodic images are then left to the MM force field), and
without it the refusal says so in one line instead of openmm-ml's generic error. The solute must be
smaller than half the box (its atoms are passed to the model as one unwrapped molecule).

Loading is deferred to the first ``createSystem`` / ``createMixedSystem``: importing this module
(which ``import openmmml`` does for every installed potential) imports neither torch nor the model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Optional

import openmm
import openmm.app
from openmmml.mlpotential import MLPotential, MLPotentialImpl, MLPotentialImplFactory

from ..errors import UserError

#: 1 eV in kJ/mol (e * N_A / 1000; both exact in the 2019 SI, as OpenMM's units have them).
EV_TO_KJ_PER_MOL = 96.48533212331
#: Å per nm.
ANGSTROM_PER_NM = 10.0
#: the name openmm-ml knows the potential by.
NAME = "equiformer"


def _atom_label(atom: "openmm.app.topology.Atom") -> str:
    return f"atom {atom.index} ({atom.name} of {atom.residue.name} {atom.residue.id})"


def topology_from_numbers(numbers: Iterable[int], residue: str = "MOL") -> openmm.app.Topology:
    """An OpenMM Topology of one residue holding atoms of atomic numbers ``numbers`` (no bonds:
    enough for a system wholly on the model, e.g. the shipped AT-AT frames, which have no residues)."""
    top = openmm.app.Topology()
    res = top.addResidue(residue, top.addChain())
    counts: dict[str, int] = {}
    for z in numbers:
        element = openmm.app.Element.getByAtomicNumber(int(z))
        counts[element.symbol] = counts.get(element.symbol, 0) + 1
        top.addAtom(f"{element.symbol}{counts[element.symbol]}", element, res)
    return top


class EquiformerForce:
    """The computation of the :class:`openmm.PythonForce`: OpenMM state (nm) -> (kJ/mol, kJ/mol/nm).

    ``potential`` is the :class:`~scalable_equiformer.md.Potential` of this system (its
    ``searches`` and ``steps`` count neighbour searches and evaluations); ``seconds`` is the time
    spent in :meth:`Potential.compute`, ``calls`` the number of evaluations (the benchmark reports them).
    Pickled (``XmlSerializer``) as the checkpoint path, the potential's options and the atomic
    numbers; unpickling loads the checkpoint again.
    """

    def __init__(self, potential, reload: Optional[tuple] = None):
        self.potential = potential
        self.reload = reload
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, state: openmm.State):
        positions = state.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer) * ANGSTROM_PER_NM
        start = time.perf_counter()
        energy, forces = self.potential.compute(positions)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return energy * EV_TO_KJ_PER_MOL, forces * (EV_TO_KJ_PER_MOL * ANGSTROM_PER_NM)

    def __reduce__(self):
        if self.reload is None:  # a model object, not a checkpoint: OpenMM keeps the force unpicklable
            raise TypeError("an EquiformerForce built from a model object cannot be pickled; "
                            "build it from a checkpoint")
        return _force_from_checkpoint, self.reload


def _force_from_checkpoint(checkpoint: str, options: dict, numbers: list) -> EquiformerForce:
    from .potential import Potential

    pot = Potential.from_checkpoint(checkpoint, **options)
    pot.set_numbers(numbers)
    return EquiformerForce(pot, (checkpoint, options, numbers))


class EquiformerPotentialImplFactory(MLPotentialImplFactory):
    """Creates :class:`EquiformerPotentialImpl` objects (the ``openmmml.potentials`` entry point)."""

    def createImpl(self, name: str, checkpoint=None, device=None, dtype=None, partitions: int = 1, group=None,
                   skin: Optional[float] = None, strict: bool = True, **args) -> "EquiformerPotentialImpl":
        if args:
            raise UserError(f"MLPotential({name!r}): unknown option(s) {', '.join(sorted(args))}; it takes "
                            "checkpoint=, device=, dtype=, partitions=, group=, skin=, strict=")
        return EquiformerPotentialImpl(name, checkpoint, device=device, dtype=dtype, partitions=partitions, group=group,
                                       skin=skin, strict=strict)


class EquiformerPotentialImpl(MLPotentialImpl):
    """A trained Equiformer as an openmm-ml potential (see the module docstring for the options)."""

    def __init__(self, name: str, checkpoint, *, device=None, dtype=None, partitions: int = 1, group=None,
                 skin: Optional[float] = None, strict: bool = True):
        if checkpoint is None:
            raise UserError(f"MLPotential({name!r}) needs checkpoint= "
                            "(a training checkpoint such as runs/<run>/best.pt)")
        if not Path(checkpoint).exists():
            raise UserError(f"MLPotential({name!r}): checkpoint {checkpoint} does not exist")
        if int(partitions) < 1:
            raise UserError(f"MLPotential({name!r}): partitions must be >= 1, not {partitions}")
        self.name = name
        self.checkpoint = str(checkpoint)
        self.device = None if device is None else str(device)
        self.dtype = None if dtype is None else str(dtype).replace("torch.", "")
        self.partitions = int(partitions)
        self.group = group
        self.skin = skin
        self.strict = bool(strict)
        self._template = None
        #: the EquiformerForce of each system built so far (the benchmark reads their counters)
        self.forces: list[EquiformerForce] = []

    # -- openmm-ml's interface -----------------------------------------------------------------

    def getMLLongRange(self) -> Optional[bool]:
        # None, not False: openmm-ml then takes the user's mlLongRange=False (with False here it
        # would refuse that option); createMixedSystem below makes its absence a clear error.
        return None

    def getSupportedEmbeddings(self) -> list[str]:
        # openmm-ml's mechanical embedding, behind the periodic-box check of createMixedSystem
        return ["mechanical"]

    def createMixedSystem(self, topology, system, atoms, forceGroup, interpolate, embedding, returnInfo=False, **args):
        self._check_periodic(topology, system, args, "createMixedSystem")
        self._ml_atoms(topology, system, atoms)
        embedder = MLPotential._embeddingFactories[embedding].createEmbedding(embedding)
        return embedder.createMixedSystem(self, topology, system, list(atoms), forceGroup, interpolate,
                                          returnInfo=returnInfo, **args)

    def addForces(self, topology: openmm.app.Topology, system: openmm.System, atoms: Optional[Iterable[int]],
                  forceGroup: int, **args) -> None:
        """Add the model's :class:`openmm.PythonForce` on ``atoms`` (None = all) of ``system``."""
        misplaced = sorted(set(args) & {"checkpoint", "device", "dtype", "precision", "partitions", "group", "skin",
                                        "strict"})
        if misplaced:
            raise UserError(f"{self.checkpoint}: {', '.join(misplaced)} belong(s) to MLPotential({self.name!r}, ...), "
                            "not to createSystem / createMixedSystem")
        self._check_periodic(topology, system, args, "createSystem" if atoms is None else "createMixedSystem")
        chosen = self._ml_atoms(topology, system, atoms)
        if not chosen:
            raise UserError(f"{self.checkpoint}: no atoms for the model (empty ML region)")
        no_element = [a for a in chosen if a.element is None]
        if no_element:
            raise UserError(f"{self.checkpoint}: topology {_atom_label(no_element[0])} has no element (a virtual "
                            "site or extra particle?); the model takes atoms only: leave it out of the ML atoms")
        numbers = [a.element.atomic_number for a in chosen]
        pot = self._new_potential()
        try:
            pot.set_numbers(numbers)
        except UserError as exc:
            unknown = (a for a in chosen if pot.elements is not None and a.element.atomic_number not in pot.elements)
            first = next(unknown, chosen[0])
            raise UserError(f"{exc} (the topology's first such atom: {_atom_label(first)})") from None
        compute = EquiformerForce(pot, (self.checkpoint, self._options(), numbers) if self.partitions == 1 else None)
        force = openmm.PythonForce(compute)
        force.setName(f"Equiformer ({Path(self.checkpoint).name})")
        force.setForceGroup(forceGroup)
        force.setUsesPeriodicBoundaryConditions(False)
        if atoms is not None:
            force.setParticles([a.index for a in chosen])
        system.addForce(force)
        self.forces.append(compute)

    # -- helpers -------------------------------------------------------------------------------

    def _options(self) -> dict:
        opts = {"device": self.device, "dtype": self.dtype, "strict": self.strict}
        if self.skin is not None:
            opts["skin"] = self.skin
        return opts

    def _new_potential(self):
        """A :class:`Potential` for one system; the checkpoint is loaded once per MLPotential (so a
        model without the smooth cutoff is warned about once), its model shared by the systems."""
        from .potential import Potential

        opts = self._options()
        if self._template is None:
            self._template = Potential.from_checkpoint(self.checkpoint, **opts)
        t = self._template
        if self.partitions == 1 and not self.forces:
            return t
        opts.pop("device"), opts.pop("dtype")
        return Potential(t.model, elements=t.elements, partitions=self.partitions, group=self.group, label=t.label,
                         config=t.config, **opts)

    def _ml_atoms(self, topology, system, atoms) -> list:
        """The topology's atoms that ``atoms`` (None = all) names, checked against the System."""
        n_top, n_sys = topology.getNumAtoms(), system.getNumParticles()
        if n_top != n_sys:
            raise UserError(f"{self.checkpoint}: the topology has {n_top} atoms but the System has {n_sys} particles; "
                            "build the System from this topology")
        all_atoms = list(topology.atoms())
        if atoms is None:
            return all_atoms
        index = [int(i) for i in atoms]
        bad = [i for i in index if not 0 <= i < n_top]
        if bad:
            raise UserError(f"{self.checkpoint}: ML atom index {bad[0]} is not an atom of the topology "
                            f"(it has {n_top}: 0-{n_top - 1})")
        if len(set(index)) != len(index):
            raise UserError(f"{self.checkpoint}: the ML atoms list atom {_first_repeat(index)} more than once")
        return [all_atoms[i] for i in index]

    def _check_periodic(self, topology, system, args: dict, method: str) -> None:
        periodic = topology.getPeriodicBoxVectors() is not None or system.usesPeriodicBoundaryConditions()
        long_range = args.get("mlLongRange")
        if long_range:
            raise UserError(f"{self.checkpoint}: mlLongRange=True, but this model has no long-range terms (it sees "
                            "pairs closer than its cutoff only); pass mlLongRange=False")
        if periodic and long_range is None:
            raise UserError(
                f"{self.checkpoint}: the {'System' if system.usesPeriodicBoundaryConditions() else 'topology'} is "
                f"periodic, and this model is for isolated molecules (no periodic images, no long-range terms): pass "
                f"mlLongRange=False to {method} (the ML atoms are then one molecule for the model and their "
                "periodic images interact through the MM force field), or remove the box")


def _first_repeat(index: list[int]) -> int:
    seen: set[int] = set()
    for i in index:
        if i in seen:
            return i
        seen.add(i)
    return index[0]


__all__ = ["EquiformerPotentialImplFactory", "EquiformerPotentialImpl", "EquiformerForce", "topology_from_numbers",
           "EV_TO_KJ_PER_MOL", "ANGSTROM_PER_NM", "NAME"]
