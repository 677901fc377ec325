"""Every memory lever gives the numbers of the plain path.

Checkpointing (``blocks``, ``forces``, ``forces`` + edge chunks): energies, forces and parameter
gradients after ``loss.backward()`` on a loss with forces equal the plain autograd path to 1e-10 in
fp64 (dropout and drop-path on, where the random stream is the same). Mixed precision: bf16 within
a stated tolerance of fp32.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import force_loss_batch, tiny_sets
from helpers.equivariance import run_model_battery, single_thread  # noqa: F401 (fixture)
from scalable_equiformer.config import load_config
from scalable_equiformer.errors import ConfigError
from scalable_equiformer.memory import ForceRunner, LeveredModel, Levers
from scalable_equiformer.memory import force_checkpoint as fc
from scalable_equiformer.model import build_model
from scalable_equiformer.memory.precision import autocast
from scalable_equiformer.nn.precision import fp32_island
from scalable_equiformer.profiling import systems

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = tiny_sets(radial_hidden="[8]", avg_num_neighbors=10, avg_num_atoms=16)


def _model(dtype="float64", extra=()):
    torch.manual_seed(0)
    cfg = load_config(None, ["data.name=x", f"model.dtype={dtype}", *TINY, *extra])
    model = build_model(cfg)
    model.train()
    return model


def _batch(dtype=torch.float64, atoms=14):
    return force_loss_batch(atoms, dtype)


def _step(model, batch, strategy, chunk=None, seed=5, training=True, keep=0):
    """Energies, forces and parameter gradients of a loss with energies and forces."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = ForceRunner(Levers(strategy, edge_chunk_size=chunk, keep_blocks=keep))(model, batch, training=training)
    if not training:
        return out["energy"], out["forces"], {}
    loss = (out["energy"] - batch.energy).abs().sum() \
        + 80 * torch.linalg.vector_norm(out["forces"] - batch.forces, dim=-1).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["energy"].detach(), out["forces"].detach(), grads


def _assert_same(a, b, tol=1e-10, what=""):
    (e1, f1, g1), (e2, f2, g2) = a, b
    torch.testing.assert_close(e1, e2, rtol=tol, atol=tol, msg=f"{what}: energies")
    torch.testing.assert_close(f1, f2, rtol=tol, atol=tol, msg=f"{what}: forces")
    assert set(g1) == set(g2), f"{what}: parameters with gradients differ: {set(g1) ^ set(g2)}"
    for name in g2:
        scale = max(float(g2[name].abs().max()), 1.0)
        err = float((g1[name] - g2[name]).abs().max())
        assert err <= tol * scale, f"{what}: gradient of {name} off by {err:.2e}"


@pytest.mark.parametrize("strategy,chunk,keep", [("blocks", None, 0), ("forces", None, 0), ("forces", 60, 0),
                                                 ("forces", None, 1), ("forces", 60, 1), ("forces", None, 99)],
                         ids=["blocks", "forces", "forces+chunks", "forces+keep1", "forces+chunks+keep1",
                              "forces+keep-all"])
def test_lever_equals_plain_fp64(strategy, chunk, keep):
    model, batch = _model(), _batch()
    ref = _step(model, batch, "none")
    assert len(ref[2]) == sum(1 for p in model.parameters() if p.requires_grad)
    if chunk is not None:
        assert len(fc.edge_chunks(model.build_graph(batch.pos, batch.batch), batch.pos.shape[0], chunk)) > 3
    _assert_same(_step(model, batch, strategy, chunk, keep=keep), ref, what=strategy)


@pytest.mark.parametrize("strategy,keep", [("blocks", 0), ("forces", 0), ("forces", 1)])
def test_lever_equals_plain_with_dropout_and_drop_path(strategy, keep):
    """Recomputations draw the same random numbers as the first pass (and as the plain path)."""
    model = _model(extra=["model.drop_path=0.2", "model.alpha_drop=0.2", "model.proj_drop=0.1"])
    batch = _batch()
    ref = _step(model, batch, "none")
    assert not torch.equal(ref[1], _step(model, batch, "none", seed=6)[1])  # dropout is live
    _assert_same(_step(model, batch, strategy, keep=keep), ref, what=strategy)


def test_kept_blocks_are_not_recomputed():
    """memory.keep_blocks=k: the last k blocks run once in training (their graphs are kept)."""
    model, batch = _model(), _batch()
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    _step(model, batch, "forces", keep=1)
    # forward, backward sweep's VJP, its recomputation in loss.backward(), the chain's recomputation
    assert calls[:-1] == [4] * (len(model.blocks) - 1) and calls[-1] == 1


