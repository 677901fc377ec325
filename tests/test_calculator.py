"""ASE calculator: same numbers as ``model(batch)``, built from a real training checkpoint, and NVE
molecular dynamics that conserves the total energy.

Energy-conservation bound (VelocityVerlet, 0.5 fs, 400 steps = 0.2 ps, ethanol at 300 K, fp64
model trained briefly in this test): the drift, i.e. the slope of a least-squares line through the
total energy, is below ``DRIFT_BOUND`` = 1 meV/atom/ps, and no step strays more than
``FLUCTUATION_BOUND`` = 1 meV/atom from the start. Measured on this machine: slope 0.08-0.22
meV/atom/ps, largest excursion 0.3-0.4 meV/atom (the O(dt^2) Verlet oscillation of the hydrogen
stretches), for models trained 3 and 10 epochs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet
from torch_geometric.data import Batch

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mb

    def thermalize_momenta(atoms, temperature_K, rng=None):
        _mb(atoms, temperature_K=temperature_K, rng=rng)

from helpers import tiny_sets
from scalable_equiformer import build_model, load_config
from scalable_equiformer.calculator import EquiformerCalculator
from scalable_equiformer.data import load_dataset
from scalable_equiformer.data.statistics import compute_statistics
from scalable_equiformer.errors import CheckpointError, UserError

ROOT = Path(__file__).resolve().parent.parent
ETHANOL = ROOT.parent / "shared" / "data" / "real" / "md17_ethanol_2000_schnetpack.npz"
DRIFT_BOUND = 1.0  # meV / atom / ps
FLUCTUATION_BOUND = 1.0  # meV / atom

TINY = tiny_sets(width=2)


def _tiny_model(ethanol, dtype: str):
    """The tiny model (seed 0) in ``dtype``, normalised on 50 ethanol frames, in eval mode."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY + [f"model.dtype={dtype}", f"data.path={ETHANOL}"])
    return build_model(cfg, compute_statistics(ethanol.subset(range(50)), 5.0)).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two shared cores: one intra-op thread is several times faster than oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ethanol():
    if not ETHANOL.is_file():
        pytest.fail(f"{ETHANOL} missing: the tests read the real MD17 ethanol frames in ../shared/data/real")
    return load_dataset(ETHANOL)


def atoms_of(item) -> Atoms:
    return Atoms(numbers=item.z.numpy(), positions=item.pos.numpy())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_calculator_equals_model_on_the_same_geometry(ethanol, dtype):
    torch.manual_seed(0)
    cfg = load_config(None, TINY + [f"model.dtype={dtype}", f"data.path={ETHANOL}"])
    model = build_model(cfg, compute_statistics(ethanol.subset(range(100)), cfg.model.cutoff)).eval()
    frames = [ethanol[i] for i in (0, 7, 500)]
    ref = model(Batch.from_data_list(frames), compute_forces=True)  # 3 molecules in one batch
    calc = EquiformerCalculator(model, device="cpu")
    assert calc.dtype == getattr(torch, dtype)
    offset = 0
    for k, item in enumerate(frames):
        atoms = atoms_of(item)
        atoms.calc = calc
        n = len(atoms)
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        tol = 1e-10 if dtype == "float64" else 1e-4
        assert e == pytest.approx(float(ref["energy"][k]), rel=1e-12 if dtype == "float64" else 1e-6)
        np.testing.assert_allclose(f, ref["forces"][offset:offset + n].double().numpy(), atol=tol, rtol=0)
        assert calc.results["free_energy"] == e
        offset += n
    # the calculator recomputes when the positions change, and not otherwise
    atoms.positions[0, 0] += 0.05
    assert atoms.get_potential_energy() != e


def test_calculator_casts_to_the_asked_precision(ethanol):
    model = _tiny_model(ethanol, "float32")
    atoms = atoms_of(ethanol[1])
    atoms.calc = EquiformerCalculator(model, device="cpu")
    e32, f32 = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = EquiformerCalculator(model, device="cpu", dtype="float64")
    assert atoms.calc.dtype == torch.float64
    assert atoms.get_potential_energy() == pytest.approx(e32, abs=1e-3)
    np.testing.assert_allclose(atoms.get_forces(), f32, atol=1e-4)


