"""Equivariant layer norm (the original's ``EquivariantLayerNormV2``, ``norm_layer='layer'``).

Per node and per irrep type: even scalars are centred over their channels; then each type is
divided by the root of its mean squared component (``normalization='component'``) plus eps,
scaled by one learned weight per channel; even scalars get a learned bias. Each node is
normalised on its own, so the result never depends on other nodes (batch- and
partition-invariant).
"""

from __future__ import annotations

import torch
from e3nn import o3

from .precision import fp32_island


class EquivariantLayerNorm(torch.nn.Module):
    def __init__(self, irreps, eps: float = 1e-5, affine: bool = True, normalization: str = "component"):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps)
        self.irreps_out = self.irreps_in
        self.eps = eps
        self.affine = affine
        if normalization not in ("component", "norm"):
            raise ValueError(f"normalization must be 'component' or 'norm', got {normalization!r}")
        self.normalization = normalization
        num_scalar = sum(mul for mul, ir in self.irreps_in if ir.l == 0 and ir.p == 1)
        if affine:
            self.affine_weight = torch.nn.Parameter(torch.ones(self.irreps_in.num_irreps))
            self.affine_bias = torch.nn.Parameter(torch.zeros(num_scalar))
        else:
            self.register_parameter("affine_weight", None)
            self.register_parameter("affine_bias", None)

    @fp32_island  # mixed precision: means of squares in fp32 (memory.precision)
    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # x: [N, irreps.dim]
        if x.shape[-1] != self.irreps_in.dim:
            raise ValueError(f"EquivariantLayerNorm({self.irreps_in}) got features of size {x.shape[-1]}")
        fields = []
        iw = ib = 0
        parts = x.split([mul * ir.dim for mul, ir in self.irreps_in], dim=-1)
        for (mul, ir), part in zip(self.irreps_in, parts):
            d = ir.dim
            field = part.reshape(-1, mul, d)  # [N, mul, d]
            scalar = ir.l == 0 and ir.p == 1
            if scalar:
                field = field - field.mean(dim=1, keepdim=True)
            sq = field.pow(2).mean(-1) if self.normalization == "component" else field.pow(2).sum(-1)
            inv = (sq.mean(dim=1, keepdim=True) + self.eps).pow(-0.5)  # [N, 1]
            if self.affine:
                inv = inv * self.affine_weight[None, iw : iw + mul]  # [N, mul]
                iw += mul
            field = field * inv.unsqueeze(-1)
            if self.affine and scalar:
                field = field + self.affine_bias[ib : ib + mul].reshape(mul, 1)
                ib += mul
            fields.append(field.reshape(-1, mul * d))
        return torch.cat(fields, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps_in}, eps={self.eps}"
