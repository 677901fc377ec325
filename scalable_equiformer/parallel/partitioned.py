"""The same Equiformer over the P ranks of a partition group (see :mod:`scalable_equiformer.parallel`)."""

from __future__ import annotations

import contextlib
import time
import types
import warnings

import torch
import torch.distributed as dist

from ..config import check_memory_levers
from ..nn.force_checkpoint import blockwise_sweep, checkpointed_call, edge_chunks, node_attr_once
from ..nn.forces import prepare_inputs
from .halo import halo_exchange, sum_replicated
from .partition import GraphPartition, LocalPart, partition_graph

__all__ = [
    "PartitionedModel",
    "make_groups",
    "check_layout",
    "allreduce_gradients",
    "gradient_scale",
    "group_rank",
    "group_size",
]


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def check_layout(world_size: int, partitions: int, local_world_size: int | None = None) -> None:
    """ConfigError unless ``partitions`` (P) divides the world and, on more than one node, the
    ranks per node (``local_world_size``). torchrun and DeepSpeed give node ``i`` the consecutive
    global ranks ``i*L .. i*L + L - 1``, so with P dividing L every partition group of
    :func:`make_groups` (P consecutive ranks) sits on one node and halo traffic stays on it."""
    from ..errors import ConfigError

    if partitions < 1 or world_size % partitions:
        raise ConfigError(f"parallel.graph_partitions={partitions} must divide the number of ranks ({world_size})")
    local = world_size if local_world_size is None else local_world_size
    if local < world_size and local % partitions:
        raise ConfigError(f"parallel.graph_partitions={partitions} must divide the ranks per node ({local}, "
                          f"LOCAL_WORLD_SIZE) on a multi-node run, so that a molecule's partitions sit on one node")


def make_groups(world_size: int, partitions: int):
    """``(data_parallel_group, partition_group)`` of this rank for a world of D x P ranks.

    Ranks ``d*P .. d*P + P - 1`` share one molecule (partition group ``d``: on one node when P
    divides the ranks per node, :func:`check_layout`); ranks
    ``p, p + P, p + 2P, ...`` form data-parallel group ``p``. Every rank must call this (it
    creates all groups, in the same order everywhere). The data-parallel rank that picks this
    rank's batch is ``rank // P``: all ranks of a partition group must be fed the same batch.
    """
    if partitions < 1 or world_size % partitions:
        raise ValueError(
            f"parallel.graph_partitions={partitions} must divide the world size {world_size}"
        )
    rank = dist.get_rank()
    D = world_size // partitions
    dp_group = part_group = None
    for p in range(partitions):
        g = dist.new_group([d * partitions + p for d in range(D)])
        if rank % partitions == p:
            dp_group = g
    for d in range(D):
        g = dist.new_group([d * partitions + p for p in range(partitions)])
        if rank // partitions == d:
            part_group = g
    return dp_group, part_group


def gradient_scale(partition_group=None) -> int:
    """Factor to multiply the loss by when gradients are then *averaged* over all D x P ranks
    (DeepSpeed, DDP): each rank holds a partial gradient, whose sum over the partition group is
    the molecule's gradient, so the average over D x P ranks needs a factor P to equal the
    average over the D data-parallel batches."""
    return group_size(partition_group)


def allreduce_gradients(parameters, partition_group=None) -> None:
    """Sum each parameter's partial gradient over the partition group (plain torch, no DP
    averaging): afterwards every rank holds the gradient a single process would compute."""
    if group_size(partition_group) == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=partition_group)


