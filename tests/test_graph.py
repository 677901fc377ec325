"""radius_graph against brute force: random points, real molecules, batches, pairs at r +- 1e-7."""

import types
from pathlib import Path

import numpy as np
import pytest
import torch

import scalable_equiformer.nn.graph as graph
from scalable_equiformer.data import load_dataset, radius_graph
from scalable_equiformer.training.batches import collate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def brute_force(pos, r, batch=None):
    """Reference: all pairs j -> i with |pos_j - pos_i| < r, same graph, j != i; sorted (i, j)."""
    n = pos.shape[0]
    d = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1).sqrt()  # [i, j]
    m = d < r
    m.fill_diagonal_(False)
    if batch is not None:
        m &= batch[:, None] == batch[None, :]
    tgt, src = m.nonzero(as_tuple=True)  # row-major: sorted by target then source
    return torch.stack([src, tgt]) if n else torch.empty(2, 0, dtype=torch.long)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,r", [(1, 3.0), (2, 3.0), (50, 2.0), (400, 3.0), (700, 1.5)])
def test_random_points_match_brute_force(n, r, dtype):
    g = torch.Generator().manual_seed(n)
    pos = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 12.0 - 3.0).to(dtype)
    ei = radius_graph(pos, r)
    assert ei.dtype == torch.long and ei.shape[0] == 2
    assert torch.equal(ei, brute_force(pos, r))


def test_symmetric_no_self_loops_sorted():
    pos = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    ei = radius_graph(pos, 2.5)
    assert (ei[0] != ei[1]).all()
    fwd = set(map(tuple, ei.t().tolist()))
    assert fwd == {(b, a) for a, b in fwd}
    key = ei[1] * 300 + ei[0]
    assert (key[1:] > key[:-1]).all()


