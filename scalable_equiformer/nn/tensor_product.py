"""Equivariant linear layer, depth-wise tensor product and separable FCTP (Equiformer).

Parametrisation follows the original's ``tensor_product_rescale.py`` (``_RESCALE = True``):
tensor products carry no path normalisation; instead weights start as ``randn / sqrt(fan_in)``
and even-scalar outputs get a bias. For the linear layer (the original's ``LinearRS``, an
``'uvw'`` FCTP with a ``1x0e`` constant) that is exactly ``y = x W + b`` per irrep type, which is
what :class:`EquivariantLinear` computes directly (no e3nn tensor product needed).
"""

from __future__ import annotations

import math

import torch
from e3nn import o3

from . import dim_major
from .dim_major import flat, from_dim_major, fused_plan, fused_tp_linear, gate_covers, gate_dim_major, to_dim_major
from .gate import Gate
from .radial import RadialProfile


def sort_irreps_even_first(irreps) -> tuple[o3.Irreps, tuple[int, ...]]:
    """Sort by (l, even before odd), stably; returns (sorted irreps, p) with p[old] = new index."""
    irreps = o3.Irreps(irreps)
    order = sorted(range(len(irreps)), key=lambda i: (irreps[i].ir.l, -irreps[i].ir.p, i))
    p = [0] * len(order)
    for new, old in enumerate(order):
        p[old] = new
    return o3.Irreps([irreps[i] for i in order]), tuple(p)


