"""The batched engine (:class:`scalable_equiformer.md.torchsim.EquiformerModel`) in TorchSim itself:
one forward over several molecules gives each molecule's numbers alone, TorchSim's own
integrators (NVE, Langevin NVT) and FIRE run a batch of molecules, bad input is one line.

The model is the session's ``atat_checkpoint`` (tiny, fp64, smooth cutoff, trained on the shipped
AT-AT frames: H C N O), run on 2 AT-AT (60 atoms) and 2 aspirin (21 atoms, H C O) frames at once.

NVE bound (TorchSim velocity Verlet, 0.5 fs x 40 steps, momenta drawn at 300 K): for every system
the drift (slope of a least-squares line through its total energy) is below 1 meV/atom/ps and no
step strays more than 1 meV/atom from the start, the ASE calculator test's bounds. Measured: drift
0.008-0.02 meV/atom/ps, largest excursion 0.0002-0.0004 meV/atom.

Runtime on 2 shared CPU cores: ~20 s, plus the checkpoint fixture (~16 s, shared with the other
MD-engine tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ts = pytest.importorskip("torch_sim")
from ase import Atoms  # noqa: E402
from torch_sim.units import MetalUnits  # noqa: E402

from scalable_equiformer.errors import UserError  # noqa: E402
from scalable_equiformer.md import Potential  # noqa: E402
from scalable_equiformer.md.torchsim import EquiformerModel  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "scalable_equiformer" / "demo_data"
NVE_DRIFT_BOUND = 1.0  # meV / atom / ps
NVE_EXCURSION_BOUND = 1.0  # meV / atom


def _frames(name: str, idx) -> list[Atoms]:
    d = np.load(DEMO / name)
    return [Atoms(numbers=d["z"], positions=d["R"][i]) for i in idx]


@pytest.fixture(scope="module")
def molecules() -> list[Atoms]:
    """3 AT-AT frames (60 atoms) and 2 aspirin frames (21 atoms): 222 atoms, H C N O."""
    return _frames("AT-AT_xtb_500K_20frames.npz", (0, 7, 13)) + _frames("aspirin_xtb_500K.npz", (0, 500))


@pytest.fixture(scope="module")
def model(atat_checkpoint) -> EquiformerModel:
    return EquiformerModel(atat_checkpoint, device="cpu")


def _per_atom(state, values):
    return torch.zeros(state.n_systems, dtype=torch.float64).index_add_(0, state.system_idx, values)


def test_one_batched_forward_gives_each_molecule_alone(model, molecules, atat_checkpoint):
    state = ts.io.atoms_to_state(molecules, model.device, model.dtype)
    before = state.clone()
    out = model(state)
    assert out["energy"].shape == (5,) and out["forces"].shape == (222, 3)
    assert out["energy"].dtype == out["forces"].dtype == torch.float64
    for name in ("positions", "atomic_numbers", "system_idx", "cell"):  # the input is not modified
        assert torch.equal(getattr(state, name), getattr(before, name))
    pot = Potential.from_checkpoint(atat_checkpoint, device="cpu")
    start = 0
    for i, atoms in enumerate(molecules):
        pot.set_numbers(atoms.numbers)
        e, f = pot.compute(atoms.positions)
        n = len(atoms)
        assert float(out["energy"][i]) == pytest.approx(e, rel=1e-9)
        np.testing.assert_allclose(out["forces"][start:start + n].numpy(), f, rtol=0, atol=1e-9 * np.abs(f).max())
        start += n
    # another set of systems on the same model (TorchSim drops converged ones): checked and searched anew
    sub = model(state[[0, 4]])
    np.testing.assert_allclose(sub["energy"].numpy(), out["energy"][[0, 4]].numpy(), rtol=1e-9)
    np.testing.assert_allclose(sub["forces"].numpy(), torch.cat([out["forces"][:60], out["forces"][201:]]).numpy(),
                               rtol=0, atol=1e-9)
    # energies only, and a state passed as a dict
    light = EquiformerModel(model.potential, compute_forces=False)
    e_only = light({"positions": state.positions, "atomic_numbers": state.atomic_numbers,
                    "system_idx": state.system_idx})
    assert set(e_only) == {"energy"}
    np.testing.assert_allclose(e_only["energy"].numpy(), out["energy"].numpy(), rtol=1e-12)


def test_float32_model_matches_float64(model, molecules, atat_checkpoint):
    fp32 = EquiformerModel(atat_checkpoint, device="cpu", dtype="float32")
    assert fp32.dtype == torch.float32
    out32 = fp32(ts.io.atoms_to_state(molecules, fp32.device, fp32.dtype))
    out64 = model(ts.io.atoms_to_state(molecules, model.device, model.dtype))
    assert out32["forces"].dtype == torch.float32
    np.testing.assert_allclose(out32["energy"].double().numpy(), out64["energy"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(out32["forces"].double().numpy(), out64["forces"].numpy(), rtol=0, atol=1e-3)


def test_nve_of_a_batch_conserves_each_systems_energy(model, molecules):
    mols = [molecules[0], molecules[1], molecules[3], molecules[4]]
    n_atoms = np.array([len(a) for a in mols])
    state = ts.io.atoms_to_state(mols, model.device, model.dtype)
    dt_fs, steps = 0.5, 40
    init, update = ts.nve(model=model, dt=torch.tensor(dt_fs * 1e-3 * MetalUnits.time, dtype=torch.float64),
                          kT=torch.tensor(300.0 * MetalUnits.temperature, dtype=torch.float64), seed=0)
    s = init(state)
    searches = model.potential.searches
    potential, total = [], []
    for _ in range(steps):
        s = update(s)
        kinetic = _per_atom(s, (s.momenta ** 2).sum(-1) / (2 * s.masses))
        potential.append(s.energy.numpy().copy())
        total.append((s.energy + kinetic).numpy())
    potential, total = np.array(potential), np.array(total)
    t_ps = np.arange(steps) * dt_fs * 1e-3
    drift = np.abs(np.polyfit(t_ps, total, 1)[0]) * 1000.0 / n_atoms  # meV / atom / ps, per system
    excursion = np.abs(total - total[0]).max(0) * 1000.0 / n_atoms  # meV / atom, per system
    print(f"TorchSim NVE, 4 systems, 0.5 fs x {steps}: drift {np.round(drift, 4)} meV/atom/ps, "
          f"largest excursion {np.round(excursion, 4)} meV/atom")
    assert np.isfinite(total).all() and np.isfinite(s.positions.numpy()).all()
    assert (drift < NVE_DRIFT_BOUND).all(), drift
    assert (excursion < NVE_EXCURSION_BOUND).all(), excursion
    # the test has teeth: the potential energy of each system moves far more than the total does
    assert (np.ptp(potential, 0) * 1000.0 / n_atoms > 20 * excursion).all()
    # one Verlet list over the batch: searched again now and then, not at every step
    assert 1 <= model.potential.searches - searches < steps


def test_langevin_nvt_and_fire_relaxation_of_a_batch_through_torchsim_runners(model, molecules):
    mols = [molecules[0], molecules[3]]
    final = ts.integrate(system=mols, model=model, integrator=ts.nvt_langevin, n_steps=20, temperature=300.0,
                         timestep=0.0005, seed=0)
    assert final.n_systems == 2 and final.positions.shape == (81, 3)
    assert torch.isfinite(final.positions).all() and torch.isfinite(final.energy).all()

    start = model(ts.io.atoms_to_state(mols, model.device, model.dtype))["energy"]
    with pytest.warns(UserWarning, match="max steps"):  # the 2-epoch model's surface is soft: 40 steps do not converge
        converged = ts.generate_force_convergence_fn(force_tol=0.01, include_cell_forces=False)
        relaxed = ts.optimize(system=mols, model=model, optimizer=ts.optimizers.fire, max_steps=40,
                              convergence_fn=converged)
    assert relaxed.n_systems == 2 and torch.isfinite(relaxed.positions).all()
    end = model(relaxed)["energy"]
    assert torch.equal(end, relaxed.energy)  # the state's energy is the model's at the relaxed geometry
    assert (end < start - 0.1).all(), (start, end)  # each molecule went downhill (measured: 0.5-0.8 eV)


def test_bad_input_is_refused_in_one_line(model, atat_checkpoint):
    from torch_sim.models.interface import validate_model_outputs

    def one_line(exc_info):
        assert "\n" not in str(exc_info.value)
        return str(exc_info.value)

    # TorchSim's own interface check builds periodic Si and Fe crystals: a molecular model refuses them
    with pytest.raises(UserError, match="periodic") as err:
        validate_model_outputs(model, torch.device("cpu"), torch.float64)
    assert str(atat_checkpoint) in one_line(err)
    thiophene = Atoms("SC4H4", positions=np.random.default_rng(0).normal(scale=1.5, size=(9, 3)))
    with pytest.raises(UserError, match=r"element S \(Z=16\) never seen") as err:
        model(ts.io.atoms_to_state([_frames("aspirin_xtb_500K.npz", [0])[0], thiophene], model.device, model.dtype))
    assert str(atat_checkpoint) in one_line(err)
    with pytest.raises(UserError, match="compute_stress=True is not supported") as err:
        EquiformerModel(atat_checkpoint, device="cpu", compute_stress=True)
    one_line(err)
    with pytest.raises(NotImplementedError):  # TorchSim's interface: no switching stress on later
        model.compute_stress = True
    with pytest.raises(UserError, match="model must be a checkpoint path") as err:
        EquiformerModel(42)
    one_line(err)


def test_a_model_without_the_smooth_cutoff_warns_once(atat_checkpoint):
    import warnings

    from scalable_equiformer.inference import load_model

    net, _, _ = load_model(atat_checkpoint, device="cpu")
    net.smooth_cutoff = False  # what a model of the md17_* configs (the original's cutoff) carries
    with pytest.warns(UserWarning, match="smooth_cutoff=false"):
        EquiformerModel(net, label="md17.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EquiformerModel(net)  # the same model again: no second warning


def test_the_benchmark_function_reports_a_batch(atat_checkpoint, molecules):
    """tools/bench_md_torchsim.py's bench_torchsim: the counts and the derived figures (no timing asserted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_md_torchsim",
                                                  DEMO.parents[1] / "tools" / "bench_md_torchsim.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tool.bench_torchsim(atat_checkpoint, [molecules[0]] * 3, steps=2, timestep_fs=0.5, warmup=1, device="cpu")
    assert (out["n_systems"], out["atoms"], out["steps"], out["evaluations"]) == (3, 180, 2, 2)
    assert out["ns_per_day_aggregate"] == pytest.approx(3 * out["ns_per_day"])
    assert out["ns_per_day"] == pytest.approx(2 * 0.5e-6 / out["seconds"] * 86400.0)
    assert out["ms_per_step"] == pytest.approx(500.0 * out["seconds"])
    assert 0 < out["neighbour_seconds"] <= out["model_seconds"] <= out["seconds"]
