"""Geometry is what the model says it is (issue 24, item 3): periodic frames, far-away molecules,
coincident atoms, graphs without edges, one-atom molecules, all-zero forces and unmarked energy
units are refused in one line or give the same numbers, before a run folder is written."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from torch_geometric.data import Batch

from helpers import tiny_sets
from helpers.equivariance import single_thread  # noqa: F401 (fixture)
from scalable_equiformer import build_model, load_config
from scalable_equiformer.calculator import EquiformerCalculator
from scalable_equiformer.data import load_dataset
from scalable_equiformer.data.statistics import compute_statistics
from scalable_equiformer.errors import DataError, UserError
from test_train_common import (
    DEMO_DATA, empty_config, launch, sets, tiny_config, tiny_overrides, train_cmd, train_in_process,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")
OFFSET = 1.0e6  # Å
ETHANOL = REPO.parent / "shared" / "data" / "real" / "md17_ethanol_20_schnetpack_testdb.npz"


@pytest.fixture(scope="module")
def aspirin():
    return load_dataset(DEMO_DATA)


def _model(aspirin, dtype: str):
    torch.manual_seed(0)
    cfg = load_config(None, tiny_sets() + [f"model.dtype={dtype}", f"data.path={DEMO_DATA}"])
    return build_model(cfg, compute_statistics(aspirin.subset(range(20)), cfg.model.cutoff))


def _batch(aspirin, shift: float) -> Batch:
    items = [aspirin[i] for i in (0, 7)]
    for k, it in enumerate(items):  # two molecules, each somewhere else, both far away
        it.pos = it.pos + torch.tensor([shift, -shift * (k + 1), 0.5 * shift], dtype=torch.float64)
    return Batch.from_data_list(items)


# ---------------------------------------------------------------- far from the origin
@pytest.mark.parametrize("training", [False, True])
def test_fp32_model_gives_the_same_numbers_far_from_the_origin(aspirin, training):
    """Before the fix, positions became float32 (0.06 Å resolution at 10^6 Å) before edge vectors
    were formed: forces off by ~1 eV/Å. Centred in float64 first: equal to fp32 round-off."""
    model = _model(aspirin, "float32").train(training)
    ref = model(_batch(aspirin, 0.0))
    far = model(_batch(aspirin, OFFSET))
    assert far["forces"].dtype == torch.float32
    torch.testing.assert_close(far["energy"], ref["energy"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(far["forces"], ref["forces"], rtol=1e-5, atol=1e-5)
    if training:  # the force-loss graph is kept
        assert far["forces"].requires_grad


def test_fp64_forces_stay_minus_dE_dpos(aspirin):
    """Centring is a constant shift: forces are -dE/dpos of the positions given, also when the
    caller differentiates through ``batch.pos``; translation changes nothing (fp64 1e-10)."""
    model = _model(aspirin, "float64").train()  # training: energy and forces keep their graph
    b = _batch(aspirin, 0.0)
    b.pos.requires_grad_(True)
    out = model(b)
    (g,) = torch.autograd.grad(out["energy"].sum(), b.pos)
    torch.testing.assert_close(out["forces"].detach(), -g, rtol=0, atol=1e-12)
    far = model(_batch(aspirin, OFFSET))
    torch.testing.assert_close(far["energy"].detach(), out["energy"].detach(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(far["forces"].detach(), out["forces"].detach(), rtol=1e-8, atol=1e-8)


def test_calculator_far_from_the_origin(aspirin):
    model = _model(aspirin, "float32").eval()
    calc = EquiformerCalculator(model, device="cpu")
    item = aspirin[3]
    near = Atoms(numbers=item.z.numpy(), positions=item.pos.numpy())
    far = Atoms(numbers=item.z.numpy(), positions=item.pos.numpy() + np.array([OFFSET, OFFSET, -OFFSET]))
    near.calc = calc
    e0, f0 = near.get_potential_energy(), near.get_forces()
    far.calc = calc
    e1, f1 = far.get_potential_energy(), far.get_forces()
    assert e1 == pytest.approx(e0, rel=1e-6, abs=1e-5)
    np.testing.assert_allclose(f1, f0, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- files the model cannot learn from
def _demo_arrays(n=40):
    with np.load(DEMO_DATA) as f:
        return {"R": f["R"][:n].copy(), "E": f["E"][:n].copy(), "F": f["F"][:n].copy(), "z": f["z"].copy(),
                "e_unit": f["e_unit"], "r_unit": f["r_unit"]}


def _write_npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def _write_extxyz(path: Path, arrays, header: str) -> Path:
    from ase.data import chemical_symbols

    lines = []
    for R, E, F in zip(arrays["R"], arrays["E"].reshape(-1), arrays["F"]):
        lines.append(f"{len(arrays['z'])}")
        lines.append(f'Properties=species:S:1:pos:R:3:forces:R:3 energy={float(E)!r} energy_unit=kcal/mol {header}')
        for zi, r, f in zip(arrays["z"], R.tolist(), F.tolist()):
            lines.append(" ".join([chemical_symbols[int(zi)]] + [repr(v) for v in r + f]))
    path.write_text("\n".join(lines) + "\n")
    return path


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, UserError)
    return msg


def test_readers_refuse_periodic_frames(tmp_path):
    a = _demo_arrays(4)
    boxed = _write_extxyz(tmp_path / "box.extxyz", a, 'Lattice="3 0 0 0 3 0 0 0 3" pbc="F F F"')
    assert len(load_dataset(boxed)) == 4  # a cell without periodicity is only a box: read
    periodic = _write_extxyz(tmp_path / "periodic.extxyz", a, 'Lattice="6 0 0 0 6 0 0 0 6" pbc="T T T"')
    with pytest.raises(DataError) as err:
        load_dataset(periodic)
    msg = _one_line(err)
    assert msg.startswith(f"{periodic}: frame 0 is periodic (pbc=TTT, cell 6 x 6 x 6 Å)")
    assert "isolated molecules" in msg
    lattice = _write_npz(tmp_path / "lattice.npz", **a, lattice=np.eye(3) * 6.0)  # sGDML's periodic sets
    with pytest.raises(DataError) as err:
        load_dataset(lattice)
    assert _one_line(err).startswith(f"{lattice}: has a 'lattice' (a periodic cell)")


def test_readers_and_calculator_refuse_coincident_atoms(tmp_path, aspirin):
    a = _demo_arrays(10)
    a["R"][6, 7] = a["R"][6, 2]
    p = _write_npz(tmp_path / "same.npz", **a)
    with pytest.raises(DataError) as err:
        load_dataset(p)
    assert _one_line(err) == (f"{p}: frame 6: atoms 2 and 7 are at the same position (distance 0); "
                              "a molecule needs distinct atom positions")
    rmd17 = _write_npz(tmp_path / "same_rmd17.npz", nuclear_charges=a["z"], coords=a["R"], energies=a["E"][:, 0],
                       forces=a["F"])
    with pytest.raises(DataError, match=r"frame 6: atoms 2 and 7 are at the same position"):
        load_dataset(rmd17)
    xyz = _write_extxyz(tmp_path / "same.extxyz", a, 'pbc="F F F"')
    with pytest.raises(DataError, match=r"same.extxyz: frame 6: atoms 2 and 7 are at the same position"):
        load_dataset(xyz)
    calc = EquiformerCalculator(_model(aspirin, "float64").eval(), device="cpu")
    atoms = Atoms(numbers=a["z"], positions=a["R"][6])
    atoms.calc = calc
    with pytest.raises(UserError, match=r"EquiformerCalculator\(Equiformer\): atoms 2 and 7 are at the same position"):
        atoms.get_potential_energy()


def _train_refuses(tmp_path, data, *extra) -> str:
    """The one-line DataError a tiny in-process run stops with; no run folder is left."""
    cfg = tiny_config(tmp_path / "runs", f"data.path={data}", *extra)
    with pytest.raises(DataError) as err:
        train_in_process(cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    return _one_line(err)


def test_training_refuses_a_graph_without_edges_before_the_run_folder(tmp_path):
    msg = _train_refuses(tmp_path, DEMO_DATA, "model.cutoff=0.5")
    assert msg.startswith(f"{DEMO_DATA}: no two atoms are closer than model.cutoff = 0.5 Å in the 16 training "
                          "frames read (shortest distance ")
    assert "the radius graph has no edges; raise model.cutoff" in msg


def test_training_refuses_one_atom_molecules_and_zero_forces(tmp_path):
    a = _demo_arrays(40)
    one = _write_npz(tmp_path / "one.npz", R=a["R"][:, :1], E=a["E"], F=a["F"][:, :1], z=a["z"][:1], e_unit=a["e_unit"])
    msg = _train_refuses(tmp_path / "a", one)
    assert msg == (f"{one}: a molecule of the training split has 1 atom(s); the model learns from atom pairs "
                   "and needs molecules of at least 2 atoms")
    zero = _write_npz(tmp_path / "zero.npz", **{**a, "F": np.zeros_like(a["F"])})
    msg = _train_refuses(tmp_path / "b", zero)
    assert msg.startswith(f"{zero}: every force of the 16 training frames read is zero")


def test_cli_refuses_a_periodic_extxyz_in_one_line_before_the_run_folder(tmp_path):
    data = _write_extxyz(tmp_path / "periodic.extxyz", _demo_arrays(40), 'Lattice="8 0 0 0 8 0 0 0 8" pbc="T T T"')
    out = tmp_path / "runs"
    proc = launch(train_cmd("--config", empty_config(tmp_path), *sets(tiny_overrides(out, f"data.path={data}"))),
                  cwd=tmp_path, timeout=240)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {data}: frame 0 is periodic (pbc=TTT")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_cli_names_the_assumed_unit_and_refuses_zero_forces(tmp_path):
    a = _demo_arrays(40)
    data = _write_npz(tmp_path / "nounit.npz", R=a["R"], E=a["E"], F=np.zeros_like(a["F"]), z=a["z"])
    out = tmp_path / "runs"
    proc = launch(train_cmd("--config", empty_config(tmp_path), *sets(tiny_overrides(out, f"data.path={data}"))),
                  cwd=tmp_path, timeout=240)
    assert f"{data}: no energy unit marker in the file; energies and forces read as kcal/mol" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {data}: every force of the 16 training frames read is zero")
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- energy units
@pytest.fixture
def data_log():
    """Records of the readers' logger (whatever an earlier run's logging set-up left)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("scalable_equiformer.data.sgdml")
    h, level = Keep(level=logging.INFO), logger.level
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(h)
    logger.setLevel(level)


