"""The fused dim-major edge path (``nn/dim_major.py``) is the same function as the module path.

The module path (each DepthwiseTensorProduct on e3nn's generated code, then EquivariantLinear,
Gate, Vec2Heads, in e3nn's layout) is the oracle: in float64, energies, forces and the parameter
gradients of a loss on both agree to 1e-12 (relative to each tensor's largest entry), for both
attention types and both message types, with each memory lever run by ``ForceRunner``. The
original's own outputs (tests/test_original.py) are reproduced through the fused path, which is
the default.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from e3nn import o3

from helpers import force_loss_batch, tiny_sets
from helpers.equivariance import single_thread  # noqa: F401 (fixture)
from scalable_equiformer.config import load_config
from scalable_equiformer.memory import ForceRunner, Levers
from scalable_equiformer.model import build_model
from scalable_equiformer.nn import SeparableFCTP
from scalable_equiformer.nn.attention import GraphAttention
from scalable_equiformer.nn.dim_major import from_dim_major, to_dim_major
from scalable_equiformer.nn.tensor_product import DepthwiseTensorProduct

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-12
SH2 = "1x0e+1x1e+1x2e"


def _set_implementation(model, implementation: str) -> None:
    for m in model.modules():
        if isinstance(m, DepthwiseTensorProduct):
            m.implementation = implementation


def _model(attention: str, message: str):
    torch.manual_seed(0)
    extra = [f"model.attention={attention}", f"model.message={message}", "model.smooth_cutoff=true"]
    cfg = load_config(None, ["data.name=x", "model.dtype=float64",
                             *tiny_sets(radial_hidden="[8]", avg_num_neighbors=10, avg_num_atoms=16), *extra])
    model = build_model(cfg).train()
    with torch.no_grad():  # make every parameter non-trivial (biases, norms' affines start at 0 / 1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _batch():
    return force_loss_batch(12)


def _step(model, batch, levers: Levers):
    model.zero_grad(set_to_none=True)
    out = ForceRunner(levers)(model, batch, training=True)
    loss = (out["energy"] - batch.energy).abs().sum() + 80 * torch.linalg.vector_norm(
        out["forces"] - batch.forces, dim=-1
    ).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["energy"].detach(), out["forces"].detach(), grads


def _close(a, b, what):
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max()) / scale
    assert err < TOL, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("attention,message", list(itertools.product(["mlp", "dot"], ["nonlinear", "linear"])))
@pytest.mark.parametrize(
    "levers",
    [Levers("none"), Levers("blocks"), Levers("forces", edge_chunk_size=40, keep_blocks=1)],
    ids=["none", "blocks", "forces+chunks+keep"],
)
def test_fused_model_equals_module_path(attention, message, levers):
    model, batch = _model(attention, message), _batch()
    attn = [m for m in model.modules() if isinstance(m, GraphAttention)]
    assert attn and all(m.fused for m in attn), "the fast path must run fused for this model"
    fused = _step(model, batch, levers)
    _set_implementation(model, "e3nn")
    assert not any(m.fused for m in attn)
    plain = _step(model, batch, Levers("none"))
    _close(fused[0], plain[0], "energy")
    _close(fused[1], plain[1], "forces")
    assert set(fused[2]) == set(plain[2])
    for name, g in plain[2].items():
        _close(fused[2][name], g, f"grad {name}")


@pytest.mark.parametrize("internal,gate", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("irreps,sh", [("6x0e+4x1e+2x2e", SH2), ("5x0e+4x1e+3x2e+2x3e", "1x0e+1x1e+1x2e+1x3e")],
                         ids=["l2", "l3"])
def test_separable_fctp_fused_equals_modules(internal, gate, irreps, sh):
    """Module level, with second derivatives: values, input and weight gradients, double backward.
    Every kind of path of the plan is covered: concatenated into a type's matmul, scalar-input
    (outer) and smaller-input (inner, linear first; at l3 also 1e -> 3e and 2e -> 3e)."""
    torch.manual_seed(3)
    default = torch.get_default_dtype()
    # e3nn's constants made in float64 (a float32 module cast up keeps float32 digits)
    torch.set_default_dtype(torch.float64)
    try:
        sep = SeparableFCTP(irreps, sh, irreps, None if internal else [5, 7], use_activation=gate)
    finally:
        torch.set_default_dtype(default)
    assert sep.fused
    kinds = [(bool(t.paths), bool(t.outer), bool(t.inner)) for t in sep._plan.types]
    assert any(o for _, o, _ in kinds) and any(i for _, _, i in kinds) and all(p for p, _, _ in kinds)
    if sh != SH2:
        assert len([t for t in sep._plan.types if t.d == 7][0].inner) == 5  # 1e x (2e, 3e), 2e x (1e, 2e, 3e) -> 3e
    e = 9
    x = torch.randn(e, sep.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    vec = torch.randn(e, 3, dtype=torch.float64, requires_grad=True)
    radial = torch.randn(e, 5, dtype=torch.float64, requires_grad=True)

    def run(fused: bool):
        sep.dtp.implementation = "fast" if fused else "e3nn"
        harmonics = o3.spherical_harmonics(sh, vec, normalize=True, normalization="component")
        out = sep(x, harmonics, None if internal else radial)
        first = torch.autograd.grad((out ** 2).sum(), [x, vec], create_graph=True)
        loss = sum((g ** 2).sum() for g in first)
        params = [p for p in sep.parameters()]
        second = torch.autograd.grad(loss, [x, vec, *params], allow_unused=True)
        return [out, *first, *[s if s is not None else torch.zeros(()) for s in second]]

    for k, (a, b) in enumerate(zip(run(True), run(False))):
        _close(a, b, f"output {k}")


def test_dim_major_round_trip():
    irreps = o3.Irreps("3x0e+2x1e+1x2e")
    x = torch.randn(4, irreps.dim)
    parts = to_dim_major(x, irreps)
    assert [tuple(p.shape) for p in parts] == [(4, 1, 3), (4, 3, 2), (4, 5, 1)]
    assert parts[1][0, 2, 1] == x[0, 3 + 1 * 3 + 2]  # channel 1, component 2 of the 1e block
    assert torch.equal(from_dim_major(parts), x)


@pytest.mark.parametrize("attention,message", list(itertools.product(["mlp", "dot"], ["nonlinear", "linear"])))
@pytest.mark.parametrize("atoms", [0, 3])
def test_fused_blocks_with_no_edges(attention, message, atoms):
    """A graph part with no edges (and no atoms: a rank of the partitioned model may hold none)
    runs through the fused stages and gives the module path's features."""
    model = _model(attention, message)
    pos = torch.randn(atoms, 3, dtype=torch.float64, requires_grad=True)
    z = torch.ones(atoms, dtype=torch.long)
    edges = model.edge_features(pos, torch.zeros(2, 0, dtype=torch.long))

    def features():
        x = model.embed(z, edges, atoms)
        for block in model.blocks:
            x = block(x, model.node_attr(x), edges)
        return x

    fused = features()
    _set_implementation(model, "e3nn")
    plain = features()
    assert fused.shape == plain.shape == (atoms, model.irreps_feature.dim)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
