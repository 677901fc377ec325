"""Geometry is what the model says it is (issue 24, item 3): a molecule far from the origin gives
the same numbers as at the origin."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from torch_geometric.data import Batch, Data

from helpers import tiny_sets
from scalable_equiformer import build_model, load_config
from scalable_equiformer.calculator import EquiformerCalculator
from scalable_equiformer.data import load_dataset
from scalable_equiformer.data.statistics import compute_statistics
from scalable_equiformer.errors import DataError, UserError
from test_train_common import DEMO_DATA, empty_config, launch, sets, tiny_config, tiny_overrides, train_cmd, train_in_process

REPO = Path(__file__).resolve().parents[1]
OFFSET = 1.0e6  # Å
ETHANOL = REPO.parent / "shared" / "data" / "real" / "md17_ethanol_20_schnetpack_testdb.npz"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
