"""The dataset catalog and the seeded, saved splits (incl. rMD17 published index splits)."""

from pathlib import Path

import numpy as np
import pytest

from scalable_equiformer.data import (
    CATALOG,
    get_info,
    load_index_split,
    load_splits,
    make_splits,
    save_splits,
)
from scalable_equiformer.data.catalog import dataset_file
from scalable_equiformer.errors import DataError

MD17_ATOMS = {"aspirin": 21, "benzene2017": 12, "ethanol": 9, "malonaldehyde": 9, "naphthalene": 18,
              "salicylic": 16, "toluene": 15, "uracil": 12}
RMD17_ATOMS = {"aspirin": 21, "azobenzene": 24, "benzene": 12, "ethanol": 9, "malonaldehyde": 9,
               "naphthalene": 18, "paracetamol": 20, "salicylic": 16, "toluene": 15, "uracil": 12}
MD22 = {  # atoms, frames, paper training size
    "Ac-Ala3-NHMe": (42, 85109, 6000), "DHA": (56, 69753, 8000), "stachyose": (87, 27272, 8000),
    "AT-AT": (60, 20001, 3000), "AT-AT-CG-CG": (118, 10153, 2000),
    "buckyball-catcher": (148, 6102, 600), "double-walled_nanotube": (370, 5032, 800),
}


def test_catalog_complete():
    fams = {f: sorted(k for k, v in CATALOG.items() if v.family == f) for f in ("md17", "rmd17", "md22")}
    assert len(fams["md17"]) == 8 and len(fams["rmd17"]) == 10 and len(fams["md22"]) == 7
    assert len(CATALOG) == 25
    for mol, atoms in MD17_ATOMS.items():
        info = CATALOG[f"md17_{mol}"]
        assert info.num_atoms == atoms and info.file_name == f"md17_{mol}.npz"
        assert info.url == f"http://www.quantum-machine.org/gdml/data/npz/md17_{mol}.npz"
        assert (info.train_size, info.val_size, info.test_size, info.split_seed) == (950, 50, None, 1)
        assert info.num_frames > 100_000
    for mol, atoms in RMD17_ATOMS.items():
        info = CATALOG[f"rmd17_{mol}"]
        assert info.num_atoms == atoms and info.file_name == f"rmd17_{mol}.npz"
        assert info.archive_member == f"rmd17/npz_data/rmd17_{mol}.npz" and info.index_splits == 5
        assert info.num_frames == (99988 if mol == "azobenzene" else 100000)
    for mol, (atoms, frames, train) in MD22.items():
        info = CATALOG[f"md22_{mol}"]
        assert (info.num_atoms, info.num_frames, info.train_size) == (atoms, frames, train)
        assert info.url == f"http://www.quantum-machine.org/gdml/repo/datasets/md22_{mol}.npz"
        assert info.val_size > 0 and info.train_size + info.val_size < info.num_frames
    for name, info in CATALOG.items():
        assert info.name == name and info.theory and info.url.startswith("http")


def test_get_info_and_close_names(tmp_path):
    assert get_info("md22_at-at") is CATALOG["md22_AT-AT"]  # case-insensitive
    with pytest.raises(DataError, match="md22_AT-AT-CG-CG"):
        get_info("md22_ATAT-CGCG")
    # rMD17 found where the archive unpacks it
    member = tmp_path / "rmd17" / "npz_data" / "rmd17_ethanol.npz"
    member.parent.mkdir(parents=True)
    member.write_bytes(b"x")
    assert dataset_file("rmd17_ethanol", tmp_path) == member


def test_make_splits_seeded_disjoint():
    a = make_splits(1000, 950, 30, seed=1)
    b = make_splits(1000, 950, 30, seed=1)
    c = make_splits(1000, 950, 30, seed=2)
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == np.int64 and np.all(np.diff(a[k]) > 0)
    assert not np.array_equal(a["train"], c["train"])
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (950, 30, 20)
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    assert np.array_equal(np.sort(allidx), np.arange(1000))  # disjoint and complete
    # the permutation rule: train = first train_size of default_rng(seed).permutation(n)
    perm = np.random.default_rng(1).permutation(1000)
    np.testing.assert_array_equal(a["train"], np.sort(perm[:950]))
    d = make_splits(1000, 10, 10, test_size=5, seed=0)
    assert len(d["test"]) == 5


def test_make_splits_too_few_frames_names_file():
    with pytest.raises(DataError, match=r"aspirin\.npz: has 900 frames, fewer than the split needs"):
        make_splits(900, 950, 50, seed=1, source="aspirin.npz")
    with pytest.raises(DataError, match="fewer than the split needs"):
        make_splits(100, 50, 20, test_size=40)
    with pytest.raises(DataError, match="train_size"):
        make_splits(100, -1, 20)


def test_save_and_load_splits(tmp_path):
    s = make_splits(500, 100, 20, seed=7)
    path = save_splits(s, tmp_path / "run", n_frames=500, source="x.npz")
    assert path == tmp_path / "run" / "splits.npz"
    assert not list((tmp_path / "run").glob("*.part"))
    back = load_splits(tmp_path / "run")
    for k in s:
        np.testing.assert_array_equal(back[k], s[k])
    load_splits(path, n_frames=500)
    with pytest.raises(DataError, match="made for 500 frames"):
        load_splits(tmp_path / "run", n_frames=400)
    with pytest.raises(DataError, match="splits file not found"):
        load_splits(tmp_path / "elsewhere")
    bad = {"train": np.array([1, 2]), "val": np.array([2]), "test": np.array([3])}
    with pytest.raises(DataError, match="share"):
        save_splits(bad, tmp_path / "bad")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "splits.npz").write_text("nope")
    with pytest.raises(DataError, match="corrupt splits file"):
        load_splits(tmp_path / "corrupt")


def _write_index_files(folder: Path, n_frames=5000, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(1, 6):
        perm = rng.permutation(n_frames)
        np.savetxt(folder / f"index_train_0{k}.csv", perm[:1000], fmt="%d")
        np.savetxt(folder / f"index_test_0{k}.csv", perm[1000:2000], fmt="%d")


def test_load_index_split(tmp_path):
    _write_index_files(tmp_path / "rmd17" / "splits")
    s = load_index_split(tmp_path, split=1)  # found under <root>/rmd17/splits/
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (1000, 0, 1000)
    published = np.loadtxt(tmp_path / "rmd17" / "splits" / "index_train_01.csv", dtype=np.int64)
    np.testing.assert_array_equal(s["train"], np.sort(published))
    v = load_index_split(tmp_path / "rmd17" / "splits", split=3, val_size=50, seed=1)
    assert (len(v["train"]), len(v["val"]), len(v["test"])) == (950, 50, 1000)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([v["train"], v["val"]])),
        np.sort(np.loadtxt(tmp_path / "rmd17" / "splits" / "index_train_03.csv", dtype=np.int64)),
    )
    with pytest.raises(DataError, match="1..5"):
        load_index_split(tmp_path, split=0)
    with pytest.raises(DataError, match="refers to frame"):
        load_index_split(tmp_path, split=1, n_frames=100)
    with pytest.raises(DataError, match="come with the rMD17 archive"):
        load_index_split(tmp_path / "nothing")
