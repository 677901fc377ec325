"""Every building block through the one equivariance helper, plus the properties the stage API
promises (target-only aggregation, additive readout) and fidelity to the original's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3

from helpers.equivariance import assert_close, assert_equivariant, float_dtype, make_molecule, single_thread  # noqa: F401 (fixtures)

from scalable_equiformer.nn.graph import radius_graph
from scalable_equiformer.nn import (
    DepthwiseTensorProduct,
    EdgeFeatures,
    EquivariantLayerNorm,
    EquivariantLinear,
    FeedForwardNetwork,
    Gate,
    GraphAttention,
    RadialEmbedding,
    SeparableFCTP,
    TransformerBlock,
    scatter_softmax,
)
from scalable_equiformer.nn.equiformer import EdgeDegreeEmbedding, EnergyHead
from scalable_equiformer.nn.radial import BesselBasis, CosineCutoff, ExpNormalBasis, PolynomialEnvelope, RadialProfile

IRREPS = o3.Irreps("8x0e+4x1e+2x2e")
IRREPS_SH = o3.Irreps.spherical_harmonics(2, p=1)
CUTOFF = 4.0
RADIAL = [8, 16]

pytestmark = pytest.mark.usefixtures("single_thread")


def _edges(pos: torch.Tensor, edge_index: torch.Tensor | None = None) -> EdgeFeatures:
    if edge_index is None:
        edge_index = radius_graph(pos, CUTOFF)
    vec = pos[edge_index[0]] - pos[edge_index[1]]
    length = vec.norm(dim=-1)
    radial, env = RadialEmbedding(RADIAL[0], CUTOFF).to(pos.dtype)(length)
    sh = o3.spherical_harmonics(IRREPS_SH, vec, normalize=True, normalization="component")
    return EdgeFeatures(edge_index, vec, length, sh, radial, env)


def _nodes(n: int = 7, dtype=None):
    torch.manual_seed(0)
    mol = make_molecule(n, seed=4, dtype=dtype or torch.get_default_dtype())
    return IRREPS.randn(n, -1), mol.pos


def test_linear_equivariant(float_dtype):
    lin = EquivariantLinear("4x0e+3x1e+2x0e+1x2e", "5x0e+2x1e+3x2e")
    x = o3.Irreps("4x0e+3x1e+2x0e+1x2e").randn(5, -1)
    assert_equivariant(lin, [x], [lin.irreps_in], lin.irreps_out, float_dtype)
    attr = torch.rand(5, 1)
    assert_equivariant(lambda x: lin(x, attr), [x], [lin.irreps_in], lin.irreps_out, float_dtype)


def test_linear_equals_original_rescaled_fctp():
    """``EquivariantLinear`` == the original's LinearRS: an 'uvw' FCTP with a 1x0e of ones, no path
    normalisation, component irrep normalisation, plus the 0e bias."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        irreps_in, irreps_out = o3.Irreps("6x0e+3x1e+2x2e+4x1e"), o3.Irreps("5x0e+2x1e+3x2e")
        lin = EquivariantLinear(irreps_in, irreps_out)
        with torch.no_grad():
            lin.bias.normal_()
        ins = [(i, 0, k, "uvw", True) for i, (_, a) in enumerate(irreps_in) for k, (_, b) in enumerate(irreps_out)
               if a == b]
        tp = o3.TensorProduct(irreps_in, "1x0e", irreps_out, ins, irrep_normalization="component",
                              path_normalization="none")
        with torch.no_grad():
            views = list(tp.weight_views(yield_instruction=True))
            for k, (inputs, offset, fan_in, mul_out, _, _) in enumerate(lin._plan):
                w = lin.weight[offset : offset + fan_in * mul_out].view(fan_in, mul_out)
                for _, ins_, view in views:
                    if ins_.i_out != k:
                        continue
                    row = sum(irreps_in[i].mul for i in inputs[: inputs.index(ins_.i_in1)])
                    view[:, 0, :] = w[row : row + irreps_in[ins_.i_in1].mul]
        x = irreps_in.randn(4, -1)
        ref = tp(x, torch.ones(4, 1))
        ref[:, :5] += lin.bias
        assert_close(lin(x), ref, torch.float64, "LinearRS equivalence")
    finally:
        torch.set_default_dtype(old)


