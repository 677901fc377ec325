"""Equivariant graph attention (Equiformer), with the paper's two ablation switches.

``attention``:
  * ``"mlp"`` — MLP attention (the paper's): scalar features of each edge message go through a
    smooth leaky ReLU and a learned per-head vector ``alpha_dot`` to give the logits.
  * ``"dot"`` — dot-product attention (the original's ``DotProductAttention``): a query from the
    target node, keys and values from the edge message; logit = <q, k> over the head's irreps
    (scaled by 1/sqrt(num irreps * ir.dim)).
``message``:
  * ``"nonlinear"`` — depth-wise TP (radial weights) -> linear -> gate -> depth-wise TP (internal
    weights) -> linear gives the values (for ``mlp`` the logits' scalars come from a linear map of
    the first TP's output, as the original).
  * ``"linear"`` — one separable FCTP gives logits' scalars and values together.
The original has no ``dot`` + ``nonlinear`` model; here it uses the non-linear path above to make
keys and values.

Aggregation scatters only into edge targets ``edges.index[1]`` (softmax over a target's incoming
edges), so a process that holds all edges into its own atoms gets exact outputs for them.

Smooth cutoff (``smooth=True``, not in the original): the softmax is weighted by the cutoff
envelope and the value by the envelope again, ``alpha_ij = env_ij e^{a_ij} / sum_k env_ik e^{a_ik}``,
``out_i = sum_j alpha_ij env_ij v_ij``, so an edge fades out continuously as it reaches the
cutoff (also for an atom's last neighbour). ``smooth=False`` is the original's plain softmax.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3

from .dim_major import cat, extra_scalar_columns, flat
from .drop import EquivariantDropout
from .gate import NormalizedActivation
from .scatter import gather, scatter_sum
from .tensor_product import EquivariantLinear, SeparableFCTP, sort_irreps_even_first

ATTENTION_TYPES = ("mlp", "dot")
MESSAGE_TYPES = ("nonlinear", "linear")


def scatter_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    num_nodes: int,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of ``logits`` [E, H] over the edges sharing a target ``index`` [E].

    ``weight`` [E] (optional, >= 0) multiplies each exponential: ``w_e exp(a_e) / sum w exp(a)``.
    Targets whose weights are all zero get all-zero attention.
    """
    h = logits.shape[1]
    idx = index.unsqueeze(-1).expand(-1, h)
    amax = logits.new_full((num_nodes, h), float("-inf"))
    amax = amax.scatter_reduce(0, idx, logits.detach(), reduce="amax", include_self=True)
    ex = torch.exp(logits - amax.index_select(0, index))
    if weight is not None:
        ex = ex * weight.unsqueeze(-1)
    denom = scatter_sum(ex, index, num_nodes)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return ex / gather(denom, index)


