"""Regularisers of the original: equivariant dropout (whole irreps) and graph drop-path."""

from __future__ import annotations

import torch
from e3nn import o3


class EquivariantDropout(torch.nn.Module):
    """Drop whole irreps (all components of a channel together), rescaling by 1/(1-p)."""

    def __init__(self, irreps, p: float) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps)
        self.irreps_out = self.irreps_in
        self.p = float(p)
        blocks = zip(self.irreps_in, _offsets(self.irreps_in))
        idx = torch.cat([torch.arange(mul).repeat_interleave(ir.dim) + off for (mul, ir), off in blocks])
        self.register_buffer("component_to_irrep", idx, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = torch.nn.functional.dropout(x.new_ones(x.shape[0], self.irreps_in.num_irreps), self.p, True)
        return x * mask[:, self.component_to_irrep]

    def extra_repr(self) -> str:
        return f"{self.irreps_in}, p={self.p}"


def _offsets(irreps: o3.Irreps) -> list[int]:
    out, n = [], 0
    for mul, _ in irreps:
        out.append(n)
        n += mul
    return out


class GraphDropPath(torch.nn.Module):
    """Stochastic depth per molecule: a residual branch is dropped for a whole graph at once."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor, batch: torch.Tensor | None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if batch is None:
            batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        num_graphs = int(batch.max()) + 1 if batch.numel() else 1
        keep = 1.0 - self.p
        mask = torch.floor(keep + torch.rand(num_graphs, dtype=x.dtype, device=x.device)) / keep
        return x * mask[batch].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"p={self.p}"
