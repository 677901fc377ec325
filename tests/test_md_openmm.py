"""OpenMM through openmm-ml (``MLPotential("equiformer", checkpoint=...)``), with the real engine on
the Reference platform (double precision) and the ``atat_checkpoint`` model (fp64, smooth cutoff,
trained through train.py on the shipped AT-AT frames: H, C, N, O).

* the entry point is registered and ``import openmmml`` does not import torch;
* OpenMM's energy and forces equal the calculator's and the Potential's (1e-9 relative);
* NVE (VerletIntegrator, 0.5 fs x ``NVE_STEPS``, AT-AT at 300 K) conserves the total energy: the
  drift (slope of a least-squares line) below ``DRIFT_BOUND`` meV/atom/ps and no step further than
  ``FLUCTUATION_BOUND`` meV/atom from the start, the bounds of the ASE test (test_calculator.py).
  Measured here: drift 0.44 meV/atom/ps, largest excursion 0.75 meV/atom (printed with ``-s``);
* ML/MM: the mixed system's energy and forces equal ML(peptide) + MM(everything) - MM(peptide alone)
  computed separately (the peptide's internal MM terms replaced by the model, the peptide-water
  terms kept), non-periodic so that MM is pairwise additive; a periodic PME box runs with
  ``mlLongRange=False`` and is refused without it;
* bad input: one line each;
* ``tools/md_openmm.py``: the README's two commands, a few steps each, and the files they write.

About 1.5 min on 2 shared cores (the checkpoint fixture ~25 s of it).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

openmm = pytest.importorskip("openmm")
pytest.importorskip("openmmml")
import openmm.app as app  # noqa: E402
import openmm.unit as unit  # noqa: E402
from openmmml import MLPotential  # noqa: E402

from scalable_equiformer.errors import UserError  # noqa: E402
from scalable_equiformer.md import Potential  # noqa: E402
from scalable_equiformer.md.openmm import EV_TO_KJ_PER_MOL, topology_from_numbers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scalable_equiformer" / "demo_data"
ATAT = DEMO / "AT-AT_xtb_500K_20frames.npz"
PEPTIDE = DEMO / "ac_ala3_nhme.pdb"
DRIFT_BOUND = 1.0  # meV / atom / ps (test_calculator.py's)
FLUCTUATION_BOUND = 1.0  # meV / atom
NVE_STEPS = 200
KJ = unit.kilojoule_per_mole


@pytest.fixture(autouse=True, scope="module")
def _entry_point():
    from openmmml.mlpotential import MLPotential as _M

    if "equiformer" not in _M._implFactories:
        pytest.fail("openmm-ml has no 'equiformer' potential: the openmmml.potentials entry point is missing; "
                    "reinstall the package (pip install -e '.[md]') so that its pyproject entry points are registered")


@pytest.fixture(scope="module")
def atat():
    d = np.load(ATAT)
    return d["z"], d["R"]


def _context(system, positions, integrator=None):
    integrator = integrator or openmm.VerletIntegrator(0.0005)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(positions)
    return ctx


def _energy_forces(ctx, groups=-1):
    st = ctx.getState(getEnergy=True, getForces=True, groups=groups)
    return st.getPotentialEnergy().value_in_unit(KJ), st.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer)


def test_entry_point_is_registered_and_import_openmmml_stays_light():
    code = ("import sys, openmmml; from openmmml.mlpotential import MLPotential as M; "
            "print('equiformer' in M._implFactories, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_openmm_forces_equal_the_calculator_and_the_potential(atat_checkpoint, atat):
    from ase import Atoms

    from scalable_equiformer.calculator import EquiformerCalculator

    z, R = atat
    # the unit factor from OpenMM's own units (e * N_A in kJ/mol), not from the module under test
    ev = (1 * unit.elementary_charge * unit.volt * unit.AVOGADRO_CONSTANT_NA).value_in_unit(KJ)
    assert ev == pytest.approx(EV_TO_KJ_PER_MOL, rel=1e-12)
    system = MLPotential("equiformer", checkpoint=str(atat_checkpoint)).createSystem(topology_from_numbers(z))
    assert system.getNumParticles() == len(z)
    calc = EquiformerCalculator(atat_checkpoint, device="cpu")
    pot = Potential.from_checkpoint(atat_checkpoint, device="cpu")
    pot.set_numbers(z)
    ctx = _context(system, R[0] * unit.angstrom)
    for frame in (0, 7, 19):
        ctx.setPositions(R[frame] * unit.angstrom)
        energy, forces = _energy_forces(ctx)
        atoms = Atoms(numbers=z, positions=R[frame])
        atoms.calc = calc
        e_ref, f_ref = atoms.get_potential_energy() * ev, atoms.get_forces() * ev * 10.0  # kJ/mol, kJ/mol/nm
        assert energy == pytest.approx(e_ref, rel=1e-9)
        np.testing.assert_allclose(forces, f_ref, rtol=0, atol=1e-9 * np.abs(f_ref).max())
        e_pot, f_pot = pot.compute(R[frame])
        assert energy == pytest.approx(e_pot * ev, rel=1e-9)
        np.testing.assert_allclose(forces, f_pot * ev * 10.0, rtol=0, atol=1e-9 * np.abs(f_ref).max())


def test_openmm_nve_conserves_total_energy(atat_checkpoint, atat):
    z, R = atat
    mlp = MLPotential("equiformer", checkpoint=str(atat_checkpoint))
    system = mlp.createSystem(topology_from_numbers(z))
    dt_fs = 0.5
    ctx = _context(system, R[0] * unit.angstrom, openmm.VerletIntegrator(dt_fs * unit.femtosecond))
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    integrator = ctx.getIntegrator()
    energies = []
    for _ in range(NVE_STEPS // 2 + 1):  # the total energy every 2 steps (each read is one more evaluation)
        st = ctx.getState(getEnergy=True)
        energies.append((st.getPotentialEnergy() + st.getKineticEnergy()).value_in_unit(KJ) / EV_TO_KJ_PER_MOL)
        integrator.step(2)
    e, n = np.array(energies), len(z)
    t = np.arange(len(e)) * 2 * dt_fs / 1000.0  # ps
    drift = abs(np.polyfit(t, e, 1)[0]) * 1000.0 / n  # meV / atom / ps
    excursion = np.abs(e - e[0]).max() * 1000.0 / n  # meV / atom
    force = mlp._impl.forces[-1]
    print(f"OpenMM NVE AT-AT 300 K, {dt_fs} fs x {NVE_STEPS}: drift {drift:.4f} meV/atom/ps, largest excursion "
          f"{excursion:.4f} meV/atom; {force.potential.searches} neighbour searches in {force.calls} evaluations")
    assert np.isfinite(e).all()
    assert drift < DRIFT_BOUND, f"energy drift {drift:.3f} meV/atom/ps > {DRIFT_BOUND}"
    assert excursion < FLUCTUATION_BOUND, f"energy excursion {excursion:.3f} meV/atom > {FLUCTUATION_BOUND}"
    assert 1 <= force.potential.searches < force.calls  # the Verlet list: not a search per step
    x = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(n, 1)]
    assert d.min() > 0.5 and d.max() < 20.0  # still a molecule (the 2-epoch model lets an H come within ~0.6 Å)


def _peptide_in_water(padding_nm=0.5):
    """The peptide in a TIP3P box (Modeller), its topology and positions, and the solute atom indices."""
    pdb = app.PDBFile(str(PEPTIDE))
    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addSolvent(ff, model="tip3p", padding=padding_nm * unit.nanometer)
    return ff, pdb, modeller, list(range(pdb.topology.getNumAtoms()))


def test_mlmm_energy_is_ml_solute_plus_mm_rest(atat_checkpoint):
    ff, pdb, modeller, solute = _peptide_in_water()
    top = modeller.topology
    top.setPeriodicBoxVectors(None)  # a water droplet: MM without cutoff is pairwise additive
    mm = ff.createSystem(top, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    mm_solute = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    mixed = MLPotential("equiformer", checkpoint=str(atat_checkpoint)).createMixedSystem(top, mm, solute, forceGroup=1)
    assert top.getNumAtoms() > 5 * len(solute)  # ~110 waters
    e_mix, f_mix = _energy_forces(_context(mixed, modeller.positions))
    e_mm, f_mm = _energy_forces(_context(mm, modeller.positions))
    pos = modeller.getPositions().value_in_unit(unit.nanometer)
    e_mm_solute, f_mm_solute = _energy_forces(_context(mm_solute, pos[:len(solute)] * unit.nanometer))
    pot = Potential.from_checkpoint(atat_checkpoint, device="cpu")
    pot.set_numbers([a.element.atomic_number for a in pdb.topology.atoms()])
    e_ml, f_ml = pot.compute(np.asarray(pos[:len(solute)]) * 10.0)
    e_ml, f_ml = e_ml * EV_TO_KJ_PER_MOL, f_ml * EV_TO_KJ_PER_MOL * 10.0
    expected = e_ml + e_mm - e_mm_solute
    assert e_mix == pytest.approx(expected, rel=1e-10, abs=1e-6)
    f_expected = f_mm.copy()
    f_expected[solute] += f_ml - f_mm_solute
    np.testing.assert_allclose(f_mix, f_expected, rtol=0, atol=1e-7 * np.abs(f_expected).max())
    # the model's force group holds exactly the model's energy
    assert _energy_forces(_context(mixed, modeller.positions), groups={1})[0] == pytest.approx(e_ml, rel=1e-10)


def test_mlmm_periodic_box_needs_mlLongRange_false(atat_checkpoint):
    ff, pdb, modeller, solute = _peptide_in_water()
    mm = ff.createSystem(modeller.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.8 * unit.nanometer,
                         constraints=app.HBonds)
    mlp = MLPotential("equiformer", checkpoint=str(atat_checkpoint))
    with pytest.raises(UserError, match=r"^\S*best.pt: the System is periodic, and this model is for isolated "
                                        r"molecules.*pass mlLongRange=False to createMixedSystem") as info:
        mlp.createMixedSystem(modeller.topology, mm, solute)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="no long-range terms"):
        mlp.createMixedSystem(modeller.topology, mm, solute, mlLongRange=True)
    mixed = mlp.createMixedSystem(modeller.topology, mm, solute, forceGroup=1, mlLongRange=False)
    assert sum(isinstance(f, openmm.PythonForce) for f in mixed.getForces()) == 1
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.001 * unit.picosecond)
    ctx = _context(mixed, modeller.positions, integrator)
    integrator.step(2)
    e_ml = _energy_forces(ctx, groups={1})[0]
    pos = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.angstrom)[solute]
    pot = Potential.from_checkpoint(atat_checkpoint, device="cpu")
    pot.set_numbers([a.element.atomic_number for a in pdb.topology.atoms()])
    assert e_ml == pytest.approx(pot.compute(pos)[0] * EV_TO_KJ_PER_MOL, rel=1e-10)


def test_system_survives_xml_serialisation(atat_checkpoint, atat):
    z, R = atat
    system = MLPotential("equiformer", checkpoint=str(atat_checkpoint)).createSystem(topology_from_numbers(z))
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))  # reloads the checkpoint
    e0, f0 = _energy_forces(_context(system, R[2] * unit.angstrom))
    e1, f1 = _energy_forces(_context(copy, R[2] * unit.angstrom))
    assert e1 == e0
    np.testing.assert_array_equal(f1, f0)


def test_bad_input_is_refused_in_one_line(atat_checkpoint, atat, tmp_path):
    z, _ = atat
    ck = str(atat_checkpoint)
    cases = []

    def refused(fn, pattern):
        with pytest.raises(UserError) as info:
            fn()
        msg = str(info.value)
        cases.append(msg)
        assert "\n" not in msg and __import__("re").search(pattern, msg), msg

    mlp = MLPotential("equiformer", checkpoint=ck)
    sulfur = topology_from_numbers([6, 1, 16, 8])
    refused(lambda: mlp.createSystem(sulfur),
            r"best.pt: element S \(Z=16\) never seen in training \(the model was trained on H, C, N, O\).*"
            r"first such atom: atom 2 \(S1 of MOL")
    refused(lambda: MLPotential("equiformer"), r"needs checkpoint=")
    refused(lambda: MLPotential("equiformer", checkpoint=str(tmp_path / "nope.pt")), r"nope.pt does not exist")
    refused(lambda: MLPotential("equiformer", checkpoint=ck, precison="double"), r"unknown option\(s\) precison")
    refused(lambda: mlp.createSystem(topology_from_numbers(z), device="cpu"), r"device belong\(s\) to MLPotential")
    # a topology that does not match the System, ML atoms that are not atoms of the topology
    top = topology_from_numbers(z)
    small = openmm.System()
    for _ in range(10):
        small.addParticle(12.0)
    refused(lambda: mlp.createMixedSystem(top, small, [0, 1]),
            r"the topology has 60 atoms but the System has 10 particles")
    system = openmm.System()
    for atom in top.atoms():
        system.addParticle(atom.element.mass)
    refused(lambda: mlp.createMixedSystem(top, system, [0, 60]), r"ML atom index 60 is not an atom of the topology")
    refused(lambda: mlp.createMixedSystem(top, system, [3, 3]), r"list atom 3 more than once")
    # an extra particle without element (a TIP4P-style virtual site)
    top_ep = topology_from_numbers([6, 1])
    top_ep.addAtom("EP", None, next(top_ep.residues()))
    refused(lambda: mlp.createSystem(top_ep), r"topology atom 2 \(EP of MOL 1\) has no element")
    # the model is not periodic: a box without mlLongRange=False
    boxed = topology_from_numbers(z)
    boxed.setPeriodicBoxVectors(np.eye(3) * 3.0 * unit.nanometer)
    refused(lambda: mlp.createSystem(boxed), r"the topology is periodic.*pass mlLongRange=False to createSystem")
    assert len(cases) == 10


def test_model_without_smooth_cutoff_warns_once(atat_checkpoint, atat, tmp_path):
    import torch

    from scalable_equiformer.training.checkpoint import save_checkpoint

    z, _ = atat
    payload = torch.load(atat_checkpoint, map_location="cpu", weights_only=False)
    payload["config"]["model"]["smooth_cutoff"] = False
    save_checkpoint(tmp_path / "rough.pt", payload)
    mlp = MLPotential("equiformer", checkpoint=str(tmp_path / "rough.pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlp.createSystem(topology_from_numbers(z))
        mlp.createSystem(topology_from_numbers(z))
    rough = [w for w in caught if "smooth_cutoff=false" in str(w.message)]
    assert len(rough) == 1 and "rough.pt" in str(rough[0].message)


def _dcd_frames(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(12)
    assert head[4:8] == b"CORD"
    return struct.unpack("<i", head[8:12])[0]


def _tool(*args, timeout=300):
    cmd = [sys.executable, str(ROOT / "tools" / "md_openmm.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_md_openmm_tool_runs_the_readme_commands(atat_checkpoint, tmp_path):
    vac, solv = tmp_path / "vacuum", tmp_path / "solvated"
    out = _tool("--checkpoint", atat_checkpoint, "--molecule", "atat", "--steps", 6, "--report-every", 2, "--out", vac)
    assert out.returncode == 0, out.stderr
    out = _tool("--checkpoint", atat_checkpoint, "--molecule", "peptide", "--solvate", "--padding", 0.5,
                "--minimise", 20, "--steps", 4, "--timestep", 1, "--report-every", 2, "--out", solv)
    assert out.returncode == 0, out.stderr
    assert "ML/MM" in out.stdout and "42 on the model" in out.stdout
    for folder, frames, atoms in ((vac, 3, 60), (solv, 2, None)):
        run = json.loads((folder / "run.json").read_text())
        assert _dcd_frames(folder / "trajectory.dcd") == frames
        lines = (folder / "energy.csv").read_text().splitlines()
        assert lines[0].startswith('#"Step"') and "Total Energy (kJ/mole)" in lines[0] and len(lines) == frames + 1
        assert np.isfinite([float(x) for x in lines[-1].split(",")[2:5]]).all()
        assert app.PDBFile(str(folder / "topology.pdb")).topology.getNumAtoms() == run["atoms"]
        assert run["ns_per_day"] > 0 and (atoms is None or run["atoms"] == atoms)
    assert json.loads((solv / "run.json").read_text())["waters"] > 50


def test_md_openmm_tool_errors_are_one_line(atat_checkpoint, tmp_path):
    out = _tool("--checkpoint", atat_checkpoint, "--molecule", "atat", "--solvate", "--steps", 2, "--out", tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith(
        "error: --solvate AT-AT_xtb_500K_20frames.npz: Amber14 cannot model this molecule"), out.stderr
    out = _tool("--checkpoint", atat_checkpoint, "--molecule", tmp_path / "none.pdb", "--out", tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == f"error: --molecule {tmp_path / 'none.pdb'}: no such file " \
                                                          "(give atat, peptide or a PDB file)"
    out = _tool("--checkpoint", atat_checkpoint, "--steps", 0)
    assert out.returncode == 2
    assert out.stderr.startswith("error: md_openmm.py: argument --steps: must be an integer >= 1")
