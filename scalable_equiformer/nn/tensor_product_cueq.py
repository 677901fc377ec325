"""The ``"cueq"`` implementation of :class:`~.tensor_product.DepthwiseTensorProduct`: NVIDIA's
cuEquivariance (``pip install '.[cueq]'``; the CUDA kernels are in ``cuequivariance-ops-torch-cu12``).

The descriptor is built here, from the module's own e3nn instructions, not by
``cuet.ChannelWiseTensorProduct``: that one fixes its own path normalisation ("element") and output
order, where this module's is e3nn's ``irrep_normalization="component"``,
``path_normalization="none"`` with outputs sorted even-first. So every path carries exactly the
constant the ``"fast"`` version uses (``ins.path_weight * wigner_3j``, e3nn's convention, as
``cue.O3_e3nn``), and the three implementations compute the same function with the same weights.

Layout. The polynomial is ``weight[u] * x[i, u] * sh[j] -> out[k, u]`` (subscripts
``u,iu,j,ku+ijk``): the library's ``ir_mul`` order inside a segment. Every input block's channels
are cut into chunks of ``chunk`` channels (the gcd of the input multiplicities, e.g. 32 for
``128x0e+64x1e+32x2e``), one segment per chunk, so that every operand's segments have one extent:
what the ``uniform_1d`` CUDA kernel needs (:func:`uniform_1d_problems` says why a polynomial would
not qualify). A chunk of channels is contiguous in e3nn's ``mul_ir`` layout, so going to the
chunked ``ir_mul`` order and back is one transpose per block (``[E, n, chunk, d] <-> [E, n, d,
chunk]``). The weight operand is e3nn's flat layout unchanged (instruction order, ``[u]`` per path,
chunks contiguous), so per-edge weights from the radial MLP and the internal ``tp.weight`` are used
as they are.

The library's module holds its constants as buffers; it is kept out of the ``nn.Module`` tree (one
per device, built on first use), so the state_dict is the e3nn module's whatever the implementation.
On a CPU (or without the CUDA ops) the library's ``naive`` method runs: plain PyTorch ops, twice
differentiable (forces with ``create_graph``, then the loss's backward).
"""

from __future__ import annotations

import math
import warnings

import torch
from e3nn import o3

try:  # the optional extra
    import cuequivariance as cue
    import cuequivariance_torch as cuet
except ImportError:  # pragma: no cover - depends on the environment
    cue = cuet = None

#: the one-line error for ``model.tensor_product=cueq`` without the library
INSTALL_HINT = ("the cueq tensor product needs cuEquivariance: pip install '.[cueq]' "
                "(on CUDA also cuequivariance-ops-torch-cu12 for its kernels)")


def available() -> bool:
    """True when ``cuequivariance`` and ``cuequivariance_torch`` import."""
    return cuet is not None


def has_cuda_ops() -> bool:
    """True when the CUDA kernels (``cuequivariance_ops_torch``) import."""
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except ImportError:
        return False
    return True


