"""The cuEquivariance depth-wise tensor product (``model.tensor_product=cueq``) computes what
``fast`` computes, in float64 on the CPU (the library's ``naive`` method; on CUDA its kernels run
the same descriptor).

* module: values, input / harmonics / weight gradients and a second derivative, per-edge and
  internal weights, no edges, bf16 autocast;
* the model: energies, forces and parameter gradients of a force loss, cueq against fast, for both
  attention types and both message types, under each memory lever (``memory.checkpointing`` none,
  blocks, forces), and partitioned over 2 gloo processes;
* the original Equiformer's reference outputs (``tests/test_original.py``'s fixtures) through cueq;
* checkpoints: a state_dict saved under fast loads and evaluates equal under cueq, and back;
* the descriptors are uniform where the ``uniform_1d`` CUDA kernel needs it: every one of the
  paper model's 13 products is (channels cut into 32-channel segments), checked by this module's
  own rules and by the library's ``uniform_1d`` constructor itself (its CUDA calls stubbed), so a
  GPU run does not silently fall back to ``naive``.

The tests that need the library skip only when ``cuequivariance_torch`` does not import (CI
installs ``.[cueq]``); the config tests run either way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from e3nn import o3

from helpers import assert_bf16_close, bf16_tp_outputs, force_loss_batch, tiny_sets
from helpers.equivariance import single_thread  # noqa: F401 (fixture)
from scalable_equiformer.config import ModelConfig, load_config
from scalable_equiformer.errors import ConfigError
from scalable_equiformer.memory import ForceRunner, Levers
from scalable_equiformer.model import build_model
from scalable_equiformer.nn import tensor_product_cueq as tpc
from scalable_equiformer.nn.tensor_product import DepthwiseTensorProduct, set_tensor_product
from scalable_equiformer.presets import paper_model_dict
from scalable_equiformer.profiling import systems

needs_cueq = pytest.mark.skipif(
    not tpc.available(), reason="cuequivariance_torch is not installed (pip install '.[cueq]')"
)
pytestmark = pytest.mark.usefixtures("single_thread")

SH2 = o3.Irreps.spherical_harmonics(2, p=1)
SH3_ODD = o3.Irreps.spherical_harmonics(3)
CASES = {
    "lmax2": ("8x0e+4x1e+2x2e", SH2, "8x0e+4x1e+2x2e"),
    "paper": ("128x0e+64x1e+32x2e", SH2, "128x0e+64x1e+32x2e"),  # the paper model's node irreps
    "lmax3_odd": ("3x0e+2x1o+2x2e+1x3o+1x0o", SH3_ODD, "1x0e+1x1o+1x2e+1x3o+1x0o+1x1e"),
}
TINY = tiny_sets(radial_hidden="[8]", avg_num_neighbors=10, avg_num_atoms=16)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).detach()) if b.numel() else 0.0


def _inputs(dtp, num_edges, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_edges, dtp.irreps_in.dim, generator=g).requires_grad_()
    vec = torch.randn(num_edges, 3, generator=g)
    sh = o3.spherical_harmonics(dtp.irreps_edge, vec, normalize=True, normalization="component")
    sh = (sh * (1 + torch.rand(num_edges, 1, generator=g))).requires_grad_()
    w = None if dtp.internal_weights else torch.randn(num_edges, dtp.weight_numel, generator=g).requires_grad_()
    return x, sh, w


def _derivatives(dtp, x, sh, w):
    """Output, first derivatives (create_graph) w.r.t. x, sh and the weights, and the gradient of a
    function of those (a second derivative, as forces in a training loss)."""
    wrt = [x, sh, w if w is not None else dtp.tp.weight]
    y = dtp(x, sh, w)
    g1 = torch.autograd.grad((y.sin() * y).sum(), wrt, create_graph=True)
    g2 = torch.autograd.grad(sum((g * g.cos()).sum() for g in g1), wrt)
    return [y, *g1, *g2]


# --- the module ----------------------------------------------------------------------------------


@needs_cueq
@pytest.mark.parametrize("internal", [False, True], ids=["edge_weights", "internal_weights"])
@pytest.mark.parametrize("case", list(CASES))
def test_cueq_equals_fast_with_derivatives(float64, case, internal):
    torch.manual_seed(1)
    dtp = DepthwiseTensorProduct(*CASES[case], internal_weights=internal, implementation="fast")
    x, sh, w = _inputs(dtp, 11)
    want = _derivatives(dtp, x, sh, w)
    dtp.implementation = "cueq"
    assert dtp.implementation == "cueq"
    got = _derivatives(dtp, x, sh, w)
    names = ["out", "dx", "dsh", "dw", "d2x", "d2sh", "d2w"]
    for name, a, b in zip(names, got, want):
        assert _rel(a, b) < 1e-12, f"{case}: {name} off by {_rel(a, b):.2e}"


@needs_cueq
def test_cueq_no_edges_and_state_dict(float64):
    dtp = DepthwiseTensorProduct(*CASES["lmax2"], implementation="cueq")
    keys = {k: v.shape for k, v in dtp.state_dict().items()}
    fast = DepthwiseTensorProduct(*CASES["lmax2"], implementation="fast")
    assert keys == {k: v.shape for k, v in fast.state_dict().items()}
    y = dtp(torch.randn(0, dtp.irreps_in.dim), torch.randn(0, 9), torch.randn(0, dtp.weight_numel))
    assert y.shape == (0, dtp.irreps_out.dim)
    assert "implementation='cueq'" in repr(dtp)


@needs_cueq
def test_cueq_under_bf16_autocast():
    """Mixed precision (memory.precision=bf16): bf16 accuracy against fast, twice differentiable."""
    torch.manual_seed(4)
    dtp = DepthwiseTensorProduct("16x0e+8x1e+4x2e", SH2, "16x0e+8x1e+4x2e")
    x, sh, w = _inputs(dtp, 30)
    assert_bf16_close(bf16_tp_outputs(dtp, ("cueq", "fast"), x, sh, w))


# --- uniform descriptors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_model():
    if not tpc.available():
        pytest.skip("cuequivariance_torch is not installed")
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**paper_model_dict(), "tensor_product": "cueq"}))


@needs_cueq
def test_paper_model_descriptors_are_uniform(paper_model, monkeypatch):
    """All 13 products of the paper model qualify for ``uniform_1d``: one 32-channel extent per
    operand. Checked by :func:`uniform_1d_problems` and by the library's own constructor."""
    from cuequivariance_torch.primitives import segmented_polynomial_uniform_1d as u1d

    # the constructor's checks run on the CPU once its CUDA entry points exist (never called here)
    monkeypatch.setattr(u1d, "uniform_1d", object(), raising=False)
    for k, name in enumerate(("BATCH_DIM_AUTO", "BATCH_DIM_SHARED", "BATCH_DIM_BATCHED", "BATCH_DIM_INDEXED")):
        monkeypatch.setattr(u1d, name, -1 - k, raising=False)
    dtps = {n: m for n, m in paper_model.named_modules() if isinstance(m, DepthwiseTensorProduct)}
    assert len(dtps) == 13
    for name, dtp in dtps.items():
        assert dtp.implementation == "cueq", name
        cq = dtp._cueq
        assert (cq.chunk, cq.problems) == (32, []), name
        m = u1d.SegmentedPolynomialFromUniform1dJit(cq.polynomial)
        assert m.operand_extent == 32, name
    # a descriptor with two extents in one operand is refused, by both
    import cuequivariance as cue

    d = cue.SegmentedTensorProduct.from_subscripts("u,u,u")
    d.add_path(d.add_segment(0, (4,)), d.add_segment(1, (4,)), d.add_segment(2, (4,)), c=1.0)
    d.add_path(d.add_segment(0, (8,)), d.add_segment(1, (8,)), d.add_segment(2, (8,)), c=1.0)
    bad = cue.SegmentedPolynomial.eval_last_operand(d)
    assert tpc.uniform_1d_problems(bad)
    with pytest.raises(AssertionError):
        u1d.SegmentedPolynomialFromUniform1dJit(bad)


