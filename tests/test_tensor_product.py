"""The hand-written depth-wise tensor product equals e3nn's ``o3.TensorProduct`` (same instructions):
forward, first derivatives w.r.t. inputs, harmonics and weights, and a second derivative, in float64;
same state_dict and parameters; bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from helpers import assert_bf16_close, bf16_tp_outputs
from scalable_equiformer.nn import DepthwiseTensorProduct, SeparableFCTP
from scalable_equiformer.nn import tensor_product as tp_module

SH2 = o3.Irreps.spherical_harmonics(2, p=1)  # 1x0e+1x1e+1x2e, as the model
SH3 = o3.Irreps.spherical_harmonics(3, p=1)
SH3_ODD = o3.Irreps.spherical_harmonics(3)  # 1x0e+1x1o+1x2e+1x3o
CASES = {
    "lmax2": ("8x0e+4x1e+2x2e", SH2, "8x0e+4x1e+2x2e"),  # the model's types (mul 128/64/32 there)
    "lmax3": ("4x0e+3x1e+2x2e+2x3e", SH3, "4x0e+3x1e+2x2e+2x3e"),
    "lmax3_odd": ("3x0e+2x1o+2x2e+1x3o+1x0o", SH3_ODD, "1x0e+1x1o+1x2e+1x3o+1x0o+1x1e"),
}
RTOL = 1e-12


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _reference(dtp: DepthwiseTensorProduct) -> o3.TensorProduct:
    """A fresh e3nn TensorProduct built from the same instructions (not the module's own ``tp``)."""
    ins = [(i.i_in1, i.i_in2, i.i_out, i.connection_mode, i.has_weight) for i in dtp.tp.instructions]
    ref = o3.TensorProduct(
        dtp.irreps_in, dtp.irreps_edge, dtp.irreps_out, ins,
        irrep_normalization="component", path_normalization="none",
        internal_weights=dtp.internal_weights, shared_weights=dtp.internal_weights,
    )
    if dtp.internal_weights:
        with torch.no_grad():
            ref.weight.copy_(dtp.tp.weight)
    return ref


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = b.abs().max().clamp_min(1.0)
    err = float(((a - b).abs().max() / scale).detach())
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert err < RTOL, f"{what}: max |diff| / max |ref| = {err:.2e}"


def _inputs(dtp, num_edges, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_edges, dtp.irreps_in.dim, generator=g).requires_grad_()
    vec = torch.randn(num_edges, 3, generator=g)
    sh = o3.spherical_harmonics(dtp.irreps_edge, vec, normalize=True, normalization="component")
    sh = (sh * (1 + torch.rand(num_edges, 1, generator=g))).requires_grad_()  # not unit length: every input direction
    w = None if dtp.internal_weights else torch.randn(num_edges, dtp.weight_numel, generator=g).requires_grad_()
    return x, sh, w


def _derivatives(fn, x, sh, w, wrt_weight):
    """Output, first derivatives of a nonlinear scalar with create_graph, and the gradient of a
    function of those first derivatives (a second derivative, as forces in a training loss)."""
    inputs = [x, sh, wrt_weight]
    y = fn(x, sh, w)
    g1 = torch.autograd.grad((y.sin() * y).sum(), inputs, create_graph=True)
    g2 = torch.autograd.grad(sum((g * g.cos()).sum() for g in g1), inputs)
    return [y, *g1, *g2]


@pytest.mark.parametrize("internal", [False, True], ids=["edge_weights", "internal_weights"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_equals_e3nn_with_derivatives(case, internal):
    irreps_in, irreps_sh, irreps_filter = CASES[case]
    torch.manual_seed(0)
    dtp = DepthwiseTensorProduct(irreps_in, irreps_sh, irreps_filter, internal_weights=internal, implementation="fast")
    assert dtp.implementation == "fast"
    ref = _reference(dtp)
    x, sh, w = _inputs(dtp, 13)
    wrt_fast = dtp.tp.weight if internal else w
    wrt_ref = ref.weight if internal else w
    got = _derivatives(dtp, x, sh, w, wrt_fast)
    want = _derivatives(ref, x, sh, w, wrt_ref)
    names = ["forward", "d/dx", "d/dsh", "d/dw", "d2/dx", "d2/dsh", "d2/dw"]
    for a, b, name in zip(got, want, names):
        _close(a, b, f"{case} {name}")
    # the module's own e3nn path is the same function too
    dtp.implementation = "e3nn"
    _close(dtp(x, sh, w), want[0], f"{case} e3nn implementation")


@pytest.mark.parametrize("internal", [False, True], ids=["edge_weights", "internal_weights"])
def test_fast_equals_e3nn_model_size(internal):
    """The model's own sizes (128x0e+64x1e+32x2e x 1x0e+1x1e+1x2e), forward and one backward."""
    torch.manual_seed(1)
    irreps = "128x0e+64x1e+32x2e"
    dtp = DepthwiseTensorProduct(irreps, SH2, irreps, internal_weights=internal)
    dtp.implementation = "fast"
    ref = _reference(dtp)
    x, sh, w = _inputs(dtp, 40, seed=1)
    y, y_ref = dtp(x, sh, w), ref(x, sh, w)
    _close(y, y_ref, "model size forward")
    gy = torch.randn_like(y)
    wrt = [x, sh] + ([dtp.tp.weight] if internal else [w])
    wrt_ref = [x, sh] + ([ref.weight] if internal else [w])
    for a, b, name in zip(torch.autograd.grad(y, wrt, gy), torch.autograd.grad(y_ref, wrt_ref, gy), ["x", "sh", "w"]):
        _close(a, b, f"model size d/d{name}")


def test_state_dict_and_parameters_unchanged():
    """Both implementations hold e3nn's module: same keys, same parameters; checkpoints written by
    either load into the other (strict) and give the same outputs."""
    for internal in (False, True):
        torch.manual_seed(2)
        fast = DepthwiseTensorProduct("8x0e+4x1e+2x2e", SH2, "8x0e+4x1e+2x2e", internal_weights=internal,
                                      implementation="fast")
        torch.manual_seed(3)
        old = DepthwiseTensorProduct("8x0e+4x1e+2x2e", SH2, "8x0e+4x1e+2x2e", internal_weights=internal,
                                     implementation="e3nn")
        assert list(fast.state_dict()) == list(old.state_dict())
        assert [(n, p.shape) for n, p in fast.named_parameters()] == [(n, p.shape) for n, p in old.named_parameters()]
        assert ("tp.weight" in dict(fast.named_parameters())) == internal
        fast.load_state_dict(old.state_dict(), strict=True)
        x, sh, w = _inputs(fast, 5)
        _close(fast(x, sh, w), old(x, sh, w), "after loading an e3nn-era state_dict")
    sep = SeparableFCTP("8x0e+4x1e+2x2e", SH2, "4x0e+2x1e+1x2e", None)
    assert "dtp.tp.weight" in sep.state_dict()


def test_fast_under_bf16_autocast():
    """Mixed precision: same result as e3nn's to bf16 accuracy, and twice differentiable."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(4)
    for internal in (False, True):
        dtp = DepthwiseTensorProduct("16x0e+8x1e+4x2e", SH2, "16x0e+8x1e+4x2e", internal_weights=internal)
        x, sh, w = _inputs(dtp, 30)
        assert_bf16_close(bf16_tp_outputs(dtp, ("fast", "e3nn"), x, sh, w))


def test_implementation_switch_and_fallback():
    dtp = DepthwiseTensorProduct("4x0e+2x1e", SH2, "4x0e+2x1e")
    assert dtp.implementation == tp_module.DEPTHWISE_TP_IMPLEMENTATION
    with pytest.raises(ValueError):
        dtp.implementation = "cuda"
    # edge irreps with multiplicity > 1 are outside the hand-written version: e3nn's is used
    odd = DepthwiseTensorProduct("4x0e+2x1e", "2x0e+1x1e", "4x0e+2x1e", implementation="fast")
    assert odd.implementation == "e3nn"
    x = torch.randn(3, odd.irreps_in.dim)
    assert odd(x, torch.randn(3, 5), torch.randn(3, odd.weight_numel)).shape == (3, odd.irreps_out.dim)
    # no edges
    dtp.implementation = "fast"
    y = dtp(torch.randn(0, dtp.irreps_in.dim), torch.randn(0, 9), torch.randn(0, dtp.weight_numel))
    assert y.shape == (0, dtp.irreps_out.dim)