def build_polynomial(dtp) -> tuple:
    """``(cue.SegmentedPolynomial, chunk)`` of a DepthwiseTensorProduct, from ``dtp.tp.instructions``.

    Inputs: weights (e3nn's flat layout), x (chunked ``ir_mul``), sh; output: chunked ``ir_mul`` in
    ``dtp.irreps_out`` order. Needs what the ``"fast"`` version needs (``dtp._fast_ok``): 1x edge
    irreps, ``'uvu'`` weighted instructions, one per output block.
    """
    if cue is None:
        raise ImportError(INSTALL_HINT)
    irreps_in, irreps_edge, irreps_out = dtp.irreps_in, dtp.irreps_edge, dtp.irreps_out
    ins_list = dtp.tp.instructions
    chunk = math.gcd(*[mul for mul, _ in irreps_in])
    d = cue.SegmentedTensorProduct.from_subscripts("u,iu,j,ku+ijk")
    # x: per block, per chunk, a (d, chunk) segment
    x_seg = []
    for mul, ir in irreps_in:
        x_seg.append([d.add_segment(1, (ir.dim, chunk)) for _ in range(mul // chunk)])
    sh_seg = [d.add_segment(2, (ir.dim,)) for _, ir in irreps_edge]
    out_seg = []
    for mul, ir in irreps_out:
        out_seg.append([d.add_segment(3, (ir.dim, chunk)) for _ in range(mul // chunk)])
    # weights: instruction order, per path its [u] channels in chunks
    for ins in ins_list:
        mul_in, ir_in = irreps_in[ins.i_in1]
        l2, l3 = irreps_edge[ins.i_in2].ir.l, irreps_out[ins.i_out].ir.l
        c = (ins.path_weight * o3.wigner_3j(ir_in.l, l2, l3, dtype=torch.float64)).numpy()  # [a, b, K], as e3nn
        for n in range(mul_in // chunk):
            w = d.add_segment(0, (chunk,))
            d.add_path(w, x_seg[ins.i_in1][n], sh_seg[ins.i_in2], out_seg[ins.i_out][n], c=c)
    return cue.SegmentedPolynomial.eval_last_operand(d), chunk


def uniform_1d_problems(polynomial) -> list[str]:
    """Why ``method="uniform_1d"`` (the fast CUDA kernel) would refuse ``polynomial``; [] if it takes it.

    The checks of ``cuequivariance_torch``'s ``SegmentedPolynomialFromUniform1dJit`` (0.13), run
    here without the CUDA ops so a CPU test can tell whether a GPU run would fall back.
    """
    try:
        p = polynomial.flatten_coefficient_modes().squeeze_modes()
    except ValueError as e:
        return [f"coefficient modes do not flatten: {e}"]
    problems = []
    extent = None
    for k, o in enumerate(p.operands):
        if o.ndim not in (0, 1):
            problems.append(f"operand {k}: {o.ndim}-d segments (0-d or 1-d needed)")
            continue
        if not o.all_same_segment_shape():
            problems.append(f"operand {k}: segments of different shapes {sorted(set(o.segments))}")
            continue
        if o.ndim == 1 and o.num_segments:
            if extent is None:
                extent = o.segment_shape
            elif o.segment_shape != extent:
                problems.append(f"operand {k}: extent {o.segment_shape} differs from {extent}")
    for _, stp in p.operations:
        if len(stp.subscripts.modes()) > 1:
            problems.append(f"{stp.subscripts}: more than one mode")
        if stp.coefficient_subscripts != "":
            problems.append(f"{stp.subscripts}: coefficients are not scalars")
    return problems


class CueqDepthwise:
    """The cuEquivariance evaluation of one DepthwiseTensorProduct (not an ``nn.Module``: see the
    module docstring). Call as ``(x, edge_sh, weight) -> out``, all in e3nn's layout."""

    def __init__(self, dtp) -> None:
        if cuet is None:
            raise ImportError(INSTALL_HINT)
        self.polynomial, self.chunk = build_polynomial(dtp)
        self.problems = uniform_1d_problems(self.polynomial)
        self.in_blocks = [(mul // self.chunk, ir.dim) for mul, ir in dtp.irreps_in]
        self.out_blocks = [(mul // self.chunk, ir.dim) for mul, ir in dtp.irreps_out]
        self._modules: dict = {}

    def method(self, device: torch.device) -> str:
        """``uniform_1d`` on CUDA with the kernels installed and a uniform polynomial, else ``naive``."""
        return "uniform_1d" if device.type == "cuda" and not self.problems and has_cuda_ops() else "naive"

    def module(self, device: torch.device):
        key = str(device)
        if key not in self._modules:
            method = self.method(device)
            if device.type == "cuda" and method == "naive":
                why = "; ".join(self.problems) if self.problems else "cuequivariance-ops-torch-cu12 is not installed"
                warnings.warn(f"cueq tensor product on {device}: the naive PyTorch method ({why})", stacklevel=3)
            self._modules[key] = cuet.SegmentedPolynomial(self.polynomial, method=method).to(device)
        return self._modules[key]

    def _relayout(self, t: torch.Tensor, blocks, to_ir_mul: bool) -> torch.Tensor:
        """mul_ir <-> chunked ir_mul, per block ``[E, n, chunk, d] <-> [E, n, d, chunk]``."""
        e = t.shape[0]
        if all(dim == 1 for _, dim in blocks):
            return t
        sizes = [n * self.chunk * dim for n, dim in blocks]
        parts = t.split(sizes, dim=1) if len(blocks) > 1 else (t,)
        out = []
        for part, (n, dim) in zip(parts, blocks):
            if dim == 1:
                out.append(part)
                continue
            shape = (e, n, self.chunk, dim) if to_ir_mul else (e, n, dim, self.chunk)
            out.append(part.reshape(shape).transpose(2, 3).reshape(e, n * self.chunk * dim))
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    def __call__(self, x: torch.Tensor, edge_sh: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # x: [E, irreps_in.dim], edge_sh: [E, irreps_edge.dim], weight: [E, numel] or [numel] (shared)
        if weight.dim() == 1:
            weight = weight.unsqueeze(0)  # [1, numel]: the library broadcasts a batch of one
        # one dtype for the three operands (under autocast the harmonics may stay fp32 while the
        # features are bf16): the node features', as the fast version's matmuls give
        if edge_sh.dtype != x.dtype:
            edge_sh = edge_sh.to(x.dtype)
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        xs = self._relayout(x, self.in_blocks, to_ir_mul=True)
        (out,) = self.module(x.device)([weight, xs, edge_sh])
        return self._relayout(out, self.out_blocks, to_ir_mul=False)
