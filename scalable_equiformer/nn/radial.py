"""Radial basis functions of the edge length, smooth cutoff envelopes, and the radial MLP.

``RadialEmbedding`` returns ``(radial, envelope)``: ``radial`` [E, num_radial] is the basis times
the envelope, ``envelope`` [E] goes to 0 (with zero slope) at the cutoff and is 0 beyond it.

* ``exp_normal``: TorchMD-Net's ExpNormalSmearing with its cosine cutoff (the original
  Equiformer MD17 models, ``basis_type='exp'``); fixed means/betas (buffers, no parameters).
* ``gaussian``: Graphormer's Gaussian layer as in the original (trainable mean, std, affine).
  The original applies no envelope; here the cosine envelope is applied so the energy is smooth.
* ``bessel``: GemNet's spherical Bessel basis (trainable frequencies) with its polynomial
  envelope (exponent 5), as the original's ``basis_type='bessel'`` (ocpmodels ``RadialBasis``).
"""

from __future__ import annotations

import math

import torch
from e3nn import o3

from .precision import fp32_island

RADIAL_BASES = ("exp_normal", "gaussian", "bessel")


class CosineCutoff(torch.nn.Module):
    """``0.5 (cos(pi r / c) + 1)`` for r < c, else 0 (TorchMD-Net; C1 at the cutoff)."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        env = 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0)
        return env * (r < self.cutoff).to(r.dtype)


class PolynomialEnvelope(torch.nn.Module):
    """GemNet's polynomial envelope of exponent p (C2 at the cutoff)."""

    def __init__(self, cutoff: float, exponent: int = 5) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        p = exponent
        self.p = p
        self.a = -(p + 1) * (p + 2) / 2
        self.b = p * (p + 2)
        self.c = -p * (p + 1) / 2

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = r / self.cutoff
        env = 1 + self.a * x**self.p + self.b * x ** (self.p + 1) + self.c * x ** (self.p + 2)
        return torch.where(x < 1, env, torch.zeros_like(env))


class ExpNormalBasis(torch.nn.Module):
    """``exp(-beta_k (exp(-alpha r) - mu_k)^2)``, alpha = 5 / cutoff (TorchMD-Net, PhysNet init)."""

    def __init__(self, num_radial: int, cutoff: float) -> None:
        super().__init__()
        self.num_radial = num_radial
        self.cutoff = float(cutoff)
        self.alpha = 5.0 / self.cutoff
        start = math.exp(-self.cutoff)
        self.register_buffer(
            "means", torch.linspace(start, 1.0, num_radial, dtype=torch.float64).to(torch.get_default_dtype())
        )
        beta = (2.0 / num_radial * (1.0 - start)) ** -2
        self.register_buffer("betas", torch.full((num_radial,), beta, dtype=torch.get_default_dtype()))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return torch.exp(-self.betas * (torch.exp(-self.alpha * r) - self.means) ** 2)