def test_gate_and_norm_equivariant(float_dtype):
    gate = Gate("6x0e+3x1e+2x2e")
    assert gate.irreps_in == o3.Irreps("11x0e+3x1e+2x2e") and gate.irreps_out == o3.Irreps("6x0e+3x1e+2x2e")
    x = gate.irreps_in.randn(5, -1)
    assert_equivariant(gate, [x], [gate.irreps_in], gate.irreps_out, float_dtype)
    norm = EquivariantLayerNorm(IRREPS)
    x = IRREPS.randn(5, -1)
    assert_equivariant(norm, [x], [IRREPS], IRREPS, float_dtype)
    y = norm(x)
    assert_close(y[:, :8].mean(1), torch.zeros(5), float_dtype, "centred scalars")
    assert_close(y[:, :8].pow(2).mean(1), torch.ones(5), float_dtype, "unit scalars", tol=1e-4)


def test_depthwise_and_separable_tp_equivariant(float_dtype):
    dtp = DepthwiseTensorProduct(IRREPS, IRREPS_SH, IRREPS)
    assert dtp.weight_numel == 8 * 3 + 4 * 6 + 2 * 6  # paths per input type (l<=2 outputs)
    x, pos = _nodes()
    ei = radius_graph(pos, CUTOFF)
    w = torch.randn(ei.shape[1], dtp.weight_numel)

    def fn_dtp(x, pos):
        e = _edges(pos, ei)
        return dtp(x[ei[0]], e.sh, w)

    assert_equivariant(fn_dtp, [x, pos], [IRREPS, "pos"], dtp.irreps_out, float_dtype)
    sep = SeparableFCTP(IRREPS, IRREPS_SH, IRREPS, RADIAL, use_activation=True)

    def fn_sep(x, pos):
        e = _edges(pos, ei)
        return sep(x[ei[0]], e.sh, e.radial)

    assert_equivariant(fn_sep, [x, pos], [IRREPS, "pos"], sep.irreps_out, float_dtype)


@pytest.mark.parametrize("attention", ["mlp", "dot"])
@pytest.mark.parametrize("message", ["nonlinear", "linear"])
def test_attention_equivariant_and_target_local(attention, message, float_dtype):
    torch.manual_seed(1)
    ga = GraphAttention(IRREPS, "1x0e", IRREPS_SH, IRREPS, RADIAL, "4x0e+2x1e+1x2e", 2, attention=attention,
                        message=message)
    x, pos = _nodes()
    ei = radius_graph(pos, CUTOFF)

    def fn(x, pos):
        return ga(x, x.new_ones(x.shape[0], 1), _edges(pos, ei))

    assert_equivariant(fn, [x, pos], [IRREPS, "pos"], IRREPS, float_dtype)
    # A process holding only the edges into atoms S gets exact outputs for S.
    owned = torch.tensor([0, 2, 3])
    keep = torch.isin(ei[1], owned)
    full = fn(x, pos)
    part = ga(x, x.new_ones(x.shape[0], 1), _edges(pos, ei[:, keep]))
    assert_close(part[owned], full[owned], float_dtype, "outputs from the target-owned edges only")


def test_block_ffn_and_degree_embedding_equivariant(float_dtype):
    torch.manual_seed(2)
    x, pos = _nodes()
    ei = radius_graph(pos, CUTOFF)
    ones = x.new_ones(x.shape[0], 1)
    ffn = FeedForwardNetwork(IRREPS, "1x0e", IRREPS, "16x0e+8x1e+4x2e")
    assert_equivariant(lambda x: ffn(x, ones), [x], [IRREPS], IRREPS, float_dtype)
    for out in (IRREPS, o3.Irreps("16x0e")):  # a middle block, and the last block (-> irreps_feature)
        blk = TransformerBlock(IRREPS, "1x0e", IRREPS_SH, out, RADIAL, "4x0e+2x1e+1x2e", 2,
                               irreps_mlp_mid="16x0e+8x1e+4x2e")
        assert (blk.ffn_shortcut is None) == (out == IRREPS)
        assert_equivariant(lambda x, pos: blk(x, ones, _edges(pos, ei)), [x, pos], [IRREPS, "pos"], out, float_dtype)
    deg = EdgeDegreeEmbedding(IRREPS, IRREPS_SH, RADIAL)
    avg = torch.tensor(3.0, dtype=torch.float64)
    assert_equivariant(lambda pos: deg(_edges(pos, ei), pos.shape[0], avg), [pos], ["pos"], IRREPS, float_dtype)


