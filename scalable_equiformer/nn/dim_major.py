"""Dim-major edge tensors and the fused depth-wise tensor product + linear layer of the fast path.

e3nn lays an irrep block of ``u`` channels of dimension ``d`` out mul-major: ``[E, u * d]``, index
``c * d + m``. A linear layer mixes channels, so on that layout it needs ``[E * d, u]`` rows: a
transpose and a copy before each matmul and another after it. The edge stages of the fast path
(``tensor_product="fast"``) keep each block *dim-major* instead, as a ``[E, d, u]`` tensor, from the
depth-wise tensor product through its linear layer, the gate and the next tensor product, to the
attention's scatter into the atoms. The node features stay e3nn's layout; :func:`to_dim_major`
gives views of them (no copy) and :func:`from_dim_major` converts back (where it is done on the
atoms, after the scatter, it costs ``N`` rows, not ``E``).

:func:`fused_tp_linear` computes ``lin(DTP(x, sh, w))`` -- the same function as
:class:`~.tensor_product.DepthwiseTensorProduct` followed by :class:`~.tensor_product.EquivariantLinear`
-- with, per input block, one batched matmul (all its paths at once, straight into dim-major
layout), and per output irrep type one concatenation of its paths, one multiply by the per-edge
weights (for shared weights, folded into the linear's matrix) and one matmul. No tensor of the
tensor product's full output is ever formed, and nothing is transposed. Every concatenation is
:class:`CatSplit`, whose backward is one ``split`` (differentiable, any order): no full-size zero
tensors in the force loss's double backward.

The parameters stay where they were (``dtp.tp.weight``, ``lin.weight``, ``lin.bias``), so the
state_dict and checkpoints are those of the plain path, which remains the oracle (tests compare
the two in float64).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from e3nn import o3


_DISABLED = [0]


@contextlib.contextmanager
def module_path():
    """Within the block the fast path runs module by module in e3nn's layout, not fused (the
    compiled step traces that: inductor cannot lower some views of the fused path's transposed
    operands, and the compiled step is the same function either way)."""
    _DISABLED[0] += 1
    try:
        yield
    finally:
        _DISABLED[0] -= 1


def enabled() -> bool:
    """False inside :func:`module_path`."""
    return _DISABLED[0] == 0


def runs(plan, dtp) -> bool:
    """Whether a fused pair with ``plan`` (None: not covered) runs fused now: the fast tensor
    product, outside :func:`module_path`."""
    return plan is not None and dtp.implementation == "fast" and enabled()


def weight_perm(plan) -> torch.Tensor:
    """``plan.weight_perm`` as a long tensor (empty without a plan), for the owner to register as a
    non-persistent buffer (it follows the module to its device)."""
    return torch.tensor(plan.weight_perm if plan is not None else (), dtype=torch.long)


class CatSplit(torch.autograd.Function):
    """``torch.cat(xs, dim)`` whose backward is ``grad.split(sizes, dim)`` (differentiable again).

    ``torch.cat``'s backward narrows the gradient once per input; under ``create_graph`` those
    narrows are recorded, and the next backward (``loss.backward()`` after forces) turns each into a
    full-size zero tensor plus a copy plus a full-size accumulation. A ``split``'s backward is one
    ``cat``, so this is differentiable any number of times with no zero-filling. (``torch.cat``, not
    ``copy_`` into views of one buffer: it promotes mixed dtypes, and a traced graph of it,
    ``training/compiled.py``, runs without in-place writes into multi-output views.)
    """

    @staticmethod
    def forward(ctx, dim: int, *xs: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        ctx.sizes = [x.shape[dim] for x in xs]
        return torch.cat(xs, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *grad.split(ctx.sizes, dim=ctx.dim))


def cat(xs: list[torch.Tensor], dim: int) -> torch.Tensor:
    """:class:`CatSplit` of ``xs`` along ``dim`` (the tensor itself when there is one)."""
    return xs[0] if len(xs) == 1 else CatSplit.apply(dim, *xs)


def to_dim_major(x: torch.Tensor, irreps: o3.Irreps) -> list[torch.Tensor]:
    """``x`` [..., irreps.dim] (mul-major) -> one ``[..., d, mul]`` view per entry of ``irreps`` (no copy)."""
    lead = x.shape[:-1]
    sizes = [mul * ir.dim for mul, ir in irreps]
    chunks = x.split(sizes, dim=-1) if len(sizes) > 1 else (x,)
    return [c.reshape(*lead, mul, ir.dim).transpose(-1, -2) for c, (mul, ir) in zip(chunks, irreps)]


def flat(x: torch.Tensor, lead: int = 1) -> torch.Tensor:
    """``x`` with every dim after the first ``lead`` merged (``reshape(n, -1)``, which fails for 0 rows)."""
    return x.reshape(*x.shape[:lead], math.prod(x.shape[lead:]))


def from_dim_major(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`to_dim_major`: ``[..., d, mul]`` parts -> ``[..., sum mul * d]`` (mul-major)."""
    lead = parts[0].dim() - 2
    return cat([flat(p.transpose(-1, -2), lead) for p in parts], dim=-1)