class PartitionedModel(torch.nn.Module):
    """Run ``model`` (an :class:`~scalable_equiformer.nn.equiformer.Equiformer`, or anything with
    its stage API) over the ranks of ``group``, one part of the graph per rank.

    ``forward(batch, compute_forces=True)`` returns the model's dict: ``energy`` [B] (float64,
    replicated on every rank of the group) and ``forces`` [N, 3] (all atoms, replicated). In
    training mode the forces keep their graph (``create_graph``) for the force loss, as the
    single-process model does. Parameter gradients after ``loss.backward()`` are partial per
    rank: see :func:`allreduce_gradients` and :func:`gradient_scale`.

    Every rank of the group must call ``forward`` with the same batch (``check_inputs`` verifies
    it with one small all-reduce).

    Force strategy: by default ``model.force_strategy`` (``memory.checkpointing``) at
    construction. ``autograd``: ``autograd.grad`` of the all-reduced energy. ``blocks``: the same
    with each block in a non-reentrant checkpoint (the block only; the halo exchange is not
    repeated). ``forces``: the force-aware recomputation of ``nn/force_checkpoint.py``
    (:func:`~scalable_equiformer.nn.force_checkpoint.blockwise_sweep`) over the partitioned
    stages ``x_owned -> block(halo_exchange(x_owned))[:n_owned]``; each stage's checkpoint and
    recomputed VJP repeat its halo exchange (forward and backward), on every rank alike.
    ``memory.edge_chunk_size`` is not partitioned: with P > 1 it is a ``ConfigError`` (at
    construction, and at the call if it was set later); with P = 1 it chunks as in one process.
    Passing ``checkpoint_blocks`` (True / False) overrides the model's strategy: plain autograd
    with or without per-block checkpointing.
    After each call, ``last_partition`` holds the :class:`GraphPartition` and
    ``last_partition_seconds`` the time spent building it (graph excluded).
    """

    def __init__(self, model, group=None, check_inputs: bool = True, checkpoint_blocks: bool | None = None):
        super().__init__()
        self.model = model
        self.group = group
        self.check_inputs = check_inputs
        #: force-aware recomputation (memory.checkpointing=forces) instead of plain autograd
        self.force_aware = False
        if checkpoint_blocks is None:  # follow the model's force strategy (memory.checkpointing)
            strategy = getattr(model, "force_strategy", "autograd")
            checkpoint_blocks = strategy in ("blocks", "forces")  # energy-only calls: per block
            self.force_aware = strategy == "forces"
        if self.force_aware:
            self._edge_chunk_size(self.num_parts)
        self.checkpoint_blocks = bool(checkpoint_blocks)
        self.last_partition: GraphPartition | None = None
        self.last_partition_seconds = 0.0
        self._warned_dropout = False

    @property
    def num_parts(self) -> int:
        return group_size(self.group)

    @property
    def part_rank(self) -> int:
        return group_rank(self.group)

    def partition(self, pos: torch.Tensor, batch_vec: torch.Tensor) -> tuple[GraphPartition, LocalPart]:
        """Radius graph, partition and this rank's :class:`LocalPart` (on ``pos``'s device)."""
        edge_index = self.model.build_graph(pos, batch_vec)
        t0 = time.perf_counter()
        gp = partition_graph(pos, edge_index, self.num_parts, batch=batch_vec)
        part = gp.local(self.part_rank).to(pos.device)
        self.last_partition_seconds = time.perf_counter() - t0
        self.last_partition = gp
        return gp, part

    def local_energy(self, pos, z, batch_vec, num_graphs, part: LocalPart) -> torch.Tensor:
        """This rank's share of the energy per graph [num_graphs] (float64): the stages on the
        local nodes, with a halo exchange before each block."""
        model, group = self.model, self.group
        n_own = part.num_owned
        z_l, b_l, edges = self._local_inputs(pos, z, batch_vec, part)
        x = model.embed(z_l, edges, z_l.shape[0])  # halo rows incomplete: replaced below
        node_attr = model.node_attr(x)
        for block in model.blocks:
            x = self._block(block, halo_exchange(x[:n_own], part, group), node_attr, edges, b_l)  # [n_local, irreps.dim]
        return model.readout(x[:n_own], z_l[:n_own], b_l[:n_own], num_graphs)

    def _edge_chunk_size(self, num_parts: int):
        """``model.edge_chunk_size``, refused with P > 1 (each rank would cut its own number of
        chunks, and the halo exchanges in them would no longer pair up) by the config's own rule
        (:func:`~scalable_equiformer.config.check_memory_levers`): it is checked here again because
        the group size is known only now, and a model's levers can be set without a config."""
        chunk = getattr(self.model, "edge_chunk_size", None)
        levers = types.SimpleNamespace(checkpointing="forces", edge_chunk_size=chunk, keep_blocks=0)
        check_memory_levers(levers, graph_partitions=num_parts, where=lambda key: "PartitionedModel")
        return chunk

    def _local_inputs(self, pos, z, batch_vec, part: LocalPart):
        """Atomic numbers and molecule of the local nodes (owned, then halo) [n_local], and the
        features of this part's edges (local numbering: only edges into owned atoms)."""
        nodes = part.nodes
        pos_l = pos.index_select(0, nodes)  # [n_local, 3]; grads flow back to all of pos
        z_l, b_l = z.index_select(0, nodes), batch_vec.index_select(0, nodes)
        return z_l, b_l, self.model.edge_features(pos_l, part.edge_index)  # [2, E_p] edges

    def force_aware_step(self, pos, z, batch_vec, num_graphs, part: LocalPart, training: bool):
        """``(energy [num_graphs] replicated, this rank's dE/dpos [N, 3])`` by the force-aware
        recomputation: the single-process sweep over stages ``x_owned [n_own, d] -> rows
        [n_own, d]`` that start with the halo exchange (embedding: the owned rows of ``embed``)."""
        model, group = self.model, self.group
        n_own = part.num_owned
        z_l, b_l, edges = self._local_inputs(pos, z, batch_vec, part)
        attr = node_attr_once(model)

        def stage(s, x, e):
            if s == 0:
                return model.embed(z_l, e, z_l.shape[0])[:n_own]
            x_l = halo_exchange(x, part, group)  # [n_local, d]: every rank, every call
            return model.blocks[s - 1](x_l, attr(x_l), e, b_l)[:n_own]

        chunk = self._edge_chunk_size(part.num_parts)  # P = 1: local numbering = global
        energy, grad = blockwise_sweep(
            model, stage, edges, pos, pos.new_zeros(n_own, 1),
            lambda x: model.readout(x, z_l[:n_own], b_l[:n_own], num_graphs), training,
            chunks=edge_chunks(part.edge_index, n_own, chunk), keep=getattr(model, "keep_blocks", 0),
        )
        return sum_replicated(energy, group), grad

    def _block(self, block, x, node_attr, edges, b_l):
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpointed_call(block, x, node_attr, edges, b_l)
        return block(x, node_attr, edges, b_l)

    def forward(self, batch, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        model, group = self.model, self.group
        training = model.training
        self._check_dropout(training)
        pos, z, batch_vec, num_graphs = prepare_inputs(model, batch)
        if self.check_inputs and self.num_parts > 1:
            self._check_same_inputs(pos, z)
        _, part = self.partition(pos, batch_vec)
        with torch.enable_grad() if compute_forces else contextlib.nullcontext():
            if compute_forces and not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            if compute_forces and self.force_aware:
                energy, grad = self.force_aware_step(pos, z, batch_vec, num_graphs, part, training)
            else:
                energy = sum_replicated(self.local_energy(pos, z, batch_vec, num_graphs, part), group)
                if not compute_forces:
                    return {"energy": energy}
                (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=training)
            forces = -sum_replicated(grad, group)  # each rank's grad covers its own edges
        if not training:
            energy, forces = energy.detach(), forces.detach()
        return {"energy": energy, "forces": forces}

    def _check_same_inputs(self, pos, z) -> None:
        n = pos.shape[0]
        w = torch.arange(1, n + 1, dtype=torch.float64, device=pos.device)
        sig = torch.stack([
            torch.tensor(float(n), dtype=torch.float64, device=pos.device),
            (pos.detach().double().sum(-1) * w).sum(),
            (z.double() * w).sum(),
        ])
        lo, hi = sig.clone(), sig.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(lo, hi):
            raise RuntimeError(
                "PartitionedModel: the ranks of a partition group got different batches; feed every "
                "rank of a group the same batch (data-parallel rank = rank // graph_partitions)"
            )

    def _check_dropout(self, training: bool) -> None:
        if not training or self._warned_dropout:
            return
        drops = [
            m for m in self.model.modules()
            if "drop" in type(m).__name__.lower() and float(getattr(m, "p", 0.0) or 0.0) > 0
        ]
        if drops:
            warnings.warn(
                "PartitionedModel: dropout / drop-path is on; its random masks are drawn per rank, "
                "so a partitioned training step is not the single-process step", stacklevel=3
            )
            self._warned_dropout = True
