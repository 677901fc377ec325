"""Halo exchange over 2 and 4 gloo processes: values, adjoint (backward adds into owners), and
exact energy / forces / parameter gradients of a small message-passing net (double backward)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalable_equiformer.data import radius_graph
from partition_harness import load_frames, stack_frames, tile_system
from scalable_equiformer.parallel.halo import halo_exchange, sum_replicated
from scalable_equiformer.parallel.partition import partition_graph

ATAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "xtb" / "AT-AT_xtb_500K.npz"
CUTOFF = 4.0
C = 8  # channels of the toy net


def toy_params(dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return {"emb": r(10, C), "a": r(C), "b": r(C), "W": r(2, C, C) / C**0.5, "v": r(C)}


def toy_energy(p, pos, z, ei, n_own, exchange):
    """Sum of per-atom energies of the owned atoms; ``exchange`` fills the halo rows."""
    n = pos.shape[0]
    vec = pos[ei[0]] - pos[ei[1]]
    r = vec.norm(dim=-1)
    env = torch.cos(0.5 * torch.pi * r / CUTOFF) ** 2  # smooth cutoff
    rad = torch.tanh(r[:, None] * p["a"] + p["b"]) * env[:, None]  # [E, C]
    x = p["emb"][z] + torch.zeros(n, C, dtype=pos.dtype).index_add(0, ei[1], rad)  # embed
    for W in p["W"]:
        x = exchange(x[:n_own])  # [n_local, C]
        m = (x[ei[0]] @ W) * rad  # [E, C]
        x = x + torch.nn.functional.silu(torch.zeros_like(x).index_add(0, ei[1], m))
    return (torch.nn.functional.silu(x[:n_own]) @ p["v"]).sum()


def toy_step(p, pos, nodes, z, ei, n_own, exchange, reduce):
    """Energy, forces (create_graph) and d(loss)/d(params) with loss = E + 0.1 sum F^2.

    ``pos`` holds all atoms; ``nodes`` the local ones (owned + halo) this rank computes with.
    """
    p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    pos = pos.clone().requires_grad_(True)
    e = reduce(toy_energy(p, pos[nodes], z[nodes], ei, n_own, exchange))
    (g,) = torch.autograd.grad(e, pos, create_graph=True)
    f = -reduce(g)
    loss = e + 0.1 * (f**2).sum()
    grads = torch.autograd.grad(loss, list(p.values()))
    return e.detach(), f.detach(), {k: gr for k, gr in zip(p, grads)}


def systems():
    R, z = stack_frames(load_frames(ATAT, 2))
    yield "atat0", R[0], z
    yield "atat1", R[1], z
    pos, zt = tile_system(R[0], z, reps=(3, 3, 2), gap=2.0)  # 1,080 atoms
    yield "tiled", pos, zt


def _worker(rank, P, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=P)
    res = {}
    for dtype in (torch.float64, torch.float32):
        for name, pos, z in systems():
            pos = pos.to(dtype)
            ei = radius_graph(pos, CUTOFF)
            part = partition_graph(pos, ei, P).local(rank)
            # 1. values: the exchange fills the halo with the owners' rows
            feats = torch.arange(pos.shape[0] * 3, dtype=dtype).reshape(-1, 3)
            x = halo_exchange(feats[part.owned], part)
            res[f"values/{name}/{dtype}"] = torch.equal(x.detach(), feats[part.nodes])
            # 2. adjoint: owners receive the sum of the gradients of all copies
            w = torch.sin(torch.arange(pos.shape[0], dtype=dtype))[:, None].expand(-1, 3)
            xo = feats[part.owned].clone().requires_grad_(True)
            (go,) = torch.autograd.grad((halo_exchange(xo, part) * w[part.nodes]).sum(), xo)
            full = torch.zeros_like(feats)
            full[part.owned] = go
            dist.all_reduce(full)
            res[f"adjoint/{name}/{dtype}"] = full
            # 3. exact energy, forces, parameter gradients through two exchanges
            e, f, grads = toy_step(
                toy_params(dtype), pos, part.nodes, z, part.edge_index, part.num_owned,
                lambda xo: halo_exchange(xo, part), sum_replicated,
            )
            for k in grads:
                dist.all_reduce(grads[k])
            res[f"step/{name}/{dtype}"] = (e, f, grads)
            res[f"edges/{name}/{dtype}"] = part.edge_ids.numel()
    torch.save(res, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def run_ranks(P, tmp_path):
    mp.start_processes(
        _worker, args=(P, f"file://{tmp_path}/init", str(tmp_path)), nprocs=P, start_method="fork"
    )
    return [torch.load(tmp_path / f"{r}.pt") for r in range(P)]


@pytest.mark.slow
@pytest.mark.parametrize("P", [2, 4])
def test_halo_exact(P, tmp_path):
    if not ATAT.exists():
        pytest.skip(f"shared data missing: {ATAT}")
    ranks = run_ranks(P, tmp_path)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        for name, pos, z in systems():
            pos = pos.to(dtype)
            ei = radius_graph(pos, CUTOFF)
            n = pos.shape[0]
            key = f"{name}/{dtype}"
            assert all(r[f"values/{key}"] for r in ranks)
            # every edge once
            assert sum(r[f"edges/{key}"] for r in ranks) == ei.shape[1]
            # adjoint: the owner's gradient = its own weight (1 copy) + one per halo copy
            part = partition_graph(pos, ei, P)
            copies = 1 + torch.bincount(part.halo_src, minlength=n).to(dtype)
            w = torch.sin(torch.arange(n, dtype=dtype))[:, None] * copies[:, None]
            for r in ranks:
                torch.testing.assert_close(r[f"adjoint/{key}"], w.expand(-1, 3), rtol=0, atol=0)
            # the partitioned step equals the single-process step
            e0, f0, g0 = toy_step(
                toy_params(dtype), pos, torch.arange(n), z, ei, n, lambda x: x, lambda x: x
            )
            for r in ranks:
                e, f, g = r[f"step/{key}"]
                assert abs(float(e - e0)) <= tol * abs(float(e0)), (key, float(e), float(e0))
                assert float((f - f0).abs().max()) <= tol * float(f0.abs().max()), key
                for k in g0:
                    err = float((g[k] - g0[k]).abs().max()) / float(g0[k].abs().max())
                    assert err <= tol, (key, k, err)