class EquivariantLinear(torch.nn.Module):
    """``y = (x W) * attr + b``: one weight matrix per pair of equal irrep types, bias on ``0e``.

    ``attr`` (optional, [N, 1]) is a per-node scalar: with it the layer equals the original's
    ``FullyConnectedTensorProductRescale(irreps_in, '1x0e', irreps_out)`` on that scalar.
    Weights start as ``randn / sqrt(fan_in)`` (fan_in = input channels feeding the output type),
    biases at 0.
    """

    def __init__(self, irreps_in, irreps_out, bias: bool = True, rescale: bool = True) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self._in_sizes = [mul * ir.dim for mul, ir in self.irreps_in]
        self._plan = []  # per output entry: (input entry indices, weight offset, fan_in, mul_out, d, bias offset or -1)
        offset = nb = 0
        inits = []
        for mul_out, ir_out in self.irreps_out:
            inputs = [i for i, (_, ir) in enumerate(self.irreps_in) if ir == ir_out]
            fan_in = sum(self.irreps_in[i].mul for i in inputs)
            has_bias = bias and ir_out.l == 0 and ir_out.p == 1
            self._plan.append((inputs, offset, fan_in, mul_out, ir_out.dim, nb if has_bias else -1))
            nb += mul_out if has_bias else 0
            n = fan_in * mul_out
            if n:
                scale = 1.0 / math.sqrt(fan_in) if rescale else 1.0
                inits.append(torch.randn(n) * scale)
            offset += n
        self.weight_numel = offset
        self.weight = torch.nn.Parameter(torch.cat(inits) if inits else torch.zeros(0))
        self.bias = torch.nn.Parameter(torch.zeros(nb)) if nb else None

    def forward(self, x: torch.Tensor, attr: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, irreps_in.dim], attr: [N, 1] or None -> [N, irreps_out.dim]
        outs = self._outputs(x, attr, dim_major=False)
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def forward_dim_major(self, x: torch.Tensor, attr: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The same map, each output entry dim-major ``[N, d, mul_out]`` (contiguous: the matmul's own
        layout, no transpose back); x: [N, irreps_in.dim] in e3nn's layout."""
        return self._outputs(x, attr, dim_major=True)

    def _outputs(self, x: torch.Tensor, attr: torch.Tensor | None, dim_major: bool) -> list[torch.Tensor]:
        """One tensor per output entry: ``[N, mul_out * d]`` (mul-major) or ``[N, d, mul_out]``."""
        n = x.shape[0]
        # split (not narrow): its backward is one cat, where each narrow's backward fills a full-size zero tensor
        chunks = x.split(self._in_sizes, dim=1) if len(self._in_sizes) > 1 else (x,)
        outs = []
        # one split of the weight (a narrow per entry would fill a full-size zero gradient for each)
        weights = self.weight.split([fan_in * mul_out for _, _, fan_in, mul_out, _, _ in self._plan])
        for (inputs, _, fan_in, mul_out, d, b0), w in zip(self._plan, weights):
            if fan_in == 0:
                out = x.new_zeros(n, d, mul_out) if dim_major else x.new_zeros(n, mul_out * d)
            else:
                w = w.view(fan_in, mul_out)
                # a copy of the one input block, not a view: the matmul saves its input for the weight
                # gradient, and a saved view would keep all of x (a whole tensor-product output per
                # edge) alive until the loss's backward; the d > 1 branch copies anyway (issue 15)
                xi = (chunks[inputs[0]].contiguous() if len(inputs) == 1
                      else torch.cat([chunks[i] for i in inputs], dim=1))
                if d == 1:
                    out = xi @ w  # [N, mul_out]
                    if dim_major:
                        out = out.unsqueeze(1)
                else:
                    out = xi.reshape(n, fan_in, d).transpose(1, 2) @ w  # [N, d, mul_out]
                    if not dim_major:
                        out = out.transpose(1, 2).reshape(n, mul_out * d)
            if attr is not None:
                out = out * (attr.unsqueeze(-1) if dim_major else attr)
            if b0 >= 0:
                out = out + self.bias[b0 : b0 + mul_out]
            outs.append(out)
        return outs

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, weights={self.weight_numel}, bias={self.bias is not None}"


# Default implementation of DepthwiseTensorProduct: "fast" (hand-written), "e3nn" (the reference) or
# "cueq" (cuEquivariance, tensor_product_cueq.py); a model's is the config's model.tensor_product
DEPTHWISE_TP_IMPLEMENTATION = "fast"
_IMPLEMENTATIONS = ("fast", "e3nn", "cueq")
TP_IMPLEMENTATIONS = _IMPLEMENTATIONS  # public: the choices of model.tensor_product


def set_tensor_product(model: torch.nn.Module, implementation: str) -> None:
    """Every DepthwiseTensorProduct of ``model`` computes with ``implementation`` (same weights)."""
    for m in model.modules():
        if isinstance(m, DepthwiseTensorProduct):
            m.implementation = implementation


class DepthwiseTensorProduct(torch.nn.Module):
    """Depth-wise (``'uvu'``) tensor product of node features with edge spherical harmonics.

    Every input channel meets every harmonic; each product type that is ``0e`` or present in
    ``irreps_filter`` becomes its own output block (so each path has fan-in 1 and the original's
    rescale factor is 1). Outputs are sorted even-first; ``irreps_out`` is that sorted, unsimplified
    list (its layout equals ``irreps_out.simplify()``). Weights are per edge (``weight`` argument,
    [E, weight_numel]) or internal and shared (``internal_weights=True``, init ``randn``).

    Three implementations of the same function (``implementation``; default
    ``DEPTHWISE_TP_IMPLEMENTATION``, switchable later through the ``implementation`` attribute;
    a built model's is ``model.tensor_product``, set by :func:`set_tensor_product`):

    * ``"e3nn"``: e3nn's generated ``o3.TensorProduct`` (``self.tp``), the reference.
    * ``"fast"``: hand-written, the same function with few large ops. One matmul gives, for every
      input block i (mul u, dim d1) and all its paths side by side, ``t[e, a, K] = sum_b sh[e, b]
      C_i[b, a, K]`` (``C`` = e3nn's Wigner-3j times e3nn's ``ins.path_weight``); then
      ``y[e, u, K] = x_i[e, u, :] @ t[e]`` (one batched matmul per block; for scalar inputs, per path
      the outer product of ``x_i * w``) times the per-path weights ``w[e, u]``, and one concatenation
      into the output layout. Only ``split``/``reshape`` and a concatenation whose backward is a
      ``split`` (:class:`.dim_major.CatSplit`): no narrow/index-assign, so no full-size zero tensors
      in the first or second derivative.
    * ``"cueq"``: NVIDIA cuEquivariance (the optional extra ``.[cueq]``), the same constants and
      weight layout: ``tensor_product_cueq.py``.

    ``self.tp`` is kept in both cases: it owns the internal weight (``tp.weight``) and the buffers,
    so the state_dict and parameter count are those of the e3nn version and checkpoints load either way.
    """

    def __init__(
        self,
        irreps_in,
        irreps_edge,
        irreps_filter,
        internal_weights: bool = False,
        implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_edge = o3.Irreps(irreps_edge)
        irreps_filter = o3.Irreps(irreps_filter)
        mid = []
        instructions = []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for j, (_, ir_edge) in enumerate(self.irreps_edge):
                for ir_out in ir_in * ir_edge:
                    if ir_out in irreps_filter or ir_out == o3.Irrep(0, 1):
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_mid, p = sort_irreps_even_first(o3.Irreps(mid))
        instructions = [(i1, i2, p[k], mode, train) for i1, i2, k, mode, train in instructions]
        self.irreps_out = irreps_mid
        self.internal_weights = internal_weights
        self.tp = o3.TensorProduct(
            self.irreps_in,
            self.irreps_edge,
            irreps_mid,
            instructions,
            irrep_normalization="component",
            path_normalization="none",
            internal_weights=internal_weights,
            shared_weights=internal_weights,
        )
        self.weight_numel = self.tp.weight_numel
        self._build_fast_plan()
        self.implementation = DEPTHWISE_TP_IMPLEMENTATION if implementation is None else implementation

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {value!r}")
        if value in ("fast", "cueq") and not self._fast_ok:
            value = "e3nn"
        if value == "cueq" and getattr(self, "_cueq", None) is None:
            from .tensor_product_cueq import CueqDepthwise  # the optional extra; ImportError names it

            self._cueq = CueqDepthwise(self)  # not a submodule: the state_dict stays e3nn's
        self._implementation = value

    def _build_fast_plan(self) -> None:
        """Constants and layout of the hand-written version, from ``self.tp.instructions``."""
        irreps_in, irreps_edge, irreps_out = self.irreps_in, self.irreps_edge, self.irreps_out
        edge_offsets = [s.start for s in irreps_edge.slices()]
        ins_list = self.tp.instructions
        # the hand-written version covers this module's instructions: 'uvu', weighted, 1x edge irreps,
        # one instruction per output block, every block of every irreps non-empty
        self._fast_ok = (
            all(mul == 1 for mul, _ in irreps_edge)
            and all(mul > 0 for mul, _ in irreps_in)
            and all(ins.connection_mode == "uvu" and ins.has_weight for ins in ins_list)
            and sorted(ins.i_out for ins in ins_list) == list(range(len(irreps_out)))
        )
        if not self._fast_ok:
            return
        self._in_sizes = [mul * ir.dim for mul, ir in irreps_in]
        self._w_sizes = [math.prod(ins.path_shape) for ins in ins_list]  # e3nn's flat weight layout: instruction order
        self._blocks = []  # per input block with paths: (i, u, d1, Ktot, [path sizes], [instruction indices])
        cols, cols_km = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            paths = [k for k, ins in enumerate(ins_list) if ins.i_in1 == i]
            if not paths:
                continue
            sizes = [irreps_out[ins_list[k].i_out].ir.dim for k in paths]
            ktot = sum(sizes)
            # C_i[b, a, K]: sh component b, input component a, output column K (paths side by side)
            c = torch.zeros(irreps_edge.dim, ir_in.dim, ktot, dtype=torch.float64)
            col = 0
            for k, size in zip(paths, sizes):
                ins = ins_list[k]
                l1, l2, l3 = ir_in.l, irreps_edge[ins.i_in2].ir.l, irreps_out[ins.i_out].ir.l
                w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)  # [a, b, K], as e3nn's codegen
                b0 = edge_offsets[ins.i_in2]
                c[b0 : b0 + 2 * l2 + 1, :, col : col + size] = ins.path_weight * w3j.transpose(0, 1)
                col += size
            cols.append(c.reshape(irreps_edge.dim, ir_in.dim * ktot))
            cols_km.append(c.transpose(1, 2).reshape(irreps_edge.dim, ktot * ir_in.dim))
            self._blocks.append((i, mul, ir_in.dim, ktot, sizes, paths))
        self._t_sizes = [c.shape[1] for c in cols]
        # float64 constant, cast to the input dtype at use; not persistent: the state_dict stays e3nn's
        self.register_buffer("_cg", torch.cat(cols, dim=1), persistent=False)
        # the same constants, each block's columns ordered (K, a): the fused path's [E, Ktot, d1] (contiguous)
        self.register_buffer("_cg_km", torch.cat(cols_km, dim=1), persistent=False)
        self._out_order = sorted(
            (ins_list[k].i_out, n, m)
            for n, (_, _, _, _, _, paths) in enumerate(self._blocks)
            for m, k in enumerate(paths)
        )

    def forward(self, x: torch.Tensor, edge_sh: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        # x: [E, irreps_in.dim], edge_sh: [E, irreps_edge.dim], weight: [E, weight_numel] -> [E, irreps_out.dim]
        if self._implementation == "e3nn":
            return self.tp(x, edge_sh, weight)
        if self._implementation == "cueq":
            return self._cueq(x, edge_sh, self.tp.weight if self.internal_weights else weight)
        return self._forward_fast(x, edge_sh, weight)

    def _forward_fast(self, x: torch.Tensor, edge_sh: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if self.internal_weights:
            weight = self.tp.weight  # [weight_numel], shared by all edges
        elif weight is None:
            raise ValueError("DepthwiseTensorProduct without internal weights needs per-edge weights")
        n = x.shape[0]  # x, edge_sh and (per-edge) weight share the leading dim E
        # [E, sum_i d1_i * Ktot_i]: the harmonics contracted with every block's Clebsch-Gordan constants
        t_all = edge_sh @ self._cg.to(dtype=edge_sh.dtype)
        t_all = t_all.split(self._t_sizes, dim=1) if len(self._t_sizes) > 1 else (t_all,)
        xs = x.split(self._in_sizes, dim=1) if len(self._in_sizes) > 1 else (x,)
        ws = weight.split(self._w_sizes, dim=-1) if len(self._w_sizes) > 1 else (weight,)
        ys = []  # per input block, per path: [E, u, 2 l_out + 1]; weights ws[k]: [E, u] (or [u] if shared)
        for (i, mul, d1, ktot, sizes, paths), t in zip(self._blocks, t_all):
            if d1 == 1:  # scalar inputs: per path an outer product of the weighted input with t
                tp = t.split(sizes, dim=1) if len(sizes) > 1 else (t,)
                ys.append([(xs[i] * ws[k]).unsqueeze(2) * tk.unsqueeze(1) for tk, k in zip(tp, paths)])
            else:  # one batched matmul for all paths of the block, then the weights
                y = xs[i].reshape(n, mul, d1) @ t.reshape(n, d1, ktot)  # [E, u, Ktot]
                parts = y.split(sizes, dim=2) if len(sizes) > 1 else (y,)
                ys.append([yk * ws[k].unsqueeze(-1) for yk, k in zip(parts, paths)])
        out = [ys[blk][m] for _, blk, m in self._out_order]
        return dim_major.cat([flat(b) for b in out], dim=1)  # each block [E, u, d] -> [E, u * d] (a view)

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in} x {self.irreps_edge} -> {self.irreps_out.simplify()}, weights={self.weight_numel}, "
            f"implementation={self._implementation!r}"
        )


class SeparableFCTP(torch.nn.Module):
    """Depth-wise TP (weights from a radial MLP, or internal) -> equivariant linear -> [gate].

    ``radial_channels`` = ``[num_radial, *hidden]`` builds the radial MLP; ``None`` uses internal
    weights (the original's ``fc_neurons=None``). With ``use_activation`` the linear layer maps to
    the gate's input irreps and the gate gives ``irreps_out``.

    With the fast tensor product (``dtp.implementation == "fast"``) the three run fused, in dim-major
    layout (:mod:`.dim_major`): :meth:`forward_parts` takes and gives ``[E, d, mul]`` parts, and
    :meth:`forward` wraps it in e3nn's layout. Otherwise (``e3nn``) each module runs in turn.
    """

    def __init__(
        self,
        irreps_in,
        irreps_edge,
        irreps_out,
        radial_channels: list[int] | None,
        use_activation: bool = False,
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_edge = o3.Irreps(irreps_edge)
        self.irreps_out = o3.Irreps(irreps_out)
        self.dtp = DepthwiseTensorProduct(
            self.irreps_in, self.irreps_edge, self.irreps_out, internal_weights=radial_channels is None
        )
        self.rad = (
            RadialProfile(list(radial_channels) + [self.dtp.weight_numel]) if radial_channels is not None else None
        )
        self.gate = Gate(self.irreps_out) if use_activation else None
        lin_out = self.gate.irreps_in if self.gate is not None else self.irreps_out
        self.lin = EquivariantLinear(self.dtp.irreps_out.simplify(), lin_out)
        plan = fused_plan(self.dtp, self.lin)
        self._plan = plan if plan is not None and (self.gate is None or gate_covers(self.gate)) else None
        self.register_buffer("_weight_perm", dim_major.weight_perm(self._plan), persistent=False)

    @property
    def fused(self) -> bool:
        """True when :meth:`forward_parts` applies (the fast tensor product, a layout the plan covers)."""
        return dim_major.runs(self._plan, self.dtp)

    def forward(self, x: torch.Tensor, edge_sh: torch.Tensor, edge_radial: torch.Tensor | None) -> torch.Tensor:
        # x: [E, irreps_in.dim] -> [E, irreps_out.dim]
        if self.fused:
            return from_dim_major(self.forward_parts(to_dim_major(x, self.irreps_in), edge_sh, edge_radial)[0])
        weight = self.rad(edge_radial) if self.rad is not None else None
        out = self.lin(self.dtp(x, edge_sh, weight))
        if self.gate is not None:
            out = self.gate(out)
        return out

    def forward_parts(self, xs: list[torch.Tensor], edge_sh: torch.Tensor, edge_radial: torch.Tensor | None,
                      extra: EquivariantLinear | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The fused path: ``xs`` one ``[E, d, mul]`` part per entry of ``irreps_in`` -> one per entry of
        ``irreps_out`` (after the gate, if any), and ``extra(DTP output)`` [E, mul] when ``extra`` (a
        linear map of the tensor product's scalars, as the MLP attention's ``sep_alpha``) is given."""
        weight = self.rad(edge_radial, self._weight_perm) if self.rad is not None else None
        parts, extra_out = fused_tp_linear(
            self._plan, self.dtp, self.lin, xs, edge_sh, weight, self._weight_perm, extra
        )
        if self.gate is not None:
            parts = gate_dim_major(self.gate, parts)
        return parts, extra_out
