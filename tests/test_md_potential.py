"""The MD inference path (:class:`scalable_equiformer.md.Potential`): the numbers of ``model(batch)``,
a Verlet list that gives the edges of a fresh search at every step, the inputs refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from helpers import tiny_sets
from scalable_equiformer import build_model, load_config
from scalable_equiformer.data import load_dataset
from scalable_equiformer.nn.graph import radius_graph
from scalable_equiformer.data.statistics import compute_statistics
from scalable_equiformer.errors import UserError
from scalable_equiformer.md import Potential

ROOT = Path(__file__).resolve().parent.parent
ETHANOL = ROOT.parent / "shared" / "data" / "real" / "md17_ethanol_2000_schnetpack.npz"


@pytest.fixture(scope="module")
def ethanol():
    if not ETHANOL.is_file():
        pytest.fail(f"{ETHANOL} missing: the tests read the real MD17 ethanol frames in ../shared/data/real")
    return load_dataset(ETHANOL)


def _model(ethanol, smooth: bool = True, dtype: str = "float64", cutoff: float = 5.0):
    torch.manual_seed(0)
    cfg = load_config(None, tiny_sets() + [f"model.dtype={dtype}", f"model.smooth_cutoff={str(smooth).lower()}",
                                           f"model.cutoff={cutoff}", f"data.path={ETHANOL}"])
    return build_model(cfg, compute_statistics(ethanol.subset(range(50)), cfg.model.cutoff)).eval()


def test_potential_equals_the_model_and_its_verlet_list_a_fresh_search(ethanol):
    model = _model(ethanol, cutoff=2.2)  # ethanol is 3.7 Å across: a cutoff inside it, so pairs cross it
    item = ethanol[3]
    z, pos0 = item.z.numpy(), item.pos.double().numpy()
    fresh, verlet = Potential(model, skin=0.0), Potential(model, skin=0.6)
    for pot in (fresh, verlet):
        pot.set_numbers(z)
    rng = np.random.default_rng(0)
    pos, counts = pos0.copy(), set()
    for step in range(40):
        ref = model(Batch.from_data_list([Data(pos=torch.as_tensor(pos), z=item.z)]), compute_forces=True)
        e0, f0 = fresh.compute(pos)
        e1, f1 = verlet.compute(pos)
        assert e0 == pytest.approx(float(ref["energy"][0]), rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(f0, ref["forces"].numpy(), rtol=0, atol=1e-12)
        assert e1 == e0  # the same edges in the same order: the same arithmetic
        np.testing.assert_array_equal(f1, f0)
        counts.add(radius_graph(torch.as_tensor(pos), model.cutoff).shape[1])
        pos = pos + rng.normal(scale=0.04, size=pos.shape)  # a random walk: pairs cross the cutoff
    assert fresh.searches == 40
    assert 1 < verlet.searches < 40  # searched again when an atom moved more than skin / 2, not every step
    assert len(counts) > 1  # pairs crossed the cutoff during the walk (else the filter would go untested)


def test_potential_takes_no_parameter_gradients_and_works_in_float32(ethanol):
    model = _model(ethanol, dtype="float32")
    pot = Potential(model)
    pot.set_numbers(ethanol[0].z.numpy())
    e, f = pot.compute(ethanol[0].pos.numpy())
    assert f.dtype == np.float64 and f.shape == (9, 3) and np.isfinite(f).all()
    assert all(p.grad is None for p in model.parameters())  # -dE/dpos only: no parameter gradient
    ref = model(Batch.from_data_list([ethanol[0]]), compute_forces=True)
    assert e == pytest.approx(float(ref["energy"][0]), abs=1e-5)


def test_potential_refuses_bad_input_in_one_line(ethanol):
    model = _model(ethanol)
    pot = Potential(model, elements=[1, 6, 8], label="best.pt")
    with pytest.raises(UserError, match="set_numbers"):
        pot.compute(np.zeros((9, 3)))
    with pytest.raises(UserError, match=r"best.pt: element N \(Z=7\) never seen"):
        pot.set_numbers([6, 7, 1])
    pot.set_numbers(ethanol[0].z.numpy())
    with pytest.raises(UserError, match=r"positions must be \[9, 3\]"):
        pot.compute(np.zeros((8, 3)))
    bad = ethanol[0].pos.double().numpy().copy()
    bad[2, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        pot.compute(bad)
    with pytest.raises(UserError, match="skin"):
        Potential(model, skin=-1)
    with pytest.raises(UserError, match="partitions=2: .*process group"):
        Potential(model, partitions=2)


def test_a_model_without_the_smooth_cutoff_warns_once(ethanol):
    model = _model(ethanol, smooth=False)
    with pytest.warns(UserWarning, match="smooth_cutoff=false"):
        Potential(model, label="md17.pt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Potential(model)  # the same model object: no second warning
        Potential(_model(ethanol, smooth=True))  # a smooth model: none
