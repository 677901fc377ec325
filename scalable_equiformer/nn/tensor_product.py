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
        n = x.shape[0]
        # split (not narrow): its backward is one cat, where each narrow's backward fills a full-size zero tensor
        chunks = x.split(self._in_sizes, dim=1) if len(self._in_sizes) > 1 else (x,)
        outs = []
        for inputs, offset, fan_in, mul_out, d, b0 in self._plan:
            if fan_in == 0:
                out = x.new_zeros(n, mul_out * d)
            else:
                w = self.weight.narrow(0, offset, fan_in * mul_out).view(fan_in, mul_out)
                xi = chunks[inputs[0]] if len(inputs) == 1 else torch.cat([chunks[i] for i in inputs], dim=1)
                if d == 1:
                    out = xi @ w  # [N, mul_out]
                else:
                    xi = xi.reshape(n, fan_in, d).transpose(1, 2)  # [N, d, fan_in]
                    out = (xi @ w).transpose(1, 2).reshape(n, mul_out * d)
            if attr is not None:
                out = out * attr
            if b0 >= 0:
                out = out + self.bias[b0 : b0 + mul_out]
            outs.append(out)
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, weights={self.weight_numel}, bias={self.bias is not None}"


class DepthwiseTensorProduct(torch.nn.Module):
    """Depth-wise (``'uvu'``) tensor product of node features with edge spherical harmonics.

    Every input channel meets every harmonic; each product type that is ``0e`` or present in
    ``irreps_filter`` becomes its own output block (so each path has fan-in 1 and the original's
    rescale factor is 1). Outputs are sorted even-first; ``irreps_out`` is that sorted, unsimplified
    list (its layout equals ``irreps_out.simplify()``). Weights are per edge (``weight`` argument,
    [E, weight_numel]) or internal and shared (``internal_weights=True``, init ``randn``).
    """

    def __init__(self, irreps_in, irreps_edge, irreps_filter, internal_weights: bool = False) -> None:
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

    def forward(self, x: torch.Tensor, edge_sh: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        # x: [E, irreps_in.dim], edge_sh: [E, irreps_edge.dim], weight: [E, weight_numel] -> [E, irreps_out.dim]
        return self.tp(x, edge_sh, weight)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} x {self.irreps_edge} -> {self.irreps_out.simplify()}, weights={self.weight_numel}"


class SeparableFCTP(torch.nn.Module):
    """Depth-wise TP (weights from a radial MLP, or internal) -> equivariant linear -> [gate].

    ``radial_channels`` = ``[num_radial, *hidden]`` builds the radial MLP; ``None`` uses internal
    weights (the original's ``fc_neurons=None``). With ``use_activation`` the linear layer maps to
    the gate's input irreps and the gate gives ``irreps_out``.
    """

    def __init__(self, irreps_in, irreps_edge, irreps_out, radial_channels: list[int] | None, use_activation: bool = False) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_edge = o3.Irreps(irreps_edge)
        self.irreps_out = o3.Irreps(irreps_out)
        self.dtp = DepthwiseTensorProduct(self.irreps_in, self.irreps_edge, self.irreps_out, internal_weights=radial_channels is None)
        self.rad = RadialProfile(list(radial_channels) + [self.dtp.weight_numel]) if radial_channels is not None else None
        self.gate = Gate(self.irreps_out) if use_activation else None
        lin_out = self.gate.irreps_in if self.gate is not None else self.irreps_out
        self.lin = EquivariantLinear(self.dtp.irreps_out.simplify(), lin_out)

    def forward(self, x: torch.Tensor, edge_sh: torch.Tensor, edge_radial: torch.Tensor | None) -> torch.Tensor:
        # x: [E, irreps_in.dim] -> [E, irreps_out.dim]
        weight = self.rad(edge_radial) if self.rad is not None else None
        out = self.lin(self.dtp(x, edge_sh, weight))
        if self.gate is not None:
            out = self.gate(out)
        return out