class Vec2Heads(torch.nn.Module):
    """[N, (irreps_head * heads) layout] -> [N, heads, irreps_head.dim] (channel-major split)."""

    def __init__(self, irreps_head, num_heads: int) -> None:
        super().__init__()
        self.irreps_head = o3.Irreps(irreps_head)
        self.num_heads = num_heads
        self.irreps_in = o3.Irreps([(mul * num_heads, ir) for mul, ir in self.irreps_head])
        self._chunks = [mul * num_heads * ir.dim for mul, ir in self.irreps_head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        parts = zip(x.split(self._chunks, dim=1), self._chunks)
        return torch.cat([c.reshape(n, self.num_heads, size // self.num_heads) for c, size in parts], dim=2)


class Heads2Vec(torch.nn.Module):
    """Inverse of :class:`Vec2Heads`: [N, heads, irreps_head.dim] -> [N, heads * irreps_head.dim]."""

    def __init__(self, irreps_head) -> None:
        super().__init__()
        self.irreps_head = o3.Irreps(irreps_head)
        self._chunks = [mul * ir.dim for mul, ir in self.irreps_head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return torch.cat(
            [c.reshape(n, x.shape[1] * size) for c, size in zip(x.split(self._chunks, dim=2), self._chunks)],
            dim=1,
        )


def _even_scalar_mul(irreps: o3.Irreps) -> int:
    return sum(mul for mul, ir in irreps if ir.l == 0 and ir.p == 1)


class GraphAttention(torch.nn.Module):
    """Equivariant graph attention: ``x [N, irreps_in] -> [N, irreps_out]`` given edge features.

    ``forward(x, node_attr, edges)`` with ``edges`` an ``EdgeFeatures`` (index [2, E] as
    (source j, target i), sh [E, irreps_edge.dim], radial [E, num_radial], envelope [E]).
    """

    def __init__(
        self,
        irreps_node_input,
        irreps_node_attr,
        irreps_edge,
        irreps_node_output,
        radial_channels: list[int],
        irreps_head,
        num_heads: int,
        irreps_pre_attn=None,
        attention: str = "mlp",
        message: str = "nonlinear",
        alpha_drop: float = 0.0,
        proj_drop: float = 0.0,
        smooth: bool = True,
    ) -> None:
        super().__init__()
        # user choices are validated once, at config load (config.ModelConfig.validate); this is for
        # programming errors in standalone use
        assert attention in ATTENTION_TYPES and message in MESSAGE_TYPES, (attention, message)
        self.irreps_in = o3.Irreps(irreps_node_input)
        self.irreps_node_attr = o3.Irreps(irreps_node_attr)
        self.irreps_edge = o3.Irreps(irreps_edge)
        self.irreps_out = o3.Irreps(irreps_node_output)
        self.irreps_pre_attn = self.irreps_in if irreps_pre_attn is None else o3.Irreps(irreps_pre_attn)
        self.irreps_head = o3.Irreps(irreps_head)
        self.num_heads = num_heads
        self.attention = attention
        self.message = message
        self.smooth = smooth

        irreps_heads = sort_irreps_even_first(self.irreps_head * num_heads)[0].simplify()
        self.irreps_heads = irreps_heads

        self.merge_src = EquivariantLinear(self.irreps_in, self.irreps_pre_attn, bias=True)
        self.merge_dst = EquivariantLinear(self.irreps_in, self.irreps_pre_attn, bias=False)

        if attention == "mlp":
            self._build_mlp(radial_channels)
        else:
            self._build_dot(radial_channels)

        self.heads2vec = Heads2Vec(self.irreps_head)
        self.alpha_dropout = torch.nn.Dropout(alpha_drop) if alpha_drop > 0 else None
        self.proj = EquivariantLinear(irreps_heads, self.irreps_out)
        self.proj_drop = EquivariantDropout(self.irreps_out, proj_drop) if proj_drop > 0 else None
        self._fusable = all(m._plan is not None for m in self._separables()) and (
            not (attention == "mlp" and message == "nonlinear")
            or extra_scalar_columns(self.sep_act._plan, self.sep_act.dtp, self.sep_alpha))

    def _build_mlp(self, radial_channels: list[int]) -> None:
        """The MLP attention's modules (the paper's): logits from the messages' scalars."""
        mul_alpha = _even_scalar_mul(self.irreps_heads)
        self.mul_alpha_head = mul_alpha // self.num_heads
        irreps_alpha = o3.Irreps(f"{mul_alpha}x0e")
        if self.message == "nonlinear":
            self.sep_act = SeparableFCTP(
                self.irreps_pre_attn, self.irreps_edge, self.irreps_pre_attn, radial_channels, use_activation=True
            )
            self.sep_alpha = EquivariantLinear(self.sep_act.dtp.irreps_out, irreps_alpha)
            self.sep_value = SeparableFCTP(self.irreps_pre_attn, self.irreps_edge, self.irreps_heads, None)
            self.vec2heads_alpha = Vec2Heads(f"{self.mul_alpha_head}x0e", self.num_heads)
            self.vec2heads_value = Vec2Heads(self.irreps_head, self.num_heads)
        else:
            irreps_all = (irreps_alpha + self.irreps_heads).simplify()
            self.sep = SeparableFCTP(self.irreps_pre_attn, self.irreps_edge, irreps_all, radial_channels)
            self.vec2heads = Vec2Heads(
                (o3.Irreps(f"{self.mul_alpha_head}x0e") + self.irreps_head).simplify(), self.num_heads
            )
        self.alpha_act = NormalizedActivation("smooth_leaky_relu")
        alpha_dot = torch.empty(1, self.num_heads, self.mul_alpha_head)
        bound = (6.0 / (self.num_heads + self.mul_alpha_head)) ** 0.5  # glorot, as torch_geometric
        self.alpha_dot = torch.nn.Parameter(alpha_dot.uniform_(-bound, bound))

    def _build_dot(self, radial_channels: list[int]) -> None:
        """The dot-product attention's modules: a query per target atom, keys and values per edge."""
        irreps_kv = sort_irreps_even_first(self.irreps_head * (2 * self.num_heads))[0].simplify()
        self.query = EquivariantLinear(self.irreps_in, self.irreps_heads)
        if self.message == "nonlinear":
            self.sep_act = SeparableFCTP(
                self.irreps_pre_attn, self.irreps_edge, self.irreps_pre_attn, radial_channels, use_activation=True
            )
            self.sep_value = SeparableFCTP(self.irreps_pre_attn, self.irreps_edge, irreps_kv, None)
        else:
            self.key_value = SeparableFCTP(self.irreps_pre_attn, self.irreps_edge, irreps_kv, radial_channels)
        self.vec2heads_q = Vec2Heads(self.irreps_head, self.num_heads)
        self.vec2heads_kv = Vec2Heads(self.irreps_head, 2 * self.num_heads)
        scale = []
        for mul, ir in self.irreps_head:
            scale.append(torch.full((mul * ir.dim,), (self.irreps_head.num_irreps * ir.dim) ** -0.5))
        self.register_buffer("query_scale", torch.cat(scale), persistent=False)

    def _separables(self) -> list:
        return [m for m in self.children() if isinstance(m, SeparableFCTP)]

    @property
    def fused(self) -> bool:
        """True when the edge stages run fused in dim-major layout (:mod:`.dim_major`): the fast tensor
        product in every separable FCTP; otherwise module by module (:meth:`forward_modules`)."""
        return self._fusable and all(m.fused for m in self._separables())

    def forward(self, x: torch.Tensor, node_attr: torch.Tensor, edges) -> torch.Tensor:
        # x: [N, irreps_in.dim]; returns [N, irreps_out.dim]
        if self.fused:
            return self.forward_fused(x, node_attr, edges)
        return self.forward_modules(x, node_attr, edges)

    def _heads(self, part: torch.Tensor, heads: int) -> torch.Tensor:
        """A dim-major part [E, d, heads * m] -> [E, d, heads, m] (channel c = h m + j, as Vec2Heads)."""
        return part.view(part.shape[0], part.shape[1], heads, part.shape[2] // heads)

    def forward_fused(self, x: torch.Tensor, node_attr: torch.Tensor, edges) -> torch.Tensor:
        """The same function as :meth:`forward_modules`, with the edge tensors dim-major."""
        src, dst = edges.index[0], edges.index[1]
        num_nodes, heads = x.shape[0], self.num_heads
        # the message, one contiguous dim-major [E, d, mul] part per entry of irreps_pre_attn
        xs = [gather(a, src) + gather(b, dst)
              for a, b in zip(self.merge_src.forward_dim_major(x), self.merge_dst.forward_dim_major(x))]
        if self.attention == "mlp":
            if self.message == "nonlinear":
                h, alpha = self.sep_act.forward_parts(xs, edges.sh, edges.radial, extra=self.sep_alpha)
                alpha = alpha.reshape(alpha.shape[0], heads, self.mul_alpha_head)  # [E, H, C]
                value = [self._heads(p, heads) for p in self.sep_value.forward_parts(h, edges.sh, None)[0]]
            else:
                parts = [self._heads(p, heads) for p in self.sep.forward_parts(xs, edges.sh, edges.radial)[0]]
                c = self.mul_alpha_head
                alpha = parts[0][:, 0, :, :c]  # [E, H, C]: each head's first C scalars, as Vec2Heads + narrow
                value = [parts[0][:, :, :, c:]] + parts[1:]
            logits = (self.alpha_act(alpha) * self.alpha_dot).sum(-1)  # [E, H]
        else:
            if self.message == "nonlinear":
                kv = self.sep_value.forward_parts(
                    self.sep_act.forward_parts(xs, edges.sh, edges.radial)[0], edges.sh, None
                )[0]
            else:
                kv = self.key_value.forward_parts(xs, edges.sh, edges.radial)[0]
            kv = [self._heads(p, 2 * heads) for p in kv]  # [E, d, 2H, m]
            q = self.vec2heads_q(self.query(x)) * self.query_scale  # [N, H, head]
            sizes = [mul * ir.dim for mul, ir in self.irreps_head]
            q = [p.view(num_nodes, heads, mul, ir.dim).permute(0, 3, 1, 2)
                 for p, (mul, ir) in zip(q.split(sizes, dim=2), self.irreps_head)]  # [N, d, H, m]
            q_edges = gather(cat([flat(p) for p in q], dim=1), dst)  # [E, sum d H m]
            logits = None
            for qe, p, k in zip(q_edges.split([math.prod(p.shape[1:]) for p in q], dim=1), q, kv):
                term = (qe.view(qe.shape[0], *p.shape[1:]) * k[:, :, :heads]).sum((1, 3))  # [E, H]
                logits = term if logits is None else logits + term
            value = [p[:, :, heads:] for p in kv]
        return self._aggregate(logits, value, dst, num_nodes, edges)

    def _attention_weights(self, logits: torch.Tensor, dst: torch.Tensor, num_nodes: int, edges) -> torch.Tensor:
        """[E, H]: the softmax of ``logits`` over each target's edges (weighted by the cutoff envelope
        when smooth, then times it again), with attention dropout."""
        env = edges.envelope if self.smooth else None
        alpha = scatter_softmax(logits, dst, num_nodes, weight=env)  # [E, H]
        if self.alpha_dropout is not None:
            alpha = self.alpha_dropout(alpha)
        if env is not None:
            alpha = alpha * env.unsqueeze(-1)
        return alpha

    def _aggregate(
        self,
        logits: torch.Tensor,
        value: list[torch.Tensor],
        dst: torch.Tensor,
        num_nodes: int,
        edges,
    ) -> torch.Tensor:
        """Softmax over each target's edges, the weighted values summed into the atoms ([N, d, H, m]
        parts), then back to e3nn's layout of the heads (Heads2Vec) and the output projection."""
        alpha = self._attention_weights(logits, dst, num_nodes, edges).unsqueeze(1).unsqueeze(-1)  # [E, 1, H, 1]
        out = [flat(scatter_sum(v * alpha, dst, num_nodes).permute(0, 2, 3, 1)) for v in value]
        out = self.proj(cat(out, dim=1))
        if self.proj_drop is not None:
            out = self.proj_drop(out)
        return out

    def forward_modules(self, x: torch.Tensor, node_attr: torch.Tensor, edges) -> torch.Tensor:
        """Module by module in e3nn's layout (the oracle of :meth:`forward_fused`);
        x: [N, irreps_in.dim] -> [N, irreps_out.dim]."""
        src, dst = edges.index[0], edges.index[1]
        num_nodes = x.shape[0]
        message = gather(self.merge_src(x), src) + gather(self.merge_dst(x), dst)  # [E, pre_attn]

        if self.attention == "mlp":
            if self.message == "nonlinear":
                weight = self.sep_act.rad(edges.radial)
                message = self.sep_act.dtp(message, edges.sh, weight)
                alpha = self.vec2heads_alpha(self.sep_alpha(message))  # [E, H, C]
                value = self.sep_act.gate(self.sep_act.lin(message))
                value = self.vec2heads_value(self.sep_value(value, edges.sh, None))  # [E, H, head]
            else:
                message = self.vec2heads(self.sep(message, edges.sh, edges.radial))
                alpha = message.narrow(2, 0, self.mul_alpha_head)
                value = message.narrow(2, self.mul_alpha_head, message.shape[2] - self.mul_alpha_head)
            logits = (self.alpha_act(alpha) * self.alpha_dot).sum(-1)  # [E, H]
        else:
            q = self.vec2heads_q(self.query(x)) * self.query_scale  # [N, H, head]
            if self.message == "nonlinear":
                kv = self.sep_value(self.sep_act(message, edges.sh, edges.radial), edges.sh, None)
            else:
                kv = self.key_value(message, edges.sh, edges.radial)
            kv = self.vec2heads_kv(kv)  # [E, 2H, head]
            k = kv.narrow(1, 0, self.num_heads)
            value = kv.narrow(1, self.num_heads, self.num_heads)
            logits = (gather(q, dst) * k).sum(-1)  # [E, H]

        alpha = self._attention_weights(logits, dst, num_nodes, edges)
        attn = value * alpha.unsqueeze(-1)  # [E, H, head]
        out = scatter_sum(attn, dst, num_nodes)  # [N, H, head]
        out = self.proj(self.heads2vec(out))
        if self.proj_drop is not None:
            out = self.proj_drop(out)
        return out

    def extra_repr(self) -> str:
        return f"attention={self.attention}, message={self.message}, heads={self.num_heads}, smooth={self.smooth}"
