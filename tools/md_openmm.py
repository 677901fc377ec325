#!/usr/bin/env python
"""Molecular dynamics with a trained model in OpenMM: a molecule in vacuum, or solvated as ML/MM.

    python tools/md_openmm.py --checkpoint runs/md22_atat/best.pt --molecule atat --steps 2000
    python tools/md_openmm.py --checkpoint runs/md22_ac_ala3_nhme/best.pt --molecule peptide --solvate --steps 2000

``--molecule``: ``atat`` (frame 0 of the shipped AT-AT GFN2-xTB frames: elements only, a
one-residue topology is made for it), ``peptide`` (the shipped Ac-Ala3-NHMe,
``demo_data/ac_ala3_nhme.pdb``), or a PDB file.

Vacuum: the whole molecule on the model (``MLPotential("equiformer").createSystem``).
``--solvate``: OpenMM's Modeller puts the molecule in a box of TIP3P water (``--padding`` nm on
each side), Amber14 (``amber14-all.xml`` + ``amber14/tip3p.xml``, PME, rigid water, bonds to H
constrained) models everything, then ``createMixedSystem`` moves the molecule's internal energy to
the model (ML/MM, mechanical embedding: the molecule-water terms stay Amber's; ``mlLongRange=False``).
The molecule needs Amber14 templates (residue and atom names), so ``atat`` cannot be solvated. The
solvated box is relaxed with Amber alone (``--minimise`` iterations) before the ML/MM run.

Dynamics: Langevin (``LangevinMiddleIntegrator``, ``--friction`` 1/ps) at ``--temperature``, or
NVE (``--ensemble nve``: ``VerletIntegrator``). Written to ``--out`` (a folder): ``trajectory.dcd``
(every ``--report-every`` steps), ``topology.pdb`` (the first frame, to read the DCD with),
``energy.csv`` (OpenMM's StateDataReporter: step, time, potential, kinetic and total energy in
kJ/mol, temperature, speed) and ``run.json`` (the settings, the atom counts, ns/day).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "scalable_equiformer" / "demo_data"
MOLECULES = {"atat": DEMO / "AT-AT_xtb_500K_20frames.npz", "peptide": DEMO / "ac_ala3_nhme.pdb"}


def load_molecule(name: str):
    """``(topology, positions in nm as an OpenMM Quantity, label)`` of a shipped molecule or a PDB."""
    import numpy as np
    import openmm.app as app
    import openmm.unit as unit

    from scalable_equiformer.errors import UserError
    from scalable_equiformer.md.openmm import topology_from_numbers

    path = MOLECULES.get(name, Path(name))
    if not path.is_file():
        raise UserError(f"--molecule {name}: no such file (give atat, peptide or a PDB file)")
    if path.suffix == ".npz":
        from scalable_equiformer.data import load_dataset

        item = load_dataset(path)[0]
        pos = item.pos.double().numpy() / 10.0
        return topology_from_numbers(item.z.numpy()), unit.Quantity(np.asarray(pos), unit.nanometer), path.name
    if path.suffix.lower() != ".pdb":
        raise UserError(f"--molecule {name}: expected a .pdb file (or atat / peptide)")
    try:
        pdb = app.PDBFile(str(path))
    except Exception as exc:  # OpenMM's reader raises plain exceptions on a bad file
        raise UserError(f"--molecule {path}: not a readable PDB file ({' '.join(str(exc).split())})") from None
    if pdb.topology.getPeriodicBoxVectors() is not None:
        pdb.topology.setPeriodicBoxVectors(None)  # a CRYST1 record: the molecule alone is not periodic
    return pdb.topology, pdb.positions, path.name


def solvate(topology, positions, padding_nm: float, label: str):
    """``(topology, positions, mm_system, ml_atoms)``: the molecule in TIP3P water, all of it Amber14."""
    import openmm.app as app
    import openmm.unit as unit

    from scalable_equiformer.errors import UserError

    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    modeller = app.Modeller(topology, positions)
    try:
        modeller.addSolvent(ff, model="tip3p", padding=padding_nm * unit.nanometer)
        box = modeller.topology.getPeriodicBoxVectors()
        cutoff = min(1.0, 0.5 * min(box[i][i].value_in_unit(unit.nanometer) for i in range(3)) - 0.01)
        mm_system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff * unit.nanometer,
                                    constraints=app.HBonds, rigidWater=True)
    except ValueError as exc:  # "No template found for residue ..." and the like
        raise UserError(f"--solvate {label}: Amber14 cannot model this molecule ({' '.join(str(exc).split())[:300]}); "
                        "--solvate needs a PDB with Amber14 residue and atom names, e.g. --molecule peptide") from None
    n = topology.getNumAtoms()
    return modeller.topology, modeller.positions, mm_system, list(range(n))


def build(args):
    """``(simulation, info)`` for the command line ``args``."""
    import openmm
    import openmm.app as app
    import openmm.unit as unit
    from openmmml import MLPotential

    from scalable_equiformer.errors import UserError

    topology, positions, label = load_molecule(args.molecule)
    potential = MLPotential("equiformer", checkpoint=args.checkpoint, device=args.device, dtype=args.dtype)
    try:
        platform = openmm.Platform.getPlatformByName(args.platform)
    except openmm.OpenMMException:
        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise UserError(f"--platform {args.platform}: not available here "
                        f"(this OpenMM has {', '.join(names)})") from None
    info = {"molecule": label, "ml_atoms": topology.getNumAtoms()}
    if args.solvate:
        topology, positions, mm_system, ml_atoms = solvate(topology, positions, args.padding, label)
        relax = openmm.Context(mm_system, openmm.VerletIntegrator(0.001), platform)
        relax.setPositions(positions)
        openmm.LocalEnergyMinimizer.minimize(relax, 10.0, args.minimise)
        positions = relax.getState(getPositions=True).getPositions()
        system = potential.createMixedSystem(topology, mm_system, ml_atoms, mlLongRange=False)
        info.update(atoms=topology.getNumAtoms(), waters=sum(r.name == "HOH" for r in topology.residues()))
    else:
        system = potential.createSystem(topology)
        info.update(atoms=topology.getNumAtoms(), waters=0)
    dt = args.timestep * unit.femtosecond
    if args.ensemble == "nve":
        integrator = openmm.VerletIntegrator(dt)
    else:
        integrator = openmm.LangevinMiddleIntegrator(args.temperature * unit.kelvin, args.friction / unit.picosecond,
                                                     dt)
        integrator.setRandomNumberSeed(args.seed)
    simulation = app.Simulation(topology, system, integrator, platform)
    simulation.context.setPositions(positions)
    simulation.context.setVelocitiesToTemperature(args.temperature * unit.kelvin, args.seed)
    return simulation, info


def _main(args) -> int:
    import openmm
    import openmm.app as app

    from scalable_equiformer.errors import UserError

    args.out.mkdir(parents=True, exist_ok=True)
    simulation, info = build(args)
    state = simulation.context.getState(getPositions=True)
    with open(args.out / "topology.pdb", "w") as f:
        app.PDBFile.writeFile(simulation.topology, state.getPositions(), f)
    every = min(args.report_every, args.steps)
    simulation.reporters.append(app.DCDReporter(str(args.out / "trajectory.dcd"), every))
    simulation.reporters.append(app.StateDataReporter(
        str(args.out / "energy.csv"), every, step=True, time=True, potentialEnergy=True, kineticEnergy=True,
        totalEnergy=True, temperature=True, speed=True))
    start = time.perf_counter()
    try:
        simulation.step(args.steps)
    except openmm.OpenMMException as exc:  # an error inside the model's force reaches us as OpenMM's
        raise UserError(f"OpenMM stopped after {simulation.currentStep} of {args.steps} steps: "
                        f"{' '.join(str(exc).split())}") from None
    seconds = time.perf_counter() - start
    ns_per_day = args.steps * args.timestep * 1e-6 / seconds * 86400.0
    info.update(steps=args.steps, timestep_fs=args.timestep, ensemble=args.ensemble, temperature_K=args.temperature,
                platform=args.platform, checkpoint=str(args.checkpoint), seconds=seconds, ns_per_day=ns_per_day)
    (args.out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    what = (f"{info['molecule']} in {info['waters']} TIP3P waters (ML/MM)" if args.solvate
            else f"{info['molecule']} in vacuum")
    print(f"{what}: {info['atoms']} atoms ({info['ml_atoms']} on the model), {args.steps} steps of "
          f"{args.timestep:g} fs in {seconds:.1f} s ({ns_per_day:.3f} ns/day); "
          f"wrote {args.out}/trajectory.dcd, energy.csv, topology.pdb")
    return 0


def main(argv=None) -> int:
    from scalable_equiformer.cli import (
        ArgumentParser, exit_on_user_error, nonnegative_int, positive_float, positive_int,
    )

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (best.pt) or run folder")
    p.add_argument("--molecule", default="atat", help="atat, peptide or a PDB file (default atat)")
    p.add_argument("--solvate", action="store_true",
                   help="ML/MM: the molecule in TIP3P water, water and coupling Amber14")
    p.add_argument("--padding", type=positive_float, default=1.0, help="water around the molecule, nm (default 1.0)")
    p.add_argument("--minimise", type=nonnegative_int, default=200,
                   help="--solvate: iterations of the Amber-only relaxation of the box "
                        "(0 = until converged; default 200)")
    p.add_argument("--steps", type=positive_int, default=1000, help="MD steps (default 1000)")
    p.add_argument("--timestep", type=positive_float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--ensemble", choices=("nvt", "nve"), default="nvt",
                   help="nvt: Langevin (default); nve: velocity Verlet")
    p.add_argument("--temperature", type=positive_float, default=300.0,
                   help="K: thermostat and start velocities (default 300)")
    p.add_argument("--friction", type=positive_float, default=1.0, help="Langevin friction, 1/ps (default 1)")
    p.add_argument("--seed", type=positive_int, default=1, help="velocities and Langevin noise (default 1)")
    p.add_argument("--report-every", type=positive_int, default=10,
                   help="steps between frames and energy lines (default 10)")
    p.add_argument("--platform", choices=("CPU", "Reference", "CUDA", "OpenCL"), default="CPU",
                   help="OpenMM platform (default CPU)")
    p.add_argument("--device", default=None,
                   help="the model's device: cpu, cuda (default: the GPU when there is one)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="the model's precision (default: as trained)")
    p.add_argument("--out", type=Path, default=Path("runs/md_openmm"), help="output folder (default runs/md_openmm)")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; give a folder")
    return exit_on_user_error(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
