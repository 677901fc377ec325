"""Equiformer transformer block: pre-norm attention and feed-forward, residuals, drop-path."""

from __future__ import annotations

import torch
from e3nn import o3

from .attention import GraphAttention
from .drop import EquivariantDropout, GraphDropPath
from .gate import Gate
from .norm import EquivariantLayerNorm
from .tensor_product import EquivariantLinear


def _check_scalar_attr(irreps_node_attr: o3.Irreps) -> None:
    if irreps_node_attr != o3.Irreps("1x0e"):
        raise ValueError(f"node attributes must be 1x0e (a per-atom scalar), got {irreps_node_attr}")


class FeedForwardNetwork(torch.nn.Module):
    """FCTP(x, attr) -> gate -> FCTP(., attr), as the original's ``FeedForwardNetwork``.

    With the ``1x0e`` node attribute an FCTP is a linear layer times that scalar plus a bias on
    the even scalars (:class:`EquivariantLinear` with ``attr``).
    """

    def __init__(
        self,
        irreps_node_input,
        irreps_node_attr,
        irreps_node_output,
        irreps_mlp_mid=None,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_node_input)
        self.irreps_node_attr = o3.Irreps(irreps_node_attr)
        _check_scalar_attr(self.irreps_node_attr)
        self.irreps_mlp_mid = o3.Irreps(irreps_mlp_mid) if irreps_mlp_mid is not None else self.irreps_in
        self.irreps_out = o3.Irreps(irreps_node_output)
        self.gate = Gate(self.irreps_mlp_mid)
        self.fctp_1 = EquivariantLinear(self.irreps_in, self.gate.irreps_in)
        self.fctp_2 = EquivariantLinear(self.gate.irreps_out, self.irreps_out)
        self.proj_drop = EquivariantDropout(self.irreps_out, proj_drop) if proj_drop > 0 else None

    def forward(self, x: torch.Tensor, node_attr: torch.Tensor) -> torch.Tensor:
        # x: [N, irreps_in.dim], node_attr: [N, 1] -> [N, irreps_out.dim]
        out = self.gate(self.fctp_1(x, node_attr))
        out = self.fctp_2(out, node_attr)
        if self.proj_drop is not None:
            out = self.proj_drop(out)
        return out


class TransformerBlock(torch.nn.Module):
    """``x + attn(norm_1(x))``, then ``shortcut(x) + ffn(norm_2(x))`` (pre-norm), with drop-path.

    ``forward(x, node_attr, edges, batch=None)``: ``x`` [N, irreps_in.dim], ``node_attr`` [N, 1]
    (ones), ``edges`` an ``EdgeFeatures``; ``batch`` [N] is only read by drop-path in training
    (``None`` = one molecule). When ``irreps_out != irreps_in`` (the last block) the residual of
    the feed-forward goes through a linear shortcut, as the original.
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
        drop_path: float = 0.0,
        irreps_mlp_mid=None,
        smooth: bool = True,
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_node_input)
        self.irreps_node_attr = o3.Irreps(irreps_node_attr)
        _check_scalar_attr(self.irreps_node_attr)
        self.irreps_edge = o3.Irreps(irreps_edge)
        self.irreps_out = o3.Irreps(irreps_node_output)
        self.norm_1 = EquivariantLayerNorm(self.irreps_in)
        self.ga = GraphAttention(
            self.irreps_in,
            self.irreps_node_attr,
            self.irreps_edge,
            self.irreps_in,
            radial_channels,
            irreps_head,
            num_heads,
            irreps_pre_attn=irreps_pre_attn,
            attention=attention,
            message=message,
            alpha_drop=alpha_drop,
            proj_drop=proj_drop,
            smooth=smooth,
        )
        self.drop_path = GraphDropPath(drop_path) if drop_path > 0 else None
        self.norm_2 = EquivariantLayerNorm(self.irreps_in)
        self.ffn = FeedForwardNetwork(
            self.irreps_in, self.irreps_node_attr, self.irreps_out, irreps_mlp_mid, proj_drop=proj_drop
        )
        self.ffn_shortcut = (
            EquivariantLinear(self.irreps_in, self.irreps_out) if self.irreps_in != self.irreps_out else None
        )

    def forward(
        self,
        x: torch.Tensor,
        node_attr: torch.Tensor,
        edges,
        batch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.ga(self.norm_1(x), node_attr, edges)
        if self.drop_path is not None:
            h = self.drop_path(h, batch)
        x = x + h
        h = self.ffn(self.norm_2(x), node_attr)
        if self.ffn_shortcut is not None:
            x = self.ffn_shortcut(x, node_attr)
        if self.drop_path is not None:
            h = self.drop_path(h, batch)
        return x + h