@dataclass(frozen=True)
class _Type:
    """One output irrep type of the tensor product, as the linear layer reads it."""

    d: int  # 2 l + 1
    paths: tuple  # ((block n, path m within the block), ...) in the order of the linear's input channels
    fan_in: int  # sum of the paths' channels
    entries: tuple  # ((lin output entry j, weight offset, mul_out, bias offset or -1), ...)


@dataclass(frozen=True)
class FusedPlan:
    """Index plan of :func:`fused_tp_linear` for one (DepthwiseTensorProduct, EquivariantLinear) pair."""

    types: tuple  # _Type per output irrep type of the tensor product, in the linear's input order
    weight_perm: tuple  # e3nn's per-edge weight columns, reordered type by type as the linear reads them
    out_entries: tuple  # per lin output entry: (type index, column offset in that type's matmul, mul)


def fused_plan(dtp, lin) -> FusedPlan | None:
    """The plan for ``lin(dtp(x, sh, w))``, or None where the fused path does not cover the pair
    (the plain path then runs): the fast tensor product must apply, the linear must read the
    tensor product's simplified output, and every output entry of the linear must have inputs."""
    if not getattr(dtp, "_fast_ok", False):
        return None
    mid = dtp.irreps_out
    types_in = [ir for _, ir in lin.irreps_in]
    if lin.irreps_in != mid.simplify() or len(set(types_in)) != len(types_in):  # one entry per irrep type
        return None
    ins = dtp.tp.instructions
    where = {}  # instruction -> (block n, path m)
    for n, (_, _, _, _, _, paths) in enumerate(dtp._blocks):
        for m, k in enumerate(paths):
            where[k] = (n, m)
    w_offsets = [sum(dtp._w_sizes[:k]) for k in range(len(ins))]
    types, perm = [], []
    entry_type = {}
    for t, (mul_t, ir_t) in enumerate(lin.irreps_in):
        ks = sorted((k for k in range(len(ins)) if mid[ins[k].i_out].ir == ir_t), key=lambda k: ins[k].i_out)
        for k in ks:
            perm.extend(range(w_offsets[k], w_offsets[k] + dtp._w_sizes[k]))
        entries = []
        for j, (inputs, offset, fan_in, mul_out, d, b0) in enumerate(lin._plan):
            if lin.irreps_out[j].ir == ir_t:
                if inputs != [t] or fan_in != mul_t:
                    return None
                entries.append((j, offset, mul_out, b0))
                entry_type[j] = t
        types.append(_Type(ir_t.dim, tuple(where[k] for k in ks), mul_t, tuple(entries)))
    if len(entry_type) != len(lin._plan):
        return None  # an output type the tensor product does not make (zeros in the plain path)
    out_entries, col = [], {}
    for j, (mul, _) in enumerate(lin.irreps_out):
        t = entry_type[j]
        out_entries.append((t, col.get(t, 0), mul))
        col[t] = col.get(t, 0) + mul
    return FusedPlan(tuple(types), tuple(perm), tuple(out_entries))


def extra_scalar_columns(plan: FusedPlan, dtp, extra) -> bool:
    """True when ``extra`` (an EquivariantLinear from the tensor product's unsimplified output to
    scalars, the MLP attention's ``sep_alpha``) reads the ``0e`` paths in the fused plan's order,
    so that its matrix can join the ``0e`` matmul as extra columns."""
    if len(extra._plan) != 1 or extra.irreps_out[0][1] != o3.Irrep("0e") or not plan.types or plan.types[0].d != 1:
        return False
    inputs = extra._plan[0][0]
    scalars = [i for i, (_, ir) in enumerate(dtp.irreps_out) if ir == o3.Irrep("0e")]
    return list(inputs) == scalars and dtp.irreps_out.simplify()[0][1] == o3.Irrep("0e")