def test_readout_of_a_subset_is_its_share():
    head = EnergyHead("16x0e").double()
    x = torch.randn(9, 16, dtype=torch.float64)
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    total = torch.zeros(3, dtype=torch.float64).index_add(0, batch, head(x))
    s = torch.tensor([True, False, True, True, False, False, True, False, True])
    part = torch.zeros(3, dtype=torch.float64).index_add(0, batch[s], head(x[s]))
    rest = torch.zeros(3, dtype=torch.float64).index_add(0, batch[~s], head(x[~s]))
    assert_close(part + rest, total, torch.float64, "partial energies add up")


def test_scatter_softmax():
    logits = torch.randn(7, 3, dtype=torch.float64) * 10
    index = torch.tensor([0, 0, 1, 1, 1, 3, 3])
    a = scatter_softmax(logits, index, 4)
    sums = torch.zeros(4, 3, dtype=torch.float64).index_add(0, index, a)[[0, 1, 3]]
    assert_close(sums, torch.ones(3, 3, dtype=torch.float64), torch.float64, "sums")
    w = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.0], dtype=torch.float64)
    aw = scatter_softmax(logits, index, 4, weight=w)
    assert float(aw[1].abs().max()) == 0.0 and float(aw[5:].abs().max()) == 0.0  # zero weight: no attention, no NaN
    assert_close(aw[0], torch.ones(3, dtype=torch.float64), torch.float64, "only edge left")


def test_radial_bases_match_the_original_formulas():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _check_radial_formulas()
    finally:
        torch.set_default_dtype(old)


def _check_radial_formulas():
    r = torch.linspace(0.3, 5.5, 40, dtype=torch.float64)
    c, k = 5.0, 32
    # TorchMD-Net ExpNormalSmearing (cosine cutoff included), as the original MD17 models
    start = math.exp(-c)
    means = torch.linspace(start, 1, k, dtype=torch.float64)
    betas = torch.full((k,), (2 / k * (1 - start)) ** -2, dtype=torch.float64)
    cos = 0.5 * (torch.cos(r * math.pi / c) + 1) * (r < c)
    ref = cos[:, None] * torch.exp(-betas * (torch.exp(-5.0 / c * r[:, None]) - means) ** 2)
    emb = RadialEmbedding(k, c, "exp_normal")
    radial, env = emb(r)
    assert_close(radial, ref, torch.float64, "exp-normal basis")
    assert_close(env, cos, torch.float64, "cosine cutoff")
    assert float(env[r >= c].abs().max()) == 0.0
    poly = PolynomialEnvelope(c, 5)(r)
    assert float(poly[r >= c].abs().max()) == 0.0 and abs(float(PolynomialEnvelope(c, 5)(torch.tensor(0.0)))) == 1.0
    assert isinstance(RadialEmbedding(k, c, "bessel").basis, BesselBasis)
    assert isinstance(RadialEmbedding(k, c, "gaussian").envelope, CosineCutoff)
    assert isinstance(emb.basis, ExpNormalBasis)


def test_radial_profile_columns_are_those_of_the_full_output():
    """``rad(x, columns)`` (the fused path's per-edge weights in its order) is ``rad(x)[:, columns]``,
    with the gradients of every parameter."""
    torch.manual_seed(0)
    rad = RadialProfile([8, 16, 16, 40]).double()
    x = torch.randn(11, 8, dtype=torch.float64)
    columns = torch.tensor([5, 0, 39, 7, 8, 2])
    full, picked = rad(x)[:, columns], rad(x, columns)
    assert picked.shape == (11, 6)
    torch.testing.assert_close(picked, full, rtol=1e-14, atol=1e-14)
    g = torch.randn_like(full)
    grads_full = torch.autograd.grad((full * g).sum(), list(rad.parameters()))
    grads_picked = torch.autograd.grad((rad(x, columns) * g).sum(), list(rad.parameters()))
    for a, b in zip(grads_full, grads_picked):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13)