def test_pairs_at_cutoff_plus_minus_1e7():
    r = 5.0
    pts = [[0.0, 0.0, 0.0], [r - 1e-7, 0.0, 0.0],  # inside: edge
           [20.0, 0.0, 0.0], [20.0, r + 1e-7, 0.0],  # outside: no edge
           [40.0, 0.0, 0.0], [40.0, 0.0, r]]  # exactly r: no edge (strict <)
    d = (r - 1e-7) / np.sqrt(3.0)
    pts += [[60.0, 0.0, 0.0], [60.0 + d, d, d]]  # diagonal, just inside
    pos = torch.tensor(pts, dtype=torch.float64)
    ei = radius_graph(pos, r)
    assert set(map(tuple, ei.t().tolist())) == {(0, 1), (1, 0), (6, 7), (7, 6)}
    assert torch.equal(ei, brute_force(pos, r))
    # many random pairs placed at r +- 1e-7 in random directions (float64)
    g = torch.Generator().manual_seed(1)
    m = 200
    dirs = torch.randn(m, 3, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    eps = torch.where(torch.rand(m, generator=g) < 0.5, -1e-7, 1e-7).to(torch.float64)
    a = torch.arange(m, dtype=torch.float64)[:, None] * torch.tensor([100.0, 0, 0], dtype=torch.float64)
    b = a + dirs * (r + eps)[:, None]
    pos = torch.cat([a, b])
    ei = radius_graph(pos, r)
    assert torch.equal(ei, brute_force(pos, r))
    assert ei.shape[1] == 2 * int((eps < 0).sum())


def test_batches_real_molecules():
    path = SHARED / "xtb" / "aspirin_xtb_500K.npz"
    if not path.exists():
        pytest.skip(f"shared data file {path} not present")
    ds = load_dataset(path)
    batch = collate(ds, range(6), "cpu")
    for r in (2.0, 5.0, 8.0):
        ei = radius_graph(batch.pos, r, batch.batch)
        assert torch.equal(ei, brute_force(batch.pos, r, batch.batch))
        assert (batch.batch[ei[0]] == batch.batch[ei[1]]).all()
        # equals the per-molecule graphs, offset
        for g in range(6):
            lo, hi = int(batch.ptr[g]), int(batch.ptr[g + 1])
            own = ei[:, (ei[1] >= lo) & (ei[1] < hi)] - lo
            assert torch.equal(own, radius_graph(ds[g].pos, r))
    # all molecules at the same place (identical frames): batch separation is what keeps them apart
    same = torch.cat([ds[0].pos] * 3)
    b = torch.arange(3).repeat_interleave(21)
    ei = radius_graph(same, 5.0, b)
    assert ei.shape[1] == 3 * radius_graph(ds[0].pos, 5.0).shape[1]


def test_unsorted_batch_and_float32():
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(500, 3, generator=g) * 6
    batch = torch.randint(0, 4, (500,), generator=g)  # unsorted
    assert torch.equal(radius_graph(pos, 1.7, batch), brute_force(pos, 1.7, batch))


def test_no_grad():
    pos = torch.randn(60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    ei = radius_graph(pos, 3.0)
    assert not ei.requires_grad
    vec = pos[ei[0]] - pos[ei[1]]  # the model's edge vectors carry grad
    vec.norm(dim=-1).sum().backward()
    assert pos.grad is not None


def test_large_system_chunked(monkeypatch):
    """Many chunks (tiny pair budget) give the same result as one."""
    g = torch.Generator().manual_seed(7)
    pos = torch.rand(3000, 3, generator=g, dtype=torch.float64) * 30
    full = radius_graph(pos, 3.0)
    monkeypatch.setattr(graph, "_PAIR_BUDGET", 20000)
    assert torch.equal(radius_graph(pos, 3.0), full)
    sub = pos[:400]
    assert torch.equal(radius_graph(sub, 3.0), brute_force(sub, 3.0))


def test_20k_atoms_fast():
    import time

    g = torch.Generator().manual_seed(11)
    n = 20000
    pos = torch.rand(n, 3, generator=g, dtype=torch.float64) * (n / 0.1) ** (1 / 3)  # 0.1 atoms/Å^3
    t = time.perf_counter()
    ei = radius_graph(pos, 5.0)
    took = time.perf_counter() - t
    assert took < 30, took  # ~1-4 s on a loaded 2-core machine
    # spot check 50 receivers against exact distances
    for i in torch.randint(0, n, (50,), generator=g).tolist():
        d = ((pos - pos[i]) ** 2).sum(-1).sqrt()
        expect = ((d < 5.0) & (torch.arange(n) != i)).nonzero().ravel()
        assert torch.equal(ei[0, ei[1] == i], expect)


def test_torch_cluster_path_filtered_and_sorted(monkeypatch):
    """With torch_cluster present: its output (a superset at the enlarged radius, any order) is
    filtered to the exact rule and sorted. Emulated here by a fake module."""
    calls = {}

    def fake_radius_graph(x, r, batch=None, loop=False, max_num_neighbors=32, flow="source_to_target"):
        calls["max_num_neighbors"] = max_num_neighbors
        calls["r"] = r
        ei = brute_force(x.double(), r, batch)
        perm = torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(0))
        return ei[:, perm]

    monkeypatch.setattr(graph, "_torch_cluster", types.SimpleNamespace(radius_graph=fake_radius_graph))
    g = torch.Generator().manual_seed(2)
    pos = torch.rand(200, 3, generator=g, dtype=torch.float64) * 8
    batch = torch.arange(2).repeat_interleave(100)
    ei = radius_graph(pos, 2.0, batch)
    assert calls["max_num_neighbors"] >= 200 and calls["r"] > 2.0
    assert torch.equal(ei, brute_force(pos, 2.0, batch))


def test_bad_arguments():
    with pytest.raises(ValueError):
        radius_graph(torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError):
        radius_graph(torch.zeros(4, 3), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        radius_graph(torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]]), 1.0)
    assert radius_graph(torch.zeros(0, 3), 1.0).shape == (2, 0)