def test_assumed_unit_is_logged_and_implausible_energies_warned(tmp_path, data_log):
    load_dataset(DEMO_DATA)  # the demo file says kcal/mol: nothing assumed, nothing to warn about
    assert data_log == []
    with np.load(ETHANOL) as f:  # all-electron MD17 ethanol, kcal/mol
        a = {k: f[k].copy() for k in ("R", "E", "F", "z")}
    plain = _write_npz(tmp_path / "plain.npz", **a)
    load_dataset(plain)
    assert [(r.levelno, r.getMessage()) for r in data_log] == [
        (logging.INFO, f"{plain}: no energy unit marker in the file; energies and forces read as kcal/mol "
                       "(the sGDML and rMD17 convention)")]
    data_log.clear()
    # the same energies in meV, written without a marker: read as kcal/mol, 20 keV per atom
    mev = _write_npz(tmp_path / "mev.npz", **{**a, "E": a["E"] / 23.060547830619026 * 1e3})
    load_dataset(mev)
    warn = [r.getMessage() for r in data_log if r.levelno == logging.WARNING]
    assert len(warn) == 1 and warn[0].startswith(f"{mev}: energies average 2.0")
    assert "eV per atom when read as kcal/mol (assumed: the file has no unit marker)" in warn[0]
    assert "probably in another unit" in warn[0]
    data_log.clear()
    # an extxyz in kcal/mol read with the ASE default (eV): 23 times too large
    xyz = tmp_path / "kcal_as_ev.extxyz"
    text = _write_extxyz(tmp_path / "tmp.extxyz", a, 'pbc="F F F"').read_text()
    xyz.write_text(text.replace(" energy_unit=kcal/mol", ""))
    load_dataset(xyz)
    msgs = [(r.levelno, r.getMessage()) for r in data_log]
    assert (logging.INFO, f"{xyz}: no energy unit marker in the file; energies and forces read as eV "
                          "(the ASE convention)") in msgs
    assert any(lv == logging.WARNING and "when read as eV (assumed" in m for lv, m in msgs)
    data_log.clear()
    load_dataset(xyz, energy_unit="kcal/mol")  # the right unit given: no line at all
    assert data_log == []
