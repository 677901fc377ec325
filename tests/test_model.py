"""build_model, the stage API, forces at train/eval, statistics, and the paper's parameter counts."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch

from helpers import PAPER_IRREPS, tiny_model_config
from helpers.equivariance import as_batch, assert_close, make_molecule, single_thread  # noqa: F401 (fixture)

from scalable_equiformer import build_model
from scalable_equiformer.config import Config, ModelConfig
from scalable_equiformer.data.dataset import load_dataset
from scalable_equiformer.data.statistics import DatasetStatistics, compute_statistics
from scalable_equiformer.errors import ConfigError, DataError
from scalable_equiformer.nn import EdgeFeatures, Equiformer

ASPIRIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "xtb" / "aspirin_xtb_500K.npz"
STATS = DatasetStatistics(energy_per_atom_mean=-3.25, force_rms=0.8, avg_num_neighbors=4.5, avg_num_atoms=6.0)

pytestmark = pytest.mark.usefixtures("single_thread")


@functools.lru_cache(maxsize=None)
def _tiny(dtype: str = "float64", **kw) -> Equiformer:
    torch.manual_seed(0)
    return build_model(tiny_model_config(dtype=dtype, **kw), stats=STATS)


def _batch(dtype=torch.float64):
    return as_batch(make_molecule(6, seed=0, dtype=dtype), make_molecule(4, seed=1, dtype=dtype))


@pytest.mark.parametrize("lmax,expected", [(2, 3.50e6), (3, 5.50e6)])
def test_paper_parameter_counts(lmax, expected):
    """The original's MD17 models (nonlinear message, MLP attention, 32 exp-normal radial functions):
    3.50 M parameters at Lmax 2 and 5.50 M at Lmax 3. Built only, never run."""
    cfg = ModelConfig(lmax=lmax, avg_num_neighbors=15.57930850982666, avg_num_atoms=18.03065905448718,
                      **PAPER_IRREPS[lmax])
    n = sum(p.numel() for p in build_model(cfg).parameters())
    assert abs(n - expected) / expected < 0.02, f"{n} parameters vs the original's {expected:.0f}"
    assert n == {2: 3_496_001, 3: 5_500_865}[lmax]  # exact: a change here is a change of architecture


def test_build_from_config_or_model_config_and_errors():
    cfg = Config()
    cfg.model = tiny_model_config()
    m1 = build_model(cfg)
    m2 = build_model(cfg.model)
    assert sum(p.numel() for p in m1.parameters()) == sum(p.numel() for p in m2.parameters())
    assert m1.statistics() == {"energy_shift": 0.0, "energy_scale": 1.0, "avg_num_neighbors": 3.0, "avg_num_atoms": 5.0}
    with pytest.raises(ConfigError, match="avg_num_neighbors"):
        build_model(dataclasses.replace(cfg.model, avg_num_neighbors=None))
    with pytest.raises(ConfigError, match="model.attention"):
        build_model(dataclasses.replace(cfg.model, attention="softmax"))
    with pytest.raises(ConfigError, match="model.irreps_node"):
        build_model(dataclasses.replace(cfg.model, irreps_node="8x0q"))
    # statistics fill what the config leaves null; values in the config win
    m3 = build_model(dataclasses.replace(cfg.model, avg_num_neighbors=None, avg_num_atoms=None), stats=STATS)
    assert m3.statistics() == {"energy_shift": -3.25, "energy_scale": 0.8, "avg_num_neighbors": 4.5,
                               "avg_num_atoms": 6.0}
    m4 = build_model(cfg.model, stats=STATS)
    assert m4.statistics()["avg_num_neighbors"] == 3.0 and m4.statistics()["energy_scale"] == 0.8


@pytest.mark.parametrize("key,value,match", [
    ("irreps_feature", "8x0e+4x1e", r"model.irreps_feature: must be even scalars only"),
    ("irreps_head", "4x1e", r"model.irreps_head: MLP attention needs even scalars"),
    ("radial_hidden", [], r"model.radial_hidden: must be a non-empty list"),
    ("num_blocks", 2.0, r"model.num_blocks: must be an integer"),
    ("radial_basis", "fourier", r"model.radial_basis: must be exp_normal, gaussian or bessel"),
])
def test_one_copy_of_the_model_rules_at_load_and_in_build_model(key, value, match):
    """The rules build_model used to check on its own are the config's: load_config refuses them,
    and a ModelConfig built in Python gets the same message from build_model (one function)."""
    from scalable_equiformer.config import load_config

    with pytest.raises(ConfigError, match=match):
        build_model(dataclasses.replace(tiny_model_config(), **{key: value}))
    if not isinstance(value, float):  # a float is coerced to an integer by load_config
        shown = value if isinstance(value, str) else str(value)
        with pytest.raises(ConfigError, match=r"--set: " + match):
            load_config(None, ["data.name=x", f"model.{key}={shown}"])


def test_statistics_are_float64_buffers_in_the_state_dict():
    model = _tiny("float32")
    sd = model.state_dict()
    for name in ("energy_shift", "energy_scale", "avg_num_neighbors", "avg_num_atoms"):
        assert sd[name].dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32
    other = build_model(tiny_model_config(dtype="float32"))
    other.load_state_dict(sd)
    assert other.statistics() == model.statistics()
    assert other.double().energy_shift.dtype == torch.float64


def test_forward_is_the_stages_composed_and_shift_scale_apply():
    model = _tiny().eval()
    batch = _batch()
    out = model(batch)
    pos = batch.pos.clone().requires_grad_(True)
    edge_index = model.build_graph(pos, batch.batch)
    edges = model.edge_features(pos, edge_index)
    assert isinstance(edges, EdgeFeatures) and edges.sh.shape == (edge_index.shape[1], 9) \
        and edges.radial.shape == (edge_index.shape[1], 8)
    x = model.embed(batch.z, edges, pos.shape[0])
    attr = model.node_attr(x)
    for block in model.blocks:
        x = block(x, attr, edges)
    assert x.shape == (pos.shape[0], 16)  # last block -> irreps_feature
    energy = model.readout(x, batch.z, batch.batch, batch.num_graphs)
    forces = -torch.autograd.grad(energy.sum(), pos)[0]
    assert energy.dtype == torch.float64 and out["energy"].shape == (2,)
    assert_close(out["energy"], energy, torch.float64, "energy from the stages")
    assert_close(out["forces"], forces, torch.float64, "forces from the stages")
    # E = scale * raw / sqrt(avg_atoms) + n_atoms * shift
    raw = model.head(x).double()
    n = torch.bincount(batch.batch).double()
    # avg_num_atoms 5 from the config
    expected = torch.zeros(2, dtype=torch.float64).index_add(0, batch.batch, raw) * 0.8 / math.sqrt(5.0) - 3.25 * n
    assert_close(energy, expected, torch.float64, "shift and scale")


def test_forces_keep_a_graph_only_in_training():
    model = _tiny()
    batch = _batch()
    model.eval()
    with torch.no_grad():  # evaluation loops often run under no_grad: forces still come out
        out = model(batch)
    assert out["forces"].abs().sum() > 0
    assert out["energy"].grad_fn is None and out["forces"].grad_fn is None
    model.train()
    out = model(batch)
    assert out["forces"].requires_grad  # create_graph=True: the force loss reaches the parameters
    loss = out["energy"].abs().sum() + out["forces"].abs().sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    model.zero_grad(set_to_none=True)
    only_e = model(batch, compute_forces=False)
    assert set(only_e) == {"energy"}


def test_fp32_model_takes_fp64_positions_and_matches_fp64():
    m64 = _tiny()
    m32 = build_model(tiny_model_config(dtype="float32"), stats=STATS)
    m32.load_state_dict(m64.state_dict())
    b = _batch()
    o64, o32 = m64.eval()(b), m32.eval()(b)
    assert o32["forces"].dtype == torch.float32
    assert_close(o32["energy"], o64["energy"], torch.float32, "fp32 vs fp64 energy", tol=1e-4)
    assert_close(o32["forces"], o64["forces"], torch.float32, "fp32 vs fp64 forces", tol=1e-4)


def test_dropouts_and_drop_path_train_and_switch_off_at_eval():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(alpha_drop=0.3, proj_drop=0.2, drop_path=0.2, dtype="float64"), stats=STATS)
    b = _batch()
    model.train()
    out = model(b)
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    model.eval()
    e1, e2 = model(b)["energy"], model(b)["energy"]
    assert torch.equal(e1, e2)


def test_out_of_range_atomic_number_is_an_error():
    b = _batch()
    b.z[0] = 64
    with pytest.raises(ValueError, match="max_atomic_number"):
        _tiny().eval()(b)


def _aspirin():
    if not ASPIRIN.exists():
        pytest.skip(f"{ASPIRIN} not present")
    return load_dataset(ASPIRIN)


def test_compute_statistics_bulk_subset_and_items_agree():
    ds = _aspirin()
    train = ds.subset(torch.arange(0, 300, 3))
    s = compute_statistics(train, cutoff=5.0)
    n = ds.num_atoms
    e = train.energies.double()
    f = train.forces.double()
    assert math.isclose(s.energy_per_atom_mean, float((e / n).mean()), rel_tol=1e-12)
    assert math.isclose(s.force_rms, float(f.pow(2).mean().sqrt()), rel_tol=1e-12)
    assert s.avg_num_atoms == n
    assert 0 < s.avg_num_neighbors < n - 1
    # the same through torch's Subset and through item-by-item iteration
    via_subset = compute_statistics(torch.utils.data.Subset(ds, list(range(0, 300, 3))), cutoff=5.0)
    items = [train[i] for i in range(len(train))]
    via_items = compute_statistics(items, cutoff=5.0)
    for other in (via_subset, via_items):
        for k, v in s.to_dict().items():
            assert math.isclose(getattr(other, k), v, rel_tol=1e-9), k
    assert DatasetStatistics.from_dict(s.to_dict()) == s
    with pytest.raises(DataError, match="unknown"):
        DatasetStatistics.from_dict({**s.to_dict(), "std": 1.0})
    # subsampling caps the frames used
    capped = compute_statistics(ds, cutoff=5.0, max_frames=50)
    assert math.isclose(capped.avg_num_atoms, n)


def test_model_on_real_molecule_batch_invariance_fp32():
    """Aspirin frames from the shipped data, fp32: a frame alone equals the frame in a batch."""
    ds = _aspirin()
    model = _tiny("float32").eval()
    one = model(as_batch(ds[7]))
    many = model(as_batch(ds[3], ds[7], ds[11]))
    n = ds.num_atoms
    assert_close(many["energy"][1:2], one["energy"], torch.float32, "energy in a batch")
    assert_close(many["forces"][n : 2 * n], one["forces"], torch.float32, "forces in a batch")


def test_blocks_under_non_reentrant_checkpoint_give_the_same_forces_and_gradients():
    """The stages compose with torch.utils.checkpoint (use_reentrant=False) in training mode."""
    model = _tiny().train()
    batch = _batch()

    def run(checkpointed: bool):
        model.zero_grad(set_to_none=True)
        pos = batch.pos.clone().requires_grad_(True)
        edges = model.edge_features(pos, model.build_graph(pos, batch.batch))
        x = model.embed(batch.z, edges, pos.shape[0])
        attr = model.node_attr(x)
        for block in model.blocks:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, attr, edges, batch.batch, use_reentrant=False)
            else:
                x = block(x, attr, edges, batch.batch)
        energy = model.readout(x, batch.z, batch.batch, batch.num_graphs)
        forces = -torch.autograd.grad(energy.sum(), pos, create_graph=True)[0]
        (energy.sum() + forces.pow(2).sum()).backward()
        return forces.detach(), [p.grad.clone() for p in model.parameters()]

    f0, g0 = run(False)
    f1, g1 = run(True)
    assert_close(f1, f0, torch.float64, "forces with checkpointed blocks")
    for a, b in zip(g1, g0):
        assert_close(a, b, torch.float64, "parameter gradients with checkpointed blocks")
    model.zero_grad(set_to_none=True)


def test_molecule_without_edges():
    """An isolated atom (or a graph part with no edges) has an energy and zero forces, no crash."""
    from torch_geometric.data import Batch, Data

    from scalable_equiformer import build_model

    model = build_model(tiny_model_config())
    model.train()
    for pos in (torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])):
        batch = Batch.from_data_list([Data(pos=pos.double(), z=torch.full((pos.shape[0],), 6))])
        out = model(batch)
        assert torch.isfinite(out["energy"]).all()
        assert torch.equal(out["forces"], torch.zeros_like(out["forces"]))
        out["energy"].sum().backward()