def test_calculator_refuses_what_the_model_cannot_do(ethanol):
    cfg = load_config(None, TINY + ["model.dtype=float64", "model.max_atomic_number=10", f"data.path={ETHANOL}"])
    calc = EquiformerCalculator(build_model(cfg, compute_statistics(ethanol.subset(range(20)), 5.0)), device="cpu")
    periodic = atoms_of(ethanol[0])
    periodic.set_cell([10, 10, 10])
    periodic.pbc = True
    periodic.calc = calc
    with pytest.raises(UserError, match="periodic"):
        periodic.get_potential_energy()
    sulfur = Atoms("SH2", positions=[[0, 0, 0], [1.3, 0, 0], [0, 1.3, 0]])
    sulfur.calc = calc
    with pytest.raises(UserError, match="max_atomic_number"):
        sulfur.get_potential_energy()
    with pytest.raises(UserError, match="partitions=2: .*process group"):  # no group initialised here
        EquiformerCalculator(calc.model, partitions=2).get_potential_energy(atoms_of(ethanol[0]))
    with pytest.raises(CheckpointError):
        EquiformerCalculator(ROOT / "no_such_run" / "best.pt", device="cpu")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny fp64 model trained for a few epochs on real MD17 ethanol through train.py."""
    out = tmp_path_factory.mktemp("calc_run")
    sets = TINY + [
        "model.dtype=float64", f"data.path={ETHANOL}", "data.train_size=100", "data.val_size=10",
        "data.test_size=20", "train.max_epochs=3", "train.batch_size=8", "train.eval_batch_size=10",
        "optim.lr=2e-3", "optim.warmup_epochs=0", f"train.out_dir={out}", "train.run_name=ethanol",
        "train.progress=false", "logging.tensorboard=false", "logging.plot=false",
    ]
    base = out / "defaults.yaml"
    base.write_text("# dataclass defaults; everything else comes from --set\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(base)] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "ethanol"


@pytest.mark.slow
def test_checkpoint_calculator_reproduces_the_run_test_metrics(trained_run, ethanol):
    """The calculator built from best.pt gives the same test MAE as training reported."""
    results = json.loads((trained_run / "results.json").read_text())
    test_idx = np.load(trained_run / "splits.npz")["test"]
    calc = EquiformerCalculator(trained_run / "best.pt", device="cpu")
    assert calc.dtype == torch.float64 and calc.config.model.irreps_node == "16x0e+8x1e+4x2e"
    e_err, f_err = [], []
    for i in test_idx:
        item = ethanol[int(i)]
        atoms = atoms_of(item)
        atoms.calc = calc
        e_err.append(abs(atoms.get_potential_energy() - float(item.energy)))
        f_err.append(np.abs(atoms.get_forces() - item.forces.numpy()).ravel())
    assert len(e_err) == results["n_test_frames"]
    assert 1000 * np.mean(e_err) == pytest.approx(results["test_energy_mae_meV"], rel=1e-6)
    assert 1000 * np.mean(np.concatenate(f_err)) == pytest.approx(results["test_force_mae_meV_per_A"], rel=1e-6)


def run_nve(calc, item, steps: int = 400, dt_fs: float = 0.5, temperature_K: float = 300.0):
    """Total energy (eV) after each step of VelocityVerlet from ``item``; returns (times ps, energies)."""
    atoms = atoms_of(item)
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    energies = [atoms.get_total_energy()]
    for _ in range(steps):
        dyn.run(1)
        energies.append(atoms.get_total_energy())
    return np.arange(steps + 1) * dt_fs / 1000.0, np.array(energies), atoms


@pytest.mark.slow
def test_nve_md_conserves_total_energy(trained_run, ethanol):
    calc = EquiformerCalculator(trained_run / "best.pt", device="cpu")
    t, e, atoms = run_nve(calc, ethanol[0])
    n = len(atoms)
    drift = abs(np.polyfit(t, e, 1)[0]) * 1000.0 / n  # meV / atom / ps
    excursion = np.abs(e - e[0]).max() * 1000.0 / n  # meV / atom
    print(f"NVE ethanol 300 K, 0.5 fs x {len(t) - 1}: drift {drift:.4f} meV/atom/ps, "
          f"largest excursion {excursion:.4f} meV/atom")
    assert np.isfinite(e).all()
    assert drift < DRIFT_BOUND, f"energy drift {drift:.3f} meV/atom/ps > {DRIFT_BOUND}"
    assert excursion < FLUCTUATION_BOUND, f"energy excursion {excursion:.3f} meV/atom > {FLUCTUATION_BOUND}"
    # the molecule stays a molecule (a bad force field would blow it apart in 0.2 ps at 300 K)
    d = atoms.get_all_distances()
    assert d[np.triu_indices(n, 1)].min() > 0.7 and d.max() < 6.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_calculator_on_gpu_equals_cpu(ethanol):
    model = _tiny_model(ethanol, "float64")
    atoms = atoms_of(ethanol[3])
    atoms.calc = EquiformerCalculator(model, device="cpu")
    e_cpu, f_cpu = atoms.get_potential_energy(), atoms.get_forces()
    gpu = EquiformerCalculator(model, device="cuda")
    assert gpu.device.type == "cuda"
    atoms.calc = gpu
    assert atoms.get_potential_energy() == pytest.approx(e_cpu, rel=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), f_cpu, atol=1e-8)


# --- graph partitions: the calculator as one rank of a process group -----------------------------


def _tiny_checkpoint(ethanol, path):
    """A fp64 checkpoint in the trainer's format (config, statistics, weights), untrained."""
    from scalable_equiformer.training.checkpoint import save_checkpoint

    torch.manual_seed(3)
    cfg = load_config(None, TINY + ["model.dtype=float64", f"data.path={ETHANOL}"])
    stats = compute_statistics(ethanol.subset(range(50)), cfg.model.cutoff)
    model = build_model(cfg, stats)
    save_checkpoint(path, {"config": cfg.to_dict(), "stats": stats.to_dict(), "model": model.state_dict(), "epoch": 0})
    return path