@needs_cueq
def test_cpu_runs_the_naive_method(float64):
    dtp = DepthwiseTensorProduct(*CASES["lmax2"], implementation="cueq")
    assert dtp._cueq.method(torch.device("cpu")) == "naive"
    x, sh, w = _inputs(dtp, 3)
    dtp(x, sh, w)
    assert dtp._cueq.module(torch.device("cpu")).method == "naive"


# --- config --------------------------------------------------------------------------------------


def test_config_key_validated():
    assert load_config(None, ["data.name=x"]).model.tensor_product == "fast"
    assert load_config(None, ["data.name=x", "model.tensor_product=e3nn"]).model.tensor_product == "e3nn"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.name=x", "model.tensor_product=cuda"])
    assert "model.tensor_product" in str(err.value) and "\n" not in str(err.value)


def test_cueq_without_the_library_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(tpc, "cuet", None)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.name=x", "model.tensor_product=cueq"])
    msg = str(err.value)
    assert "model.tensor_product" in msg and "pip install '.[cueq]'" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"pip install '\.\[cueq\]'"):
        build_model(ModelConfig(**{**paper_model_dict(), "tensor_product": "cueq"}))


def test_compile_refuses_cueq():
    with pytest.raises(ConfigError, match=r"train.compile=true needs model.tensor_product=fast or e3nn, not 'cueq'"):
        load_config(None, ["data.name=x", "train.compile=true", "model.tensor_product=cueq"])