@pytest.mark.parametrize("chunk", [None, 60])
def test_forces_strategy_at_evaluation(chunk):
    model, batch = _model(), _batch()
    model.eval()
    ref = _step(model, batch, "none", training=False)
    e, f, _ = _step(model, batch, "forces", chunk, training=False)
    assert not e.requires_grad and not f.requires_grad
    torch.testing.assert_close(e, ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, ref[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alias", [True, False])
def test_vjp_needs_fresh_aliases_of_shared_edge_features(alias, monkeypatch):
    """The trap of DESIGN.md: a block's VJP taken w.r.t. the shared edge features themselves
    returns the total derivative, through the earlier stages too, and the sum of the per-stage
    shares counts those paths twice. _BlockVJP aliases the features inside its function."""
    model, batch = _model(), _batch()
    model.eval()
    if not alias:
        def no_alias(self, create_graph, x, g, *feats):
            y = self.fn(x, list(feats))
            wrt = ([x] if self.wrt_x else []) + list(feats)
            grads = torch.autograd.grad(y, wrt, g, create_graph=create_graph, retain_graph=True, allow_unused=True)
            return fc._zeros_for_none(grads, wrt)

        monkeypatch.setattr(fc._BlockVJP, "__call__", no_alias)
    pos = batch.pos.detach().requires_grad_(True)
    n = pos.shape[0]
    edges = model.edge_features(pos, model.build_graph(pos, batch.batch))
    names = fc._grad_fields(edges)
    feats = [getattr(edges, k) for k in names]
    x1 = model.embed(batch.z, edges, n)  # shares the feature tensors with the block below
    block = model.blocks[0]
    energy = block(x1, model.node_attr(x1), edges, batch.batch).sum()
    (expected,) = torch.autograd.grad(energy, pos, retain_graph=True)

    def block_fn(x, fs):
        return block(x, model.node_attr(x), fc._with_fields(edges, names, fs), batch.batch)

    def embed_fn(x, fs):
        return model.embed(batch.z, fc._with_fields(edges, names, fs), n)

    ones = torch.ones_like(x1)
    gx, *e1 = fc._BlockVJP(block_fn, names, [], wrt_x=True)(False, x1, ones, *feats)
    e0 = fc._BlockVJP(embed_fn, names, [], wrt_x=False)(False, x1, gx, *feats)
    (got,) = torch.autograd.grad(feats, pos, [a + b for a, b in zip(e1, e0)])
    err = float((got - expected).abs().max())
    assert (err < 1e-10) if alias else (err > 1e-6), err


def test_forces_lever_passes_the_model_battery():
    model = _model(extra=["model.smooth_cutoff=true"])  # the battery checks continuity at the cutoff
    run_model_battery(LeveredModel(model, ForceRunner(Levers("forces"))), torch.float64, cutoff=model.cutoff)


def test_edge_chunks_cover_every_edge_and_atom_once():
    z, pos = systems.synthetic_molecule(20)
    ei = build_model(load_config(None, ["data.name=x", *TINY])).build_graph(torch.as_tensor(pos), None)
    n, e = len(z), ei.shape[1]
    chunks = fc.edge_chunks(ei, n, 50)
    assert chunks[0][0] == 0 and chunks[-1][1] == n and chunks[0][2] == 0 and chunks[-1][3] == e
    for (a0, a1, b0, b1), (c0, _, d0, _) in zip(chunks, chunks[1:]):
        assert a1 == c0 and b1 == d0
    for n0, n1, e0, e1 in chunks:
        assert ((ei[1, e0:e1] >= n0) & (ei[1, e0:e1] < n1)).all()
        assert e1 - e0 <= 50 or n1 - n0 == 1
    assert fc.edge_chunks(ei, n, None) == [(0, n, 0, e)]
    with pytest.raises(ValueError, match="sorted by target"):
        fc.edge_chunks(ei.flip(1), n, 50)


def test_config_levers_make_the_runner_and_reject_chunks_without_forces():
    cfg = load_config(None, ["data.name=x", "memory.checkpointing=forces", "memory.edge_chunk_size=100"])
    runner = ForceRunner(cfg.memory)
    assert runner.levers.checkpointing == "forces" and runner.levers.edge_chunk_size == 100
    cfg = load_config(None, ["data.name=x", "memory.checkpointing=none"])
    runner = ForceRunner(cfg.memory)
    assert runner.levers.checkpointing == "none" and runner.levers.edge_chunk_size is None
    with pytest.raises(ConfigError, match=r"--set.*edge_chunk_size \(100\) needs memory.checkpointing=forces"):
        load_config(None, ["data.name=x", "memory.checkpointing=blocks", "memory.edge_chunk_size=100"])
    with pytest.raises(ConfigError, match="edge_chunk_size.*single-process only"):
        load_config(None, ["data.name=x", "memory.checkpointing=forces", "memory.edge_chunk_size=100",
                           "parallel.graph_partitions=2"])
    with pytest.raises(ConfigError, match="keep_blocks \\(2\\) needs memory.checkpointing=forces"):
        load_config(None, ["data.name=x", "memory.keep_blocks=2"])
    with pytest.raises(ConfigError, match="keep_blocks \\(7\\) is more than model.num_blocks \\(6\\)"):
        load_config(None, ["data.name=x", "memory.checkpointing=forces", "memory.keep_blocks=7"])
    cfg = load_config(None, ["data.name=x", "memory.checkpointing=forces", "memory.keep_blocks=2"])
    assert ForceRunner(cfg.memory).levers.keep_blocks == 2
    cfg = load_config(None, ["data.name=x", "memory.checkpointing=forces", "memory.edge_chunk_size=100"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.memory.checkpointing = "blocks"  # set after loading: the levers are frozen ...
    with pytest.raises(ConfigError, match="edge_chunk_size"):
        cfg.memory.replace(checkpointing="blocks")  # ... and a changed copy is refused


# ---- mixed precision ---------------------------------------------------------------------------

#: 16-bit against fp32, relative norms of (forces, parameter gradients); measured ~(0.02, 0.03) for
#: bf16 and ~(0.002, 0.002) for fp16 (see nn/precision.py)
TOLERANCE_16 = {"bf16": (0.05, 0.10), "fp16": (0.01, 0.02)}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _precision_step(model, batch, precision, strategy="none"):
    model.zero_grad(set_to_none=True)
    with autocast(precision, "cpu"):
        out = ForceRunner(Levers(strategy))(model, batch, training=True)
    loss = (out["energy"] - batch.energy).abs().sum() \
        + 80 * torch.linalg.vector_norm(out["forces"].float() - batch.forces, dim=-1).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out["energy"].detach(), out["forces"].detach().float(), grads


@pytest.fixture(scope="module")
def lmax2_model():
    torch.manual_seed(0)
    cfg = load_config(None, ["data.name=x", "model.irreps_node=32x0e+16x1e+8x2e", "model.irreps_head=8x0e+4x1e+2x2e",
                             "model.irreps_feedforward=64x0e+32x1e+16x2e", "model.irreps_feature=64x0e",
                             "model.num_blocks=2", "model.num_heads=4", "model.avg_num_neighbors=25",
                             "model.avg_num_atoms=30"])
    model = build_model(cfg)
    model.train()
    return model


@pytest.mark.parametrize("precision,strategy", [("bf16", "none"), ("bf16", "forces"), ("fp16", "none")])
def test_16_bit_within_tolerance_of_fp32(lmax2_model, precision, strategy):
    batch = _batch(torch.float32, atoms=30)
    e32, f32, g32 = _precision_step(lmax2_model, batch, "fp32")
    e16, f16, g16 = _precision_step(lmax2_model, batch, precision, strategy)
    assert f16.dtype == torch.float32 and e16.dtype == torch.float64  # force accumulation fp32, energy sum fp64
    force_tol, grad_tol = TOLERANCE_16[precision]
    assert torch.isfinite(g16).all()
    assert _rel(f16, f32) < force_tol
    assert _rel(g16, g32) < grad_tol
    assert float((e16 - e32).abs().max()) < 0.05 * max(float(e32.abs().max()), 1.0)


def test_fp32_island_casts_up_and_is_a_no_op_without_autocast():
    @fp32_island
    def f(x):
        return x.dtype, torch.is_autocast_enabled("cpu")

    @fp32_island(only=torch.float16)
    def g(x):
        return x.dtype

    x = torch.ones(2, dtype=torch.float64)
    assert f(x) == (torch.float64, False)
    with autocast("bf16", "cpu"):
        assert f(x.to(torch.bfloat16)) == (torch.float32, False)
        assert torch.is_autocast_enabled("cpu")
        assert g(x.to(torch.bfloat16)) == torch.bfloat16
    with autocast("fp16", "cpu"):
        assert g(x.half()) == torch.float32