def _matrix(lin, tp: _Type, weights: list | None, extra) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear's matrix for one type, [fan_in, sum of its entries' mul (+ extra's columns)], and
    its bias (or None)."""
    mats, biases, any_bias = [], [], False
    for _, offset, mul_out, b0 in tp.entries:
        mats.append(lin.weight.narrow(0, offset, tp.fan_in * mul_out).view(tp.fan_in, mul_out))
        if b0 >= 0:
            biases.append(lin.bias.narrow(0, b0, mul_out))
            any_bias = True
        else:
            biases.append(None)
    if extra is not None:
        inputs, offset, fan_in, mul_out, _, b0 = extra._plan[0]
        mats.append(extra.weight.narrow(0, offset, fan_in * mul_out).view(fan_in, mul_out))
        biases.append(extra.bias.narrow(0, b0, mul_out) if b0 >= 0 else None)
        any_bias = any_bias or b0 >= 0
    mat = torch.cat(mats, dim=1) if len(mats) > 1 else mats[0]
    if weights is not None:  # shared tensor-product weights fold into the rows: (Y * w) L = Y (w L)
        mat = mat * weights.unsqueeze(1)
    bias = None
    if any_bias:
        cols = [m.shape[1] for m in mats]
        bias = torch.cat([b if b is not None else mat.new_zeros(c) for b, c in zip(biases, cols)])
    return mat, bias


def _block_products(
    dtp,
    xs: list[torch.Tensor],
    edge_sh: torch.Tensor,
    shared_input: bool,
) -> list[tuple[torch.Tensor, ...]]:
    """Per input block with paths: its paths' products ``[E, 2 l_out + 1, u]`` (unweighted), one
    batched matmul (an outer product for scalar inputs) per block."""
    n = edge_sh.shape[0]
    t_all = edge_sh @ dtp._cg.to(dtype=edge_sh.dtype)  # [E, sum_i d1_i * Ktot_i]: harmonics x Clebsch-Gordan
    ts = t_all.split(dtp._t_sizes, dim=1) if len(dtp._t_sizes) > 1 else (t_all,)
    out = []
    for (i, mul, d1, ktot, sizes, _), t in zip(dtp._blocks, ts):
        tt = t.view(n, d1, ktot).transpose(1, 2)  # [E, Ktot, d1]
        x = xs[i]  # [E, d1, u]
        if d1 == 1:
            y = tt * x  # [E, Ktot, 1] * [E, 1, u]
        elif shared_input:  # one input [1, d1, u] for every edge (the edge-degree embedding)
            y = tt @ x[0]
        else:
            y = torch.bmm(tt, x)  # [E, Ktot, u]
        out.append(y.split(sizes, dim=1) if len(sizes) > 1 else (y,))
    return out


def fused_tp_linear(
    plan: FusedPlan,
    dtp,
    lin,
    xs: list[torch.Tensor],
    edge_sh: torch.Tensor,
    weight: torch.Tensor | None,
    weight_perm: torch.Tensor,
    extra=None,
    shared_input: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``lin(dtp(x, sh, weight))`` in dim-major layout.

    ``xs``: one ``[E, d, mul]`` tensor per entry of ``dtp.irreps_in`` (``[1, d, mul]`` with
    ``shared_input``: the same input on every edge); ``weight``: per-edge weights
    [E, dtp.weight_numel] in e3nn's layout, or None for the tensor product's internal weights;
    ``weight_perm``: :func:`weight_perm` of the plan, on the device. Returns one ``[E, d, mul]``
    view per entry of ``lin.irreps_out``, and ``extra``'s output [E, mul] (None without ``extra``).
    """
    n = edge_sh.shape[0]
    products = _block_products(dtp, xs, edge_sh, shared_input)
    shared = dtp.tp.weight if dtp.internal_weights else None
    if shared is not None:
        w_types = shared.index_select(0, weight_perm).split([tp.fan_in for tp in plan.types])
    else:
        if weight is None:
            raise ValueError("DepthwiseTensorProduct without internal weights needs per-edge weights")
        w_types = weight.index_select(1, weight_perm).split([tp.fan_in for tp in plan.types], dim=1)
    results, extra_out = [], None
    for t, (tp, w) in enumerate(zip(plan.types, w_types)):
        y = cat([products[b][m] for b, m in tp.paths], dim=2)  # [E, d, fan_in]
        mat, bias = _matrix(lin, tp, w if shared is not None else None, extra if t == 0 else None)
        if shared is None:
            y = y * w.unsqueeze(1)
        y = y.reshape(n * tp.d, tp.fan_in)
        out = torch.addmm(bias, y, mat) if bias is not None else y @ mat
        out = out.view(n, tp.d, mat.shape[1])
        if t == 0 and extra is not None:
            extra_out = out[:, 0, mat.shape[1] - extra.irreps_out.dim:]
        results.append(out)
    parts = [
        results[t].narrow(2, col, mul) if results[t].shape[2] != mul else results[t]
        for t, col, mul in plan.out_entries
    ]
    return parts, extra_out


def gate_dim_major(gate, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """:class:`~.gate.Gate` on dim-major parts of ``gate.irreps_in`` (scalars and gates first, as one
    ``0e`` entry): SiLU on the scalars, each gated entry times the sigmoid of its gates."""
    if gate._gates_dim == 0:
        return [gate.act_scalars(p) for p in parts]
    scalars, gates = parts[0].split([gate._scalars_dim, gate._gates_dim], dim=2)
    gates = gate.act_gates(gates).split([mul for mul, _ in gate._gated], dim=2)
    return [gate.act_scalars(scalars)] + [field * g for field, g in zip(parts[1:], gates)]


def gate_covers(gate) -> bool:
    """True when ``gate.irreps_in`` is ``[0e scalars+gates] + gated entries`` (what :func:`gate_dim_major` reads)."""
    if gate._gates_dim == 0:
        return True
    entries = list(gate.irreps_in)
    scalar_mul = (gate._scalars_dim + gate._gates_dim)
    return (entries[0][1] == o3.Irrep("0e") and entries[0][0] == scalar_mul and gate._scalars_dim > 0
            and [(mul, ir.dim) for mul, ir in entries[1:]] == gate._gated)
