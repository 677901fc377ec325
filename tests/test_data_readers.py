"""Readers on the real shared files, unit conversion, the dataset API, and every bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch

from scalable_equiformer.data import (
    KCAL_PER_EV,
    MolecularDataset,
    dataset_md5,
    load_dataset,
)
from scalable_equiformer.data.sgdml import read_npz
from scalable_equiformer.errors import DataError, UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = SHARED / "real"
XTB = SHARED / "xtb"


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data file {path} not present (needs ../shared/data next to the repo)")
    return path


def test_kcal_per_ev_constant():
    assert KCAL_PER_EV == 23.060547830619026
    # CODATA: 1 eV = 96.485332 kJ/mol, 1 kcal = 4.184 kJ
    assert KCAL_PER_EV * 4.184 == pytest.approx(96.48533212, rel=1e-9)


# ---------------------------------------------------------------- real files, known values
def test_ethanol_ccsd_t_known_values():
    path = shared(REAL / "ethanol_ccsd_t-train.npz")
    ds = load_dataset(path)
    assert len(ds) == 1000 and ds.num_atoms == 9
    assert ds.z.tolist() == [6, 6, 8, 1, 1, 1, 1, 1, 1]
    assert ds.z.dtype == torch.long
    assert ds.theory == "Psi4: CCSD(T), cc-pVTZ"
    assert ds.name == "ethanol_ccsd"  # stored as bytes in the file
    # first frame: E = -97089.07088252231 kcal/mol, F[0,0] = [-10.20301055, 33.65634891, -1.91316347]
    assert ds.energies[0].item() == pytest.approx(-97089.07088252231 / 23.060547830619026, rel=1e-15)
    np.testing.assert_allclose(
        ds.forces[0, 0].numpy(), np.array([-10.20301055, 33.65634891, -1.91316347]) / KCAL_PER_EV, rtol=1e-8
    )
    np.testing.assert_allclose(ds.positions[0, 0].numpy(), [0.00552057, 0.59149006, -0.00081382], atol=1e-8)
    raw = np.load(path)
    np.testing.assert_array_equal(ds.energies.numpy(), raw["E"][:, 0] / KCAL_PER_EV)
    np.testing.assert_array_equal(ds.forces.numpy(), raw["F"] / KCAL_PER_EV)
    np.testing.assert_array_equal(ds.positions.numpy(), raw["R"])
    for t in (ds.positions, ds.energies, ds.forces):
        assert t.dtype == torch.float64
    assert ds.positions.shape == (1000, 9, 3) and ds.energies.shape == (1000,)


def test_sgdml_md5_matches_stored_fingerprint():
    path = shared(REAL / "ethanol_ccsd_t-train.npz")
    with np.load(path) as f:
        assert dataset_md5(f) == "cdad377f9048f070ba9071b647d19397" == f["md5"].item().decode()
    assert read_npz(path, verify_md5=True).md5 == "cdad377f9048f070ba9071b647d19397"
    for p in [XTB / "aspirin_xtb_500K.npz", XTB / "AT-AT_xtb_500K.npz", REAL / "rmd17_ethanol_100_metatrain.npz"]:
        if p.exists():
            read_npz(p, verify_md5=True)  # all shared files carry a matching md5


def test_rmd17_keys_equal_sgdml_keys():
    a = load_dataset(shared(REAL / "rmd17_ethanol_100_metatrain_rmd17keys.npz"))
    b = load_dataset(shared(REAL / "rmd17_ethanol_100_metatrain.npz"))
    assert len(a) == len(b) == 100
    assert torch.equal(a.z, b.z) and a.z.tolist() == [1] * 6 + [6, 6, 8]
    assert torch.equal(a.positions, b.positions)
    assert torch.equal(a.energies, b.energies)
    assert torch.equal(a.forces, b.forces)
    assert a.energies[0].item() == pytest.approx(-97079.92222178938 / KCAL_PER_EV, rel=1e-15)


def test_extxyz_through_ase_units():
    """NequIP's aspirin.xyz is in kcal/mol and Å (no unit field): read with energy_unit='kcal/mol' it
    equals its npz conversion; read with the ASE default (eV) the numbers are taken as they stand."""
    xyz = shared(REAL / "original" / "nequip_aspirin.xyz")
    npz = load_dataset(shared(REAL / "aspirin_ccsd_15_nequip.npz"))
    ds = load_dataset(xyz, energy_unit="kcal/mol")
    assert len(ds) == 15 and ds.num_atoms == 21
    assert torch.equal(ds.z, npz.z)
    torch.testing.assert_close(ds.positions, npz.positions, rtol=0, atol=1e-12)
    torch.testing.assert_close(ds.energies, npz.energies, rtol=1e-15, atol=0)
    torch.testing.assert_close(ds.forces, npz.forces, rtol=1e-14, atol=1e-14)
    assert ds.energies[0].item() == pytest.approx(-405681.6 / KCAL_PER_EV, rel=1e-15)
    as_ev = load_dataset(xyz)  # ASE convention: eV, no conversion
    assert as_ev.energies[0].item() == pytest.approx(-405681.6)


def test_extxyz_unit_key_in_comment_line(tmp_path):
    p = tmp_path / "two.extxyz"
    frame = ('2\nProperties=species:S:1:pos:R:3:forces:R:3 energy={e} energy_unit=kcal/mol pbc="F F F"\n'
             "H 0 0 0 1.0 0 0\nH 0.74 0 0 -1.0 0 0\n")
    p.write_text(frame.format(e=-23.060547830619026) + frame.format(e=0.0))
    ds = load_dataset(p)
    assert ds.energies.tolist() == pytest.approx([-1.0, 0.0])
    assert ds.forces[0, 0, 0].item() == pytest.approx(1.0 / KCAL_PER_EV)
    with pytest.raises(DataError, match="declares energy unit"):
        load_dataset(p, energy_unit="eV")


def test_xtb_files():
    asp = load_dataset(shared(XTB / "aspirin_xtb_500K.npz"))
    assert len(asp) == 1500 and asp.num_atoms == 21
    assert asp.energies[0].item() == pytest.approx(-24838.024735109364 / KCAL_PER_EV, rel=1e-15)
    atat = load_dataset(shared(XTB / "AT-AT_xtb_500K.npz"))
    assert len(atat) == 500 and atat.num_atoms == 60
    assert torch.bincount(atat.z).tolist() == [0, 22, 0, 0, 0, 0, 20, 14, 4]  # C20H22N14O4
    # forces are exact gradients: net force ~ 0 (< 1e-12 kcal/mol/Å per the README)
    assert atat.forces.sum(1).abs().max().item() < 1e-10


def test_unit_markers_converted(tmp_path):
    rng = np.random.default_rng(0)
    R = rng.normal(size=(3, 4, 3))
    E = rng.normal(size=(3, 1))
    F = rng.normal(size=(3, 4, 3))
    z = np.array([6, 1, 1, 8], np.uint8)
    base = read_npz(_write(tmp_path / "a.npz", R=R, E=E, F=F, z=z))  # no markers: kcal/mol, Å
    np.testing.assert_allclose(base.energies, E[:, 0] / KCAL_PER_EV)
    ev = read_npz(_write(tmp_path / "b.npz", R=R, E=E, F=F, z=z, e_unit="eV", r_unit="Ang"))
    np.testing.assert_array_equal(ev.energies, E[:, 0])
    np.testing.assert_array_equal(ev.forces, F)
    bohr = read_npz(_write(tmp_path / "c.npz", R=R, E=E, F=F, z=z, e_unit="Ha", r_unit="bohr"))
    np.testing.assert_allclose(bohr.positions, R * 0.529177210903)
    np.testing.assert_allclose(bohr.energies, E[:, 0] * 27.211386245988)
    np.testing.assert_allclose(bohr.forces, F * 27.211386245988 / 0.529177210903)
    kcal_bytes = read_npz(_write(tmp_path / "d.npz", R=R, E=E, F=F, z=z, e_unit=np.bytes_(b"kcal/mol")))
    np.testing.assert_array_equal(kcal_bytes.energies, base.energies)


# ---------------------------------------------------------------- dataset API
def test_items_subset_and_loader():
    ds = load_dataset(shared(REAL / "md17_ethanol_20_schnetpack_testdb.npz"))
    assert isinstance(ds, MolecularDataset)
    d = ds[3]
    assert d.pos.shape == (9, 3) and d.pos.dtype == torch.float64
    assert d.z.dtype == torch.long and d.energy.shape == (1,) and d.forces.shape == (9, 3)
    assert d.natoms.tolist() == [9]
    assert d.energy.item() == ds.energies[3].item()
    d.pos.requires_grad_(True)  # items are fresh tensors, not views of the bulk arrays
    sub = ds.subset([5, 2, 7])
    assert len(sub) == 3
    assert torch.equal(sub.energies, ds.energies[[5, 2, 7]])
    assert torch.equal(sub[1].pos, ds[2].pos)
    assert torch.equal(sub.subset([2]).positions, ds.positions[[7]])
    with pytest.raises(IndexError):
        ds[20]
    # the training's batching (a seeded epoch order, collated items)
    from scalable_equiformer.training.batches import BatchPlan, StepSampler, collate

    def epoch(seed):
        sampler = StepSampler(len(ds), BatchPlan(4, 4, 1, 1), seed, dp_rank=0)
        return [collate(ds, sampler.global_batch(0, s), "cpu") for s in range(sampler.steps_per_epoch)]

    batches = epoch(3)
    assert len(batches) == 5
    b = batches[0]
    assert b.num_graphs == 4 and b.energy.shape == (4,) and b.pos.shape == (36, 3)
    assert b.batch.shape == (36,) and b.ptr.tolist() == [0, 9, 18, 27, 36]
    assert b.natoms.tolist() == [9, 9, 9, 9]
    again = epoch(3)
    assert all(torch.equal(x.idx, y.idx) for x, y in zip(batches, again))  # seeded order
    assert sorted(torch.cat([x.idx for x in batches]).tolist()) == list(range(20))


def test_catalog_name_resolves_under_root(tmp_path):
    src = shared(XTB / "AT-AT_xtb_500K.npz")
    (tmp_path / "md22_AT-AT.npz").write_bytes(src.read_bytes())
    ds = load_dataset("md22_AT-AT", root=tmp_path)
    assert ds.name == "md22_AT-AT" and ds.path == tmp_path / "md22_AT-AT.npz" and ds.num_atoms == 60


def test_catalog_name_wrong_molecule(tmp_path):
    src = shared(XTB / "aspirin_xtb_500K.npz")
    (tmp_path / "md22_AT-AT.npz").write_bytes(src.read_bytes())
    with pytest.raises(DataError, match="has 21 atoms but md22_AT-AT has 60"):
        load_dataset("md22_AT-AT", root=tmp_path)


def test_missing_catalog_file_names_url_and_command(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("md22_AT-AT", root=tmp_path)
    msg = str(err.value)
    assert "http://www.quantum-machine.org/gdml/repo/datasets/md22_AT-AT.npz" in msg
    assert f"python tools/download.py md22_AT-AT --root {tmp_path}" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match="md17_aspirin"):
        load_dataset("md17_asprin", root=tmp_path)  # typo: close names listed
    with pytest.raises(DataError, match="file not found"):
        load_dataset(tmp_path / "nothere.npz")


# ---------------------------------------------------------------- bad input: one line, names the file
def _write(path: Path, **arrays) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def _good(n=4, N=3):
    rng = np.random.default_rng(1)
    return dict(R=rng.normal(size=(n, N, 3)), E=rng.normal(size=(n, 1)), F=rng.normal(size=(n, N, 3)),
                z=np.array([8, 1, 1][:N] + [6] * max(0, N - 3), np.uint8))


def _bad_cases(tmp: Path):
    g = _good()
    yield "missing_key", _write(tmp / "missing_key.npz", R=g["R"], E=g["E"], z=g["z"]), "missing key 'F'"
    yield "F_shape", _write(tmp / "F_shape.npz", **{**g, "F": g["F"][:, :2]}), "forces shape"
    yield "z_shape", _write(tmp / "z_shape.npz", **{**g, "z": g["z"][:2]}), "atomic numbers shape"
    yield "E_shape", _write(tmp / "E_shape.npz", **{**g, "E": g["E"][:3]}), "energies shape"
    yield ("R_shape", _write(tmp / "R_shape.npz", **{**g, "R": g["R"][..., :2], "F": g["F"][..., :2]}),
           "positions have shape")
    nan = g["F"].copy()
    nan[2, 1, 0] = np.nan
    yield "nan", _write(tmp / "nan.npz", **{**g, "F": nan}), "NaN or inf .* first at frame 2"
    inf = g["E"].copy()
    inf[1] = np.inf
    yield "inf", _write(tmp / "inf.npz", **{**g, "E": inf}), "energies contains NaN or inf"
    empty = tmp / "empty.npz"
    empty.write_bytes(b"")
    yield "empty", empty, "empty file"
    good = _write(tmp / "full.npz", **_good(n=50, N=3))
    trunc = tmp / "truncated.npz"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    yield "truncated", trunc, "truncated or corrupt"
    text = tmp / "text.npz"
    text.write_text("this is not a numpy file\n")
    yield "text", text, "not an npz file"
    yield "unit", _write(tmp / "unit.npz", **g, e_unit="kcal/furlong"), "unknown energy unit marker 'kcal/furlong'"
    yield "r_unit", _write(tmp / "r_unit.npz", **g, r_unit="parsec"), "unknown length unit marker"
    yield "z_range", _write(tmp / "z_range.npz", **{**g, "z": np.array([0, 1, 1])}), "atomic numbers outside"
    yield "pickled", _write(tmp / "pickled.npz", **{**g, "E": np.array([object()] * 4)}), "pickled"
    yield "rmd17_missing", _write(tmp / "rmd17_missing.npz", nuclear_charges=g["z"], coords=g["R"],
                                  energies=g["E"][:, 0]), "missing key 'forces'"
    npy = tmp / "single.npz"
    np.save(open(npy, "wb"), g["R"])
    yield "npy", npy, "single .npy array"


def test_every_bad_input_gives_one_line_naming_the_file(tmp_path):
    cases = list(_bad_cases(tmp_path))
    assert len(cases) >= 12
    for label, path, pattern in cases:
        with pytest.raises(DataError, match=pattern) as err:
            load_dataset(path)
        msg = str(err.value)
        assert isinstance(err.value, UserError), label
        assert str(path) in msg, (label, msg)
        assert "\n" not in msg, (label, msg)


def test_bad_extxyz(tmp_path):
    p = tmp_path / "noforces.xyz"
    p.write_text('2\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\nH 0.7 0 0\n')
    with pytest.raises(DataError, match="has no forces"):
        load_dataset(p)
    q = tmp_path / "garbage.xyz"
    q.write_text("not\nan xyz file at all\n")
    with pytest.raises(DataError, match=str(q)):
        load_dataset(q)
    u = tmp_path / "unknown.dat"
    u.write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_dataset(u)