def test_implementation_reaches_every_product_and_checkpoints_ignore_it():
    from scalable_equiformer.training.checkpoint import check_same_model

    cfg = load_config(None, ["data.name=x", *TINY, "model.tensor_product=e3nn"])
    model = build_model(cfg)
    impls = [m.implementation for m in model.modules() if isinstance(m, DepthwiseTensorProduct)]
    assert impls and set(impls) == {"e3nn"}
    a = cfg.to_dict()
    b = copy.deepcopy(a)
    b["model"]["tensor_product"] = "fast"
    check_same_model(a, b, "x.pt")  # resume / init_from may switch implementations


# --- the model -----------------------------------------------------------------------------------


def _model(attention, message, tp="fast", seed=0):
    torch.manual_seed(seed)
    cfg = load_config(None, ["data.name=x", "model.dtype=float64", *TINY, f"model.attention={attention}",
                             f"model.message={message}", f"model.tensor_product={tp}"])
    model = build_model(cfg)
    model.train()
    return model


def _batch(dtype=torch.float64, atoms=12):
    return force_loss_batch(atoms, dtype)


def _step(model, batch, checkpointing="none"):
    """Energies, forces and parameter gradients of a loss with energies and forces."""
    model.zero_grad(set_to_none=True)
    out = ForceRunner(Levers(checkpointing))(model, batch, training=True)
    loss = (out["energy"] - batch.energy).abs().sum() + 80 * torch.linalg.vector_norm(
        out["forces"] - batch.forces, dim=-1
    ).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["energy"].detach(), out["forces"].detach(), grads


def _assert_same(a, b, what, tol=1e-10):
    (e1, f1, g1), (e2, f2, g2) = a, b
    assert _rel(e1, e2) <= tol, f"{what}: energies {_rel(e1, e2):.2e}"
    assert _rel(f1, f2) <= tol, f"{what}: forces {_rel(f1, f2):.2e}"
    assert set(g1) == set(g2), f"{what}: parameters with gradients differ: {set(g1) ^ set(g2)}"
    scale = max(float(g.abs().max()) for g in g2.values())
    for name in g2:
        err = float((g1[name] - g2[name]).abs().max())
        assert err <= tol * max(float(g2[name].abs().max()), 1e-3 * scale), (
            f"{what}: gradient of {name} off by {err:.2e}"
        )


