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
    """The per-type sums and broadcasts are a few matmuls with constant indicator matrices (one op
    each for all irrep types, where a loop over the types took ~40 small ops per call, most of a
    step's node-level work in the forward and both backward passes)."""

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
        self._build_constants(num_scalar)

    def _build_constants(self, num_scalar: int) -> None:
        """Indicator matrices and index maps of the layout (non-persistent buffers: the state_dict is unchanged)."""
        dim, n = self.irreps_in.dim, len(self.irreps_in)
        scalars = [k for k, (_, ir) in enumerate(self.irreps_in) if ir.l == 0 and ir.p == 1]
        mean_sq = torch.zeros(dim, n, dtype=torch.float64)  # sum of squares of an entry -> its mean square
        expand = torch.zeros(n, dim, dtype=torch.float64)  # per entry -> its positions
        centre = torch.zeros(dim, len(scalars), dtype=torch.float64)  # a scalar entry's channel mean
        w_index, b_index = [], []
        iw = ib = 0
        for k, ((mul, ir), sl) in enumerate(zip(self.irreps_in, self.irreps_in.slices())):
            mean_sq[sl, k] = 1.0 / (mul * ir.dim) if self.normalization == "component" else 1.0 / mul
            expand[k, sl] = 1.0
            if k in scalars:
                centre[sl, scalars.index(k)] = 1.0 / mul
            w_index += [iw + c for c in range(mul) for _ in range(ir.dim)]
            b_index += [ib + c for c in range(mul)] if k in scalars else [num_scalar] * (mul * ir.dim)
            iw += mul
            ib += mul if k in scalars else 0
        self.register_buffer("_mean_sq", mean_sq, persistent=False)
        self.register_buffer("_expand", expand, persistent=False)
        self.register_buffer("_centre", centre, persistent=False)
        self.register_buffer("_centre_expand", expand[scalars].clone(), persistent=False)
        self.register_buffer("_w_index", torch.tensor(w_index, dtype=torch.long), persistent=False)
        self.register_buffer("_b_index", torch.tensor(b_index, dtype=torch.long), persistent=False)

    @fp32_island  # mixed precision: means of squares in fp32 (memory.precision)
    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # x: [N, irreps.dim]
        if x.shape[-1] != self.irreps_in.dim:
            raise ValueError(f"EquivariantLayerNorm({self.irreps_in}) got features of size {x.shape[-1]}")
        dt = x.dtype
        if self._centre.shape[1]:  # even scalars centred over their channels
            x = x - (x @ self._centre.to(dt)) @ self._centre_expand.to(dt)
        sq = (x * x) @ self._mean_sq.to(dt)  # [N, entries]: mean square per irrep type
        inv = (sq + self.eps).pow(-0.5) @ self._expand.to(dt)  # [N, dim]
        if self.affine:
            inv = inv * self.affine_weight.index_select(0, self._w_index)
        out = x * inv
        if self.affine and self.affine_bias.numel():
            out = out + torch.cat([self.affine_bias, self.affine_bias.new_zeros(1)]).index_select(0, self._b_index)
        return out

    def extra_repr(self) -> str:
        return f"{self.irreps_in}, eps={self.eps}"
