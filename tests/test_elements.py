"""Elements never seen in training (issue 12): every checkpoint records the training split's
elements; tools/evaluate.py and the ASE calculator refuse data with another element, naming it,
or warn once (``--allow-unseen-elements``, ``strict=False``). Checkpoints without the record
(written before it existed) still load and are not checked. Atomic numbers the model cannot embed
are refused before a run folder is made."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms

from test_train_common import DEMO_DATA, PY, REPO, launch, tiny_config, train_in_process

from scalable_equiformer.calculator import EquiformerCalculator
from scalable_equiformer.errors import ConfigError, UserError
from scalable_equiformer.inference import load_model
from scalable_equiformer.training import checkpoint as ckpt_io

EVALUATE = str(REPO / "tools" / "evaluate.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("elements")
    train_in_process(tiny_config(root, epochs=1, test=8))
    return root / "run"


def _with_element(tmp_path, z_new: int, atom: int = 0):
    """The demo aspirin file with one atom's element replaced (H, C, O -> e.g. N)."""
    d = dict(np.load(DEMO_DATA))
    z = np.array(d["z"]).copy()
    z[atom] = z_new
    d["z"] = z
    d.pop("md5", None)  # the fingerprint no longer matches
    path = tmp_path / f"aspirin_z{z_new}.npz"
    np.savez(path, **d)
    return path


def _atoms(z_new=None):
    d = np.load(DEMO_DATA)
    z = np.array(d["z"], dtype=int)
    if z_new is not None:
        z[0] = z_new
    return Atoms(numbers=z, positions=d["R"][0])


def test_every_checkpoint_records_the_training_elements(trained):
    for name in ("last.pt", "best.pt"):
        ck = torch.load(trained / name, weights_only=True)
        assert ck["elements"] == [1, 6, 8], name  # aspirin: H, C, O
    _, _, info = load_model(trained)
    assert info["elements"] == [1, 6, 8]


def test_evaluate_refuses_an_unseen_element_naming_it(trained, tmp_path):
    data = _with_element(tmp_path, 7)  # nitrogen
    proc = launch([PY, EVALUATE, str(trained / "best.pt"), "--data", str(data), "--split", "all", "--max-frames", "4"],
                  cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "element N (Z=7) never seen in training" in lines[0] and "trained on H, C, O" in lines[0]
    assert "--allow-unseen-elements" in lines[0] and "MAE" not in proc.stdout

    out = tmp_path / "m.json"
    proc = launch([PY, EVALUATE, str(trained / "best.pt"), "--data", str(data), "--split", "all", "--max-frames", "4",
                   "--allow-unseen-elements", "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warn = [x for x in proc.stderr.splitlines() if x.startswith("warning: ")]
    assert len(warn) == 1 and "N (Z=7)" in warn[0]
    assert out.is_file()


def test_calculator_refuses_or_warns_once(trained):
    calc = EquiformerCalculator(trained, device="cpu")
    assert calc.elements == [1, 6, 8]
    atoms = _atoms()
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())  # the training elements: fine
    nitrogen = _atoms(7)
    nitrogen.calc = calc
    with pytest.raises(UserError, match=r"element N \(Z=7\) never seen in training .*trained on H, C, O.*strict=False"):
        nitrogen.get_potential_energy()

    lenient = EquiformerCalculator(trained, device="cpu", strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for shift in (0.0, 0.01):  # two different geometries: two calculations
            a = _atoms(7)
            a.positions[0] += shift
            a.calc = lenient
            assert np.isfinite(a.get_potential_energy())
        iron = _atoms(26)
        iron.calc = lenient
        iron.get_potential_energy()
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "never seen" in str(w.message)]
    assert len(msgs) == 2 and "N (Z=7)" in msgs[0] and "Fe (Z=26)" in msgs[1], msgs  # once per element


def test_checkpoint_without_elements_loads_and_is_not_checked(trained, tmp_path):
    ck = torch.load(trained / "best.pt", weights_only=True)
    del ck["elements"]
    old = tmp_path / "best.pt"
    torch.save(ck, old)  # as written before elements were recorded
    assert ckpt_io.load_checkpoint(old)["elements"] is None
    calc = EquiformerCalculator(old, device="cpu")
    assert calc.elements is None
    a = _atoms(7)
    a.calc = calc
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        assert np.isfinite(a.get_potential_energy())
    data = _with_element(tmp_path, 7)
    proc = launch([PY, EVALUATE, str(old), "--data", str(data), "--split", "all", "--max-frames", "4",
                   "--json", str(tmp_path / "m.json")], cwd=tmp_path)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr[-2000:]


def test_calculator_refuses_empty_atoms(trained):
    calc = EquiformerCalculator(trained, device="cpu")
    empty = Atoms()
    empty.calc = calc
    with pytest.raises(UserError, match="has no atoms"):
        empty.get_potential_energy()


def test_atomic_number_above_the_model_is_refused_before_the_run_folder(tmp_path):
    from scalable_equiformer.training import run

    cfg = tiny_config(tmp_path, "model.max_atomic_number=8")  # aspirin has O (Z=8): not below 8
    with pytest.raises(ConfigError) as e:
        run(cfg)
    msg = str(e.value)
    assert "atomic number 8 (O) is not below model.max_atomic_number (8)" in msg and "\n" not in msg
    assert "model.max_atomic_number to 9" in msg
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_z_the_model_cannot_embed(trained, tmp_path):
    data = _with_element(tmp_path, 70)  # Yb: above the default max_atomic_number of 64
    proc = launch([PY, EVALUATE, str(trained), "--data", str(data), "--split", "all", "--allow-unseen-elements"],
                  cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "atomic number 70 (Yb) is not below the model's max_atomic_number (64)" in lines[0]