@pytest.fixture(scope="module")
def fast_refs():
    return {}


@needs_cueq
@pytest.mark.parametrize("checkpointing", ["none", "blocks", "forces"])
@pytest.mark.parametrize("message", ["nonlinear", "linear"])
@pytest.mark.parametrize("attention", ["mlp", "dot"])
def test_model_cueq_equals_fast(fast_refs, attention, message, checkpointing):
    """Energies, forces and force-loss gradients: cueq (under each lever) equals plain fast."""
    batch = _batch()
    key = (attention, message)
    if key not in fast_refs:
        fast_refs[key] = _step(_model(attention, message, "fast"), batch)
    model = _model(attention, message, "cueq")
    assert {m.implementation for m in model.modules() if isinstance(m, DepthwiseTensorProduct)} == {"cueq"}
    _assert_same(_step(model, batch, checkpointing), fast_refs[key], f"{attention}/{message}/{checkpointing}")


@needs_cueq
def test_checkpoints_interchange(tmp_path):
    """A state_dict saved under fast loads (strict) and evaluates equal under cueq, and back."""
    batch = _batch()
    for src, dst in (("fast", "cueq"), ("cueq", "fast")):
        a = _model("mlp", "nonlinear", src, seed=0)
        path = tmp_path / f"{src}.pt"
        torch.save(a.state_dict(), path)
        b = _model("mlp", "nonlinear", dst, seed=7)  # other weights until loaded
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        b.load_state_dict(torch.load(path, weights_only=True), strict=True)
        a.eval(), b.eval()
        _assert_same(_step(b, batch), _step(a, batch), f"{src} -> {dst}")


@needs_cueq
@pytest.mark.slow
def test_partitioned_cueq_equals_single_process_fast():
    """P=2 gloo processes, each with cueq products: the single-process fast step's numbers."""
    from partition_harness import (TOLERANCE, build_checked_model, evaluate, make_system, reference_step,
                                    run_partitioned, tiny_model_config)

    z, pos = systems.synthetic_molecule(16)
    system = make_system("mol16", [(torch.as_tensor(pos, dtype=torch.float64), torch.as_tensor(z, dtype=torch.long))])
    fast = build_checked_model(tiny_model_config(dtype="float64"), seed=0)
    cueq = build_checked_model(tiny_model_config(dtype="float64", tensor_product="cueq"), seed=0)
    ref = reference_step(fast, system)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ranks = run_partitioned([(cueq, [system])], 2)
    finally:
        torch.set_num_threads(threads)
    e = evaluate(ref, ranks, "mol16", TOLERANCE[torch.float64])
    assert e["edges_once"] and e["ok"], e


# --- the original's reference outputs ------------------------------------------------------------

from test_original import _energy_forces, _rel as _rel_np, raw_model, ref  # noqa: E402,F401 (fixtures)


@needs_cueq
def test_original_reference_energy_and_forces_through_cueq(ref, raw_model):
    """The original Equiformer's energy and forces on its aspirin geometry (to 1e-10) with every
    depth-wise product computed by cuEquivariance."""
    r, _ = ref
    model = copy.deepcopy(raw_model)
    set_tensor_product(model, "cueq")
    e, f = _energy_forces(model, r["z"], r["pos"])
    assert abs(float(e[0]) - float(r["energy"][0])) <= 1e-10 * abs(float(r["energy"][0]))
    assert _rel_np(f, r["forces"]) <= 1e-10


@needs_cueq
def test_original_training_step_through_cueq(ref):
    """The original's training step on two aspirin frames (predictions, loss and its terms, gradient
    norm, every gradient to 1e-9) with ``model.tensor_product=cueq``."""
    from test_original import check_original_training_step

    def every_product_is_cueq(model):
        assert {m.implementation for m in model.modules() if isinstance(m, DepthwiseTensorProduct)} == {"cueq"}

    check_original_training_step(ref, ["model.tensor_product=cueq"], check_model=every_product_is_cueq)
