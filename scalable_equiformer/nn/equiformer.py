"""The Equiformer energy model, exposed as composable stages.

Stages (``model.forward`` is just these composed; ``nn/forces.py`` adds forces; graph
partitioning and force-aware checkpointing call them one by one):

    edge_index = model.build_graph(pos, batch)            # radius graph, no grad
    edges = model.edge_features(pos, edge_index)          # EdgeFeatures, differentiable in pos
    x = model.embed(z, edges, num_nodes)                  # [N, irreps_node.dim]
    node_attr = model.node_attr(x)                        # [N, 1] ones (the original's 1x0e)
    for block in model.blocks: x = block(x, node_attr, edges, batch)
    energy = model.readout(x, z, batch, num_graphs)       # [num_graphs] eV, float64

Edge convention: ``edge_index[0]`` = source j, ``edge_index[1]`` = target i (messages j -> i);
``edges.vec = pos[j] - pos[i]`` (the original's ``pos[edge_src] - pos[edge_dst]``). Every
aggregation scatters into targets only.

Energy: ``E = sum_i (scale * h_i / sqrt(avg_num_atoms) + shift)`` with ``h_i`` the head's output,
``scale`` (eV, force RMS of the training split) and ``shift`` (eV per atom) held in float64
buffers together with ``avg_num_neighbors`` and ``avg_num_atoms``; the sum runs in float64 so
large shifts keep meV precision in an fp32 model. ``readout`` on a subset of atoms returns that
subset's share, so partial energies add up.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from e3nn import o3

from .graph import radius_graph
from .block import TransformerBlock
from .forces import energy_and_forces
from .gate import ScalarActivation
from .norm import EquivariantLayerNorm
from .precision import fp32_island
from .radial import RadialEmbedding, RadialProfile
from .dim_major import cat, flat, fused_plan, fused_tp_linear, runs, to_dim_major, weight_perm
from .scatter import scatter_sum
from .tensor_product import DepthwiseTensorProduct, EquivariantLinear

_STAT_BUFFERS = ("energy_shift", "energy_scale", "avg_num_neighbors", "avg_num_atoms")


class EdgeFeatures(NamedTuple):
    """Per-edge inputs shared by all blocks. ``index`` [2, E] (source j, target i);
    ``vec`` [E, 3] = pos[j] - pos[i] (Å); ``length`` [E]; ``sh`` [E, irreps_sh.dim] (component
    normalised spherical harmonics of ``vec``); ``radial`` [E, num_radial] (basis x envelope);
    ``envelope`` [E] (smooth cutoff, 0 at and beyond the cutoff)."""

    index: torch.Tensor
    vec: torch.Tensor
    length: torch.Tensor
    sh: torch.Tensor
    radial: torch.Tensor
    envelope: torch.Tensor


class NodeEmbedding(torch.nn.Module):
    """One-hot atomic number [N, max_z] -> linear -> irreps_node (the original's weights start at randn)."""

    def __init__(self, irreps_node, max_atomic_number: int) -> None:
        super().__init__()
        self.max_atomic_number = max_atomic_number
        self.irreps_in = o3.Irreps(f"{max_atomic_number}x0e")
        self.irreps_out = o3.Irreps(irreps_node)
        self.lin = EquivariantLinear(self.irreps_in, self.irreps_out, bias=True)
        with torch.no_grad():
            self.lin.weight.mul_(max_atomic_number**0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # one-hot as a comparison: reads no values, so a traced graph (train.compile) stays free of
        # data-dependent checks; the range of z is checked by Equiformer.check_atomic_numbers
        elements = torch.arange(self.max_atomic_number, device=z.device)
        onehot = (z.unsqueeze(-1) == elements).to(self.lin.weight.dtype)
        return self.lin(onehot)


class EdgeDegreeEmbedding(torch.nn.Module):
    """``sum_{j->i} proj(DTP(lin(1), sh_ij; rad(radial_ij))) [* env_ij] / sqrt(avg_num_neighbors)``."""

    def __init__(self, irreps_node, irreps_sh, radial_channels: list[int], smooth: bool = True) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps("1x0e")
        self.irreps_out = o3.Irreps(irreps_node)
        self.smooth = smooth
        self.exp = EquivariantLinear(self.irreps_in, self.irreps_out, bias=True)
        self.dw = DepthwiseTensorProduct(self.irreps_out, irreps_sh, self.irreps_out, internal_weights=False)
        self.rad = RadialProfile(list(radial_channels) + [self.dw.weight_numel])
        self.proj = EquivariantLinear(self.dw.irreps_out.simplify(), self.irreps_out)
        # the fast path's fused DTP + linear (nn/dim_major.py); exp(1) has no l > 0 part (no inputs
        # feed it: exact zeros), so the tensor product's paths from those entries are left out
        zero = frozenset(j for j, entry in enumerate(self.exp._plan) if entry[2] == 0)
        self._plan = fused_plan(self.dw, self.proj, zero_inputs=zero)
        self.register_buffer("_weight_perm", weight_perm(self._plan), persistent=False)

    def forward(self, edges: EdgeFeatures, num_nodes: int, avg_num_neighbors: torch.Tensor) -> torch.Tensor:
        num_edges = edges.sh.shape[0]
        feat = self.exp(edges.sh.new_ones(1, 1))  # [1, irreps_node.dim]: the same on every edge
        scale = avg_num_neighbors.to(feat.dtype).sqrt()
        # fast path: dim-major, summed into the atoms irrep by irrep
        if runs(self._plan, self.dw):
            parts, _ = fused_tp_linear(self._plan, self.dw, self.proj, to_dim_major(feat, self.irreps_out), edges.sh,
                                       self.rad(edges.radial, self._weight_perm), self._weight_perm,
                                       shared_input=True)
            if self.smooth:
                parts = [p * edges.envelope.view(-1, 1, 1) for p in parts]
            agg = [flat(scatter_sum(p, edges.index[1], num_nodes).transpose(1, 2)) for p in parts]
            return cat(agg, dim=1) / scale
        out = self.proj(self.dw(feat.expand(num_edges, -1), edges.sh, self.rad(edges.radial)))
        if self.smooth:
            out = out * edges.envelope.unsqueeze(-1)
        agg = scatter_sum(out, edges.index[1], num_nodes)
        return agg / scale


class EnergyHead(torch.nn.Module):
    """norm -> linear -> SiLU -> linear to one scalar per atom (the original's head)."""

    def __init__(self, irreps_feature) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_feature)
        self.irreps_out = o3.Irreps("1x0e")
        self.norm = EquivariantLayerNorm(self.irreps_in)
        self.lin_1 = EquivariantLinear(self.irreps_in, self.irreps_in)
        self.act = ScalarActivation(self.irreps_in, "silu")
        self.lin_2 = EquivariantLinear(self.irreps_in, self.irreps_out)

    @fp32_island  # mixed precision: the energy head runs in fp32 (memory.precision)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, irreps_feature.dim] -> [N]
        return self.lin_2(self.act(self.lin_1(self.norm(x)))).squeeze(-1)


class Equiformer(torch.nn.Module):
    """Equiformer interatomic potential (Liao & Smidt, ICLR 2023). See the module docstring.

    The arguments are trusted: ``model.build_model`` checks them first by the config's rules
    (``config.ModelConfig.validate``), e.g. ``irreps_feature`` even scalars only (the energy head
    reads scalars). They are keyword-only and have no defaults: the one default of each model option
    is :class:`~scalable_equiformer.config.ModelConfig`'s."""

    def __init__(
        self,
        *,
        irreps_node: str,
        lmax: int,
        num_blocks: int,
        num_heads: int,
        irreps_head: str,
        irreps_feedforward: str,
        irreps_feature: str,
        num_radial: int,
        radial_basis: str,
        radial_hidden: list[int] | tuple[int, ...],
        cutoff: float,
        attention: str,
        message: str,
        alpha_drop: float,
        proj_drop: float,
        drop_path: float,
        max_atomic_number: int,
        avg_num_neighbors: float,
        avg_num_atoms: float,
        energy_shift: float,
        energy_scale: float,
        smooth_cutoff: bool,
    ) -> None:
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax, p=1)  # 1x0e+1x1e+...: even parity, as the MD17 models
        self.irreps_feature = o3.Irreps(irreps_feature)
        self.irreps_node_attr = o3.Irreps("1x0e")
        self.irreps_in = o3.Irreps(f"{max_atomic_number}x0e")
        self.irreps_out = o3.Irreps("1x0e")
        self.lmax = lmax
        self.num_blocks = num_blocks
        self.cutoff = float(cutoff)
        self.max_atomic_number = max_atomic_number
        self.attention = attention
        self.message = message
        self.smooth_cutoff = smooth_cutoff

        radial_channels = [num_radial] + list(radial_hidden)
        self.radial = RadialEmbedding(num_radial, cutoff, radial_basis)
        self.atom_embed = NodeEmbedding(self.irreps_node, max_atomic_number)
        self.edge_deg_embed = EdgeDegreeEmbedding(
            self.irreps_node, self.irreps_sh, radial_channels, smooth=smooth_cutoff
        )
        block_options = dict(attention=attention, message=message, alpha_drop=alpha_drop, proj_drop=proj_drop,
                             drop_path=drop_path, irreps_mlp_mid=irreps_feedforward, smooth=smooth_cutoff)
        self.blocks = torch.nn.ModuleList(
            self._block(i, radial_channels, irreps_head, num_heads, block_options) for i in range(num_blocks)
        )
        self.head = EnergyHead(self.irreps_feature)
        for name, value in zip(_STAT_BUFFERS, (energy_shift, energy_scale, avg_num_neighbors, avg_num_atoms)):
            self.register_buffer(name, torch.tensor(float(value), dtype=torch.float64))

    def _block(self, i: int, radial_channels: list[int], irreps_head, num_heads: int,
               options: dict) -> TransformerBlock:
        """Block ``i``: node irreps in and out, except the last, which maps to ``irreps_feature``."""
        out = self.irreps_feature if i == self.num_blocks - 1 else self.irreps_node
        return TransformerBlock(self.irreps_node, self.irreps_node_attr, self.irreps_sh, out, radial_channels,
                                irreps_head, num_heads, **options)

    # -- dtype / statistics -------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        saved = {name: self._buffers[name] for name in _STAT_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in saved.items():  # statistics stay float64 (unrounded) whatever the model dtype
            moved = self._buffers[name]
            self._buffers[name] = old.to(device=moved.device, dtype=torch.float64)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.atom_embed.lin.weight.dtype

    def set_statistics(
        self,
        energy_shift: float,
        energy_scale: float,
        avg_num_neighbors: float,
        avg_num_atoms: float,
    ) -> None:
        for name, value in zip(_STAT_BUFFERS, (energy_shift, energy_scale, avg_num_neighbors, avg_num_atoms)):
            if not math.isfinite(float(value)):
                raise ValueError(f"statistic {name} must be finite, got {value}")
            self._buffers[name].fill_(float(value))

    def statistics(self) -> dict[str, float]:
        """The normalisation constants in use: {energy_shift eV/atom, energy_scale eV,
        avg_num_neighbors, avg_num_atoms}."""
        return {name: float(self._buffers[name]) for name in _STAT_BUFFERS}

    # -- stages -------------------------------------------------------------------------------

    def build_graph(self, pos: torch.Tensor, batch: torch.Tensor | None) -> torch.Tensor:
        """Radius graph [2, E] (source, target) within ``cutoff``, never across molecules; no grad."""
        with torch.no_grad():
            return radius_graph(pos.detach(), self.cutoff, batch)

    def edge_features(self, pos: torch.Tensor, edge_index: torch.Tensor) -> EdgeFeatures:
        src, dst = edge_index[0], edge_index[1]
        vec = pos.index_select(0, src) - pos.index_select(0, dst)  # [E, 3]
        length = vec.norm(dim=-1)  # [E]
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        radial, envelope = self.radial(length)
        return EdgeFeatures(edge_index, vec, length, sh, radial, envelope)

    def node_attr(self, x: torch.Tensor) -> torch.Tensor:
        """The original's node attribute: a constant ``1x0e`` per atom, [N, 1]."""
        return x.new_ones(x.shape[0], 1)

    def check_atomic_numbers(self, z: torch.Tensor) -> None:
        """ValueError unless every atomic number lies in [0, max_atomic_number) (reads values)."""
        if z.numel() and (int(z.min()) < 0 or int(z.max()) >= self.max_atomic_number):
            raise ValueError(f"atomic numbers must lie in [0, {self.max_atomic_number}) (model.max_atomic_number); "
                             f"got {int(z.min())}..{int(z.max())}")

    def embed(self, z: torch.Tensor, edges: EdgeFeatures, num_nodes: int, check: bool = True) -> torch.Tensor:
        """Atom embedding + edge-degree embedding, [num_nodes, irreps_node.dim]. Exact for every
        node whose incoming edges are all in ``edges``. ``check=False`` skips
        :meth:`check_atomic_numbers` (a caller that checked already, or a trace that must not read values)."""
        if check:
            self.check_atomic_numbers(z)
        return self.atom_embed(z) + self.edge_deg_embed(edges, num_nodes, self.avg_num_neighbors)

    def readout(self, x: torch.Tensor, z: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """Energy per graph [num_graphs] (eV, float64) of the atoms given; a subset gives its share."""
        h = self.head(x).to(torch.float64)  # [N]
        e_atom = h * (self.energy_scale / self.avg_num_atoms.sqrt()) + self.energy_shift
        return torch.zeros(num_graphs, dtype=torch.float64, device=x.device).index_add(0, batch, e_atom)

    def energy(self, pos: torch.Tensor, z: torch.Tensor, batch: torch.Tensor, num_graphs: int,
               edge_index: torch.Tensor | None = None, run_block=None, check: bool = True) -> torch.Tensor:
        """All stages composed: energy per graph [num_graphs] eV (float64).

        ``run_block(block, x, node_attr, edges, batch)`` runs each block (default: a plain call);
        the per-block checkpointing lever passes a checkpointing runner here. ``check``: see :meth:`embed`.
        """
        if edge_index is None:
            edge_index = self.build_graph(pos, batch)
        edges = self.edge_features(pos, edge_index)
        x = self.embed(z, edges, pos.shape[0], check=check)
        node_attr = self.node_attr(x)
        for block in self.blocks:
            x = block(x, node_attr, edges, batch) if run_block is None else run_block(block, x, node_attr, edges, batch)
        return self.readout(x, z, batch, num_graphs)

    def forward(self, batch, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        """``{"energy": [B] eV (float64), "forces": [N, 3] eV/Å (model dtype)}`` by plain autograd:
        the oracle of the memory levers (``memory.ForceRunner`` runs them)."""
        return energy_and_forces(self, batch, training=self.training, compute_forces=compute_forces)

    def extra_repr(self) -> str:
        return (f"cutoff={self.cutoff}, lmax={self.lmax}, attention={self.attention}, message={self.message}, "
                f"smooth_cutoff={self.smooth_cutoff}")
