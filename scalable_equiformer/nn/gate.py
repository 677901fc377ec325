"""Activations on irreps: scalar activations and the gate (Weiler et al. 2018), as in Equiformer.

Every activation is rescaled to unit second moment under a standard normal input (e3nn's
``normalize2mom``), exactly as the original Equiformer's ``fast_activation`` does.
"""

from __future__ import annotations

import functools

import torch
from e3nn import o3
from e3nn.math import moment


class SmoothLeakyReLU(torch.nn.Module):
    """``x * ((1 + a)/2 + (1 - a)/2 * (2 sigmoid(x) - 1))``; the attention activation."""

    def __init__(self, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.alpha = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((1 + self.alpha) / 2) * x + ((1 - self.alpha) / 2) * x * (2 * torch.sigmoid(x) - 1)

    def extra_repr(self) -> str:
        return f"negative_slope={self.alpha}"


_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
    "smooth_leaky_relu": SmoothLeakyReLU(0.2),
}


@functools.lru_cache(maxsize=None)
def second_moment_constant(name: str) -> float:
    """``<f(z)^2>^(-1/2)`` for z ~ N(0, 1), computed once per activation (e3nn's estimator)."""
    with torch.no_grad():
        return float(moment(_ACTIVATIONS[name], 2, dtype=torch.float64, device="cpu").pow(-0.5))


class NormalizedActivation(torch.nn.Module):
    """A named scalar activation times its second-moment constant (a Python float, no state)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
        self.name = name
        self.fn = _ACTIVATIONS[name]
        self.cst = second_moment_constant(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.cst

    def extra_repr(self) -> str:
        return f"{self.name}, cst={self.cst:.6f}"


class ScalarActivation(torch.nn.Module):
    """One activation applied to irreps made only of even scalars (``Nx0e``)."""

    def __init__(self, irreps_in, act: str = "silu") -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        if any(ir.l != 0 or ir.p != 1 for _, ir in self.irreps_in):
            raise ValueError(f"ScalarActivation needs even scalars, got {self.irreps_in}")
        self.irreps_out = self.irreps_in
        self.act = NormalizedActivation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


def irreps2gate(irreps) -> tuple[o3.Irreps, o3.Irreps, o3.Irreps]:
    """Split output irreps into (scalars, gates, gated) as the original's ``irreps2gate``.

    Even scalars pass through SiLU; every other irrep is gated by one extra ``0e`` scalar.
    """
    irreps = o3.Irreps(irreps)
    scalars = o3.Irreps([(mul, ir) for mul, ir in irreps if ir.l == 0 and ir.p == 1]).simplify()
    gated = o3.Irreps([(mul, ir) for mul, ir in irreps if not (ir.l == 0 and ir.p == 1)]).simplify()
    gates = o3.Irreps([(mul, "0e") for mul, _ in gated]).simplify()
    return scalars, gates, gated


class Gate(torch.nn.Module):
    """Gate activation: ``[scalars | gates | gated] -> [silu(scalars) | sigmoid(gates) * gated]``.

    ``irreps_in`` is ``(scalars + gates + gated).simplify()`` (scalars and gates merge into one
    ``0e`` block, scalars first), ``irreps_out`` is ``scalars + gated``. With nothing to gate it
    is a plain SiLU on the scalars.
    """

    def __init__(self, irreps_out) -> None:
        super().__init__()
        scalars, gates, gated = irreps2gate(irreps_out)
        self.irreps_scalars, self.irreps_gates, self.irreps_gated = scalars, gates, gated
        self.irreps_in = (scalars + gates + gated).simplify()
        self.irreps_out = (scalars + gated).simplify()
        self.act_scalars = NormalizedActivation("silu")
        self.act_gates = NormalizedActivation("sigmoid")
        self._scalars_dim = scalars.dim
        self._gates_dim = gates.dim
        self._gated = [(mul, ir.dim) for mul, ir in gated]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, irreps_in.dim]
        n = x.shape[:-1]
        if self._gates_dim == 0:
            return self.act_scalars(x)
        sizes = [self._scalars_dim, self._gates_dim] + [mul * d for mul, d in self._gated]
        scalars, gates, *gated = x.split(sizes, dim=-1)
        gates = self.act_gates(gates).split([mul for mul, _ in self._gated], dim=-1)
        out = [self.act_scalars(scalars)]
        for (mul, d), field, gate in zip(self._gated, gated, gates):
            out.append((field.reshape(*n, mul, d) * gate.unsqueeze(-1)).reshape(*n, mul * d))
        return torch.cat(out, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}"