class GaussianBasis(torch.nn.Module):
    """Graphormer's Gaussian basis on r / cutoff with trainable means, widths and an affine map."""

    def __init__(self, num_radial: int, cutoff: float) -> None:
        super().__init__()
        self.num_radial = num_radial
        self.cutoff = float(cutoff)
        self.mean = torch.nn.Parameter(torch.empty(1, num_radial).uniform_(0.0, 1.0))
        self.std = torch.nn.Parameter(torch.empty(1, num_radial).uniform_(1.0 / num_radial, 1.0))
        self.weight = torch.nn.Parameter(torch.ones(1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(1, 1))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = (r / self.cutoff).unsqueeze(-1) * self.weight + self.bias
        std = self.std.abs() + 1e-5
        return torch.exp(-0.5 * ((x - self.mean) / std) ** 2) / (math.sqrt(2 * math.pi) * std)


class BesselBasis(torch.nn.Module):
    """GemNet's spherical Bessel basis (l = 0): ``sqrt(2/c^3) sin(f_k r/c) / (r/c)``, f_k = k pi."""

    def __init__(self, num_radial: int, cutoff: float) -> None:
        super().__init__()
        self.num_radial = num_radial
        self.cutoff = float(cutoff)
        self.norm_const = math.sqrt(2.0 / self.cutoff**3)
        self.frequencies = torch.nn.Parameter(
            math.pi * torch.arange(1, num_radial + 1, dtype=torch.get_default_dtype())
        )

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = (r / self.cutoff).unsqueeze(-1)
        return self.norm_const / x * torch.sin(self.frequencies * x)


class RadialEmbedding(torch.nn.Module):
    """Edge length [E] -> ``(radial [E, num_radial] = basis * envelope, envelope [E])``."""

    def __init__(self, num_radial: int, cutoff: float, basis: str = "exp_normal") -> None:
        super().__init__()
        if basis not in RADIAL_BASES:
            raise ValueError(f"radial_basis must be one of {RADIAL_BASES}, got {basis!r}")
        self.num_radial = num_radial
        self.cutoff = float(cutoff)
        self.basis_name = basis
        self.irreps_in = o3.Irreps("1x0e")  # the edge length
        self.irreps_out = o3.Irreps(f"{num_radial}x0e")
        if basis == "exp_normal":
            self.basis = ExpNormalBasis(num_radial, cutoff)
            self.envelope = CosineCutoff(cutoff)
        elif basis == "gaussian":
            self.basis = GaussianBasis(num_radial, cutoff)
            self.envelope = CosineCutoff(cutoff)
        else:
            self.basis = BesselBasis(num_radial, cutoff)
            self.envelope = PolynomialEnvelope(cutoff, exponent=5)

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        env = self.envelope(r)  # [E]
        return self.basis(r) * env.unsqueeze(-1), env

    def extra_repr(self) -> str:
        return f"basis={self.basis_name}, num_radial={self.num_radial}, cutoff={self.cutoff}"


class RadialProfile(torch.nn.Module):
    """The original's radial MLP: (Linear, LayerNorm, SiLU) x hidden, then Linear without bias
    plus a learned ``offset``. Produces the per-edge weights of a depth-wise tensor product.

    Hidden Linear biases start at 0 and LayerNorms at (1, 0), as the original's ``_init_weights``;
    ``offset`` starts uniform in +-1/sqrt(fan_in).
    """

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"RadialProfile needs at least [in, out] channels, got {channels}")
        layers: list[torch.nn.Module] = []
        for i in range(1, len(channels)):
            last = i == len(channels) - 1
            lin = torch.nn.Linear(channels[i - 1], channels[i], bias=not last)
            if lin.bias is not None:
                torch.nn.init.zeros_(lin.bias)
            layers.append(lin)
            if not last:
                layers.append(torch.nn.LayerNorm(channels[i]))
                layers.append(torch.nn.SiLU())
        self.net = torch.nn.Sequential(*layers)
        bound = 1.0 / math.sqrt(channels[-2]) if channels[-2] > 0 else 0.0
        self.offset = torch.nn.Parameter(torch.empty(channels[-1]).uniform_(-bound, bound))
        self.channels = list(channels)

    @fp32_island(only=torch.float16)  # memory.precision=fp16: its layer norm's double backward overflows fp16
    def forward(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        # x: [E, channels[0]] -> [E, channels[-1]]; with ``columns`` (long [K]) only those output
        # columns, in that order: [E, K] (the last layer's rows are picked, not its [E, K] output)
        if columns is None:
            return self.net(x) + self.offset
        h = self.net[:-1](x)
        last = self.net[-1]
        weight, offset = last.weight.index_select(0, columns), self.offset.index_select(0, columns)
        return torch.nn.functional.linear(h, weight) + offset

    @torch.no_grad()
    def scale_output_(self, sl: slice, factor: float) -> None:
        """Multiply the output rows ``sl`` (weights and offset) by ``factor`` (rescale init)."""
        self.net[-1].weight[sl, :] *= factor
        self.offset[sl] *= factor