def _single_points_and_md(calc, frames, md_steps=5):
    """Energy and forces of each frame, then positions/energy after a few VelocityVerlet steps."""
    out = []
    for numbers, positions in frames:
        atoms = Atoms(numbers=numbers, positions=positions)
        atoms.calc = calc
        out.append((atoms.get_potential_energy(), atoms.get_forces().copy()))
    atoms = Atoms(numbers=frames[0][0], positions=frames[0][1])
    atoms.calc = calc
    atoms.set_momenta(np.random.default_rng(0).normal(0, 0.05, (len(atoms), 3)) * atoms.get_masses()[:, None] ** 0.5)
    VelocityVerlet(atoms, timestep=0.5 * units.fs).run(md_steps)
    return {"points": out, "md_positions": atoms.positions.copy(), "md_energy": atoms.get_total_energy()}


def _partitioned_calc_worker(rank, world, checkpoint, frames, out_dir):
    """One rank (gloo group initialised by spawn_local): the same ASE script on every rank."""
    calc = EquiformerCalculator(checkpoint, device="cpu", partitions=world)
    res = _single_points_and_md(calc, frames)
    res["edges_here"] = int(calc.partitioned.last_partition.local(rank).edge_ids.numel())
    try:
        EquiformerCalculator(checkpoint, device="cpu", partitions=world + 1)
    except UserError as exc:
        res["wrong_size_error"] = str(exc)
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("P", [2])
def test_partitioned_calculator_equals_one_process(ethanol, tmp_path, P):
    """partitions=2 in 2 gloo processes (every rank runs the same script): energies, forces and a
    few MD steps equal the one-process calculator (fp64, 1e-10)."""
    from scalable_equiformer.parallel.launch import spawn_local

    ckpt = _tiny_checkpoint(ethanol, tmp_path / "best.pt")
    frames = [(ethanol[i].z.numpy(), ethanol[i].pos.numpy()) for i in (0, 11)]
    ref = _single_points_and_md(EquiformerCalculator(ckpt, device="cpu"), frames)
    spawn_local(_partitioned_calc_worker, P, args=(str(ckpt), frames, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(P)]
    assert all(r["edges_here"] > 0 for r in ranks)  # both ranks did part of the work
    for r in ranks:
        for (e, f), (e0, f0) in zip(r["points"], ref["points"]):
            assert e == pytest.approx(e0, rel=1e-10)
            np.testing.assert_allclose(f, f0, atol=1e-10 * np.abs(f0).max(), rtol=0)
        np.testing.assert_allclose(r["md_positions"], ref["md_positions"], atol=1e-9, rtol=0)
        assert r["md_energy"] == pytest.approx(ref["md_energy"], rel=1e-10)
        assert f"partitions={P + 1}, but the process group has {P} ranks" in r["wrong_size_error"]
