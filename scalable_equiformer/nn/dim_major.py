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
weights (for shared weights, folded into the linear's matrix) and one matmul. Paths whose input has
fewer components than their output (``0e x Y_l -> l``, ``1e x Y -> 2e``, ...) run the other way
round: their rows of the linear layer first, on the smaller input, then the Clebsch-Gordan product
(the same sum in another order, with ``2 l_out + 1`` / ``2 l_in + 1`` times fewer FLOPs in the
linear). No tensor of the tensor product's full output is ever formed, and nothing is transposed.
Every concatenation is :class:`CatSplit`, whose backward is one ``split`` (differentiable, any
order): no full-size zero tensors in the force loss's double backward.

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
    paths: tuple  # ((block n, path m), ...): the paths concatenated into the type's matmul, in the linear's order
    fan_in: int  # the linear's input channels (rows of its matrix) of every path of the type
    entries: tuple  # the lin output entries j of this type, in order
    rows: tuple  # ((first row, rows), ...): the runs of matrix rows that ``paths`` read
    fan: int  # sum of the paths' channels (the rows of ``rows``)
    outer: tuple  # ((block n, path m, first row, u, input entry i), ...): scalar-input paths
    inner: tuple  # the same for the paths from a smaller non-scalar input, 1 < 2 l_in + 1 < d (linear first)


@dataclass(frozen=True)
class FusedPlan:
    """Index plan of :func:`fused_tp_linear` for one (DepthwiseTensorProduct, EquivariantLinear) pair."""

    types: tuple  # _Type per output irrep type of the tensor product, in the linear's input order
    weight_perm: tuple  # the per-edge weight columns the types read, type by type: paths, outer, inner paths
    out_entries: tuple  # per lin output entry: (type index, mul), its columns in the type's matmul in order
    needed: tuple  # per block: the paths m whose products the types concatenate


def _runs(rows: list[tuple[int, int]]) -> tuple:
    """``(start, length)`` row ranges merged where they touch."""
    merged = []
    for start, length in rows:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return tuple(merged)


def fused_plan(dtp, lin, zero_inputs: frozenset = frozenset()) -> FusedPlan | None:
    """The plan for ``lin(dtp(x, sh, w))``, or None where the fused path does not cover the pair
    (the plain path then runs): the fast tensor product must apply, the linear must read the
    tensor product's simplified output, and every output entry of the linear must have inputs.

    ``zero_inputs``: entries of ``dtp.irreps_in`` that are zero by construction (the edge-degree
    embedding's input has no ``l > 0`` part); their paths add exactly nothing and are left out.

    A path from a scalar input (``0e x Y_l -> l``, l > 0) is an outer product ``Y_l(e) (x w)(e)``
    per channel: its part of the linear layer, ``Y_l (x w) L = Y_l ((x w) L)``, is applied to the
    ``[E, u]`` scalars before the product with the harmonics (``2 l + 1`` times fewer FLOPs, and its
    product with the harmonics is never formed): the type's ``outer`` paths. Likewise a path from a
    smaller input (``1 < 2 l_in + 1 < 2 l + 1``, e.g. ``1e x Y -> 2e``) applies its rows of the
    linear to the ``[E, 2 l_in + 1, u]`` input first, then its Clebsch-Gordan rows: ``inner`` paths,
    one batched matmul per type for all of them."""
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
    types, perm, needed = [], [], [set() for _ in dtp._blocks]
    entry_type = {}
    for t, (mul_t, ir_t) in enumerate(lin.irreps_in):
        ks = sorted((k for k in range(len(ins)) if mid[ins[k].i_out].ir == ir_t), key=lambda k: ins[k].i_out)
        paths, rows, outer, outer_cols, inner, inner_cols, row = [], [], [], [], [], [], 0
        for k in ks:
            n, m = where[k]
            i, u, d1 = dtp._blocks[n][0], dtp._blocks[n][1], dtp._blocks[n][2]
            cols = list(range(w_offsets[k], w_offsets[k] + dtp._w_sizes[k]))
            if i in zero_inputs:
                pass
            elif d1 == 1 and ir_t.dim > 1:
                outer.append((n, m, row, u, i))
                outer_cols.extend(cols)
            elif 1 < d1 < ir_t.dim:
                inner.append((n, m, row, u, i))
                inner_cols.extend(cols)
            else:
                paths.append((n, m))
                rows.append((row, u))
                perm.extend(cols)
                needed[n].add(m)
            row += u
        perm.extend(outer_cols + inner_cols)
        entries = []
        for j, (inputs, _, fan_in, _, _, _) in enumerate(lin._plan):
            if lin.irreps_out[j].ir == ir_t:
                if inputs != [t] or fan_in != mul_t:
                    return None
                entries.append(j)
                entry_type[j] = t
        if not paths and not outer and not inner:
            return None
        types.append(_Type(ir_t.dim, tuple(paths), mul_t, tuple(entries), _runs(rows), sum(r for _, r in rows),
                           tuple(outer), tuple(inner)))
    if len(entry_type) != len(lin._plan):
        return None  # an output type the tensor product does not make (zeros in the plain path)
    out_entries = tuple((entry_type[j], mul) for j, (mul, _) in enumerate(lin.irreps_out))
    return FusedPlan(tuple(types), tuple(perm), out_entries, tuple(tuple(sorted(s)) for s in needed))


def extra_scalar_columns(plan: FusedPlan, dtp, extra) -> bool:
    """True when ``extra`` (an EquivariantLinear from the tensor product's unsimplified output to
    scalars, the MLP attention's ``sep_alpha``) reads the ``0e`` paths in the fused plan's order,
    so that its matrix can join the ``0e`` matmul as extra columns."""
    if len(extra._plan) != 1 or extra.irreps_out[0][1] != o3.Irrep("0e") or not plan.types or plan.types[0].d != 1:
        return False
    if plan.types[0].rows != ((0, plan.types[0].fan_in),):
        return False  # the 0e matmul leaves paths out
    inputs = extra._plan[0][0]
    scalars = [i for i, (_, ir) in enumerate(dtp.irreps_out) if ir == o3.Irrep("0e")]
    return list(inputs) == scalars and dtp.irreps_out.simplify()[0][1] == o3.Irrep("0e")


def _param_pieces(lin) -> tuple[list[torch.Tensor], dict]:
    """``lin``'s weight as one ``[fan_in, mul_out]`` view per output entry and its bias per entry with
    one, from one ``split`` each (a narrow per entry would fill a full-size zero gradient for each)."""
    plan = lin._plan
    pieces = lin.weight.split([fan_in * mul_out for _, _, fan_in, mul_out, _, _ in plan])
    mats = [w.view(fan_in, mul_out) for w, (_, _, fan_in, mul_out, _, _) in zip(pieces, plan)]
    with_bias = [j for j, entry in enumerate(plan) if entry[5] >= 0]
    biases = dict(zip(with_bias, lin.bias.split([plan[j][3] for j in with_bias]))) if with_bias else {}
    return mats, biases


def _matrix(tp: _Type, mats: list, biases: dict, extra) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear's matrix for one type, [fan_in, sum of its entries' mul (+ extra's columns)], and
    its bias (or None); ``mats``, ``biases``: :func:`_param_pieces` of the linear."""
    cols = [mats[j] for j in tp.entries]
    bias_parts = [biases.get(j) for j in tp.entries]
    if extra is not None:
        extra_mats, extra_biases = _param_pieces(extra)
        cols.append(extra_mats[0])
        bias_parts.append(extra_biases.get(0))
    mat = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
    bias = None
    if any(b is not None for b in bias_parts):
        bias = torch.cat([b if b is not None else mat.new_zeros(m.shape[1]) for b, m in zip(bias_parts, cols)])
    return mat, bias


def _row_pieces(mat: torch.Tensor, segments: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The rows ``(start, length)`` of ``mat`` for each segment (non-overlapping), from one ``split``."""
    order = sorted(range(len(segments)), key=lambda k: segments[k][0])
    sizes, index, pos = [], [0] * len(segments), 0
    for k in order:
        start, length = segments[k]
        if start > pos:
            sizes.append(start - pos)
        index[k] = len(sizes)
        sizes.append(length)
        pos = start + length
    if pos < mat.shape[0]:
        sizes.append(mat.shape[0] - pos)
    pieces = mat.split(sizes) if len(sizes) > 1 else (mat,)
    return [pieces[i] for i in index]


def _block_products(
    plan: FusedPlan,
    dtp,
    xs: list[torch.Tensor],
    edge_sh: torch.Tensor,
    shared_input: bool,
) -> tuple[list[dict], list[torch.Tensor]]:
    """Per input block: its needed paths' products ``{m: [E, 2 l_out + 1, u]}`` (unweighted), one
    batched matmul per block (an outer product for scalar inputs), and per block its paths' harmonics x
    Clebsch-Gordan rows ``[E, 2 l_out + 1, d1]`` (the outer and inner paths read theirs)."""
    n = edge_sh.shape[0]
    # [E, sum_i Ktot_i * d1_i]: harmonics x Clebsch-Gordan, each block's [Ktot, d1] rows side by side
    t_all = edge_sh @ dtp._cg_km.to(dtype=edge_sh.dtype)
    ts = t_all.split(dtp._t_sizes, dim=1) if len(dtp._t_sizes) > 1 else (t_all,)
    out, tts = [], []
    for (i, mul, d1, ktot, sizes, _), t, needed in zip(dtp._blocks, ts, plan.needed):
        tt = t.view(n, ktot, d1)  # [E, Ktot, d1]
        if d1 > 1:  # contiguous operands: MKL's batched matmul runs 3-5x slower on strided ones
            tt = tt.contiguous()
        by_path = tt.split(sizes, dim=1) if len(sizes) > 1 else (tt,)
        tts.append(by_path)
        products = {}
        if needed:
            x = xs[i]  # [E, d1, u]
            kept = [sizes[m] for m in needed]
            rows = tt
            if len(needed) < len(sizes):  # only the needed paths' rows (the others run linear first)
                rows = cat([by_path[m] for m in needed], dim=1).contiguous()
            if d1 == 1:
                y = rows * x  # [E, K, 1] * [E, 1, u]
            elif shared_input:  # one input [1, d1, u] for every edge (the edge-degree embedding)
                y = rows @ x[0]
            else:  # x contiguous also makes autograd's gradient of x the faster tt^T @ grad
                y = torch.bmm(rows, x.contiguous())  # [E, K, u]
            ys = y.split(kept, dim=1) if len(kept) > 1 else (y,)
            products = dict(zip(needed, ys))
        out.append(products)
    return out, tts


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
    ``[E, len(weight_perm)]``, e3nn's weight columns ``weight_perm`` (the radial MLP computes just
    those: ``rad(radial, columns=weight_perm)``), or None for the tensor product's internal weights;
    ``weight_perm``: :func:`weight_perm` of the plan, on the device. Returns one ``[E, d, mul]``
    view per entry of ``lin.irreps_out``, and ``extra``'s output [E, mul] (None without ``extra``).
    """
    n = edge_sh.shape[0]
    products, tts = _block_products(plan, dtp, xs, edge_sh, shared_input)
    shared = dtp.tp.weight if dtp.internal_weights else None
    sizes = [s for tp in plan.types for s in (tp.fan, *(o[3] for o in tp.outer + tp.inner))]
    if shared is not None:
        w_all = shared.index_select(0, weight_perm).split(sizes)
    else:
        if weight is None:
            raise ValueError("DepthwiseTensorProduct without internal weights needs per-edge weights")
        w_all = weight.split(sizes, dim=1)
    mats, biases = _param_pieces(lin)
    results, extra_out, k = [], None, 0
    for t, tp in enumerate(plan.types):
        w, w_outer = w_all[k], w_all[k + 1 : k + 1 + len(tp.outer)]
        w_inner = w_all[k + 1 + len(tp.outer) : k + 1 + len(tp.outer) + len(tp.inner)]
        k += 1 + len(tp.outer) + len(tp.inner)
        mat, bias = _matrix(tp, mats, biases, extra if t == 0 else None)
        cols = mat.shape[1]
        pieces = _row_pieces(mat, list(tp.rows) + [(o[2], o[3]) for o in tp.outer + tp.inner])
        out = None
        if tp.paths:
            y = cat([products[b][m] for b, m in tp.paths], dim=2)  # [E, d, fan]
            rows = cat(pieces[: len(tp.rows)], dim=0)
            if shared is not None:  # shared tensor-product weights fold into the rows: (Y * w) L = Y (w L)
                rows = rows * w.unsqueeze(1)
            else:
                y = y * w.unsqueeze(1)
            y = y.reshape(n * tp.d, tp.fan)
            out = torch.addmm(bias, y, rows) if bias is not None else y @ rows
            out = out.view(n, tp.d, cols)
        elif bias is not None:
            out = bias.expand(n, tp.d, cols)
        pieces = pieces[len(tp.rows):]
        for (b, m, _, u, i), wo, rows in zip(tp.outer, w_outer, pieces):
            x0 = xs[i].squeeze(1)  # [E, u] ([1, u] with shared_input)
            s = x0 @ (rows * wo.unsqueeze(1)) if shared is not None else (x0 * wo) @ rows  # [E, cols]
            harm = tts[b][m]  # [E, d, 1]: the path's harmonics
            out = harm * s.unsqueeze(1) if out is None else torch.addcmul(out, harm, s.unsqueeze(1))
        if tp.inner:
            harms, lins = [], []
            for (b, m, _, u, i), wi, rows in zip(tp.inner, w_inner, pieces[len(tp.outer):]):
                x = xs[i]  # [E, d1, u] ([1, d1, u] with shared_input)
                d1 = x.shape[1]
                if shared is not None:
                    s = x.reshape(-1, u) @ (rows * wi.unsqueeze(1))
                else:
                    s = (x * wi.unsqueeze(1)).reshape(-1, u) @ rows
                lins.append(s.view(-1, d1, cols).expand(n, d1, cols))  # [E, d1, cols]
                harms.append(tts[b][m])  # [E, d, d1]
            harm, lin_in = cat(harms, dim=2).contiguous(), cat(lins, dim=1)  # [E, d, sum d1], [E, sum d1, cols]
            out = torch.bmm(harm, lin_in) if out is None else torch.baddbmm(out, harm, lin_in)
        results.append(out)
    # each type's columns split into the linear's output entries (one split: its backward is one cat)
    widths = [[] for _ in plan.types]
    for t, mul in plan.out_entries:
        widths[t].append(mul)
    if extra is not None:
        widths[0].append(extra.irreps_out.dim)
    split = [list(r.split(w, dim=2)) if len(w) > 1 else [r] for r, w in zip(results, widths)]
    if extra is not None:
        extra_out = split[0].pop().squeeze(1)  # [E, mul]
    parts = [split[t].pop(0) for t, _ in plan.out_entries]
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
