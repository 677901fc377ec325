"""The same Equiformer over the P ranks of a partition group (see :mod:`scalable_equiformer.parallel`)."""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist

from ..nn.forces import autograd_forces, node_attr_once, prepare_inputs
from .halo import halo_exchange, sum_replicated
from .partition import GraphPartition, LocalPart, partition_graph

__all__ = [
    "PartitionedModel",
    "PartitionStages",
    "partitioned_model",
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

    Memory levers: ``runner`` (a ``memory.ForceRunner``, built from the config's ``Levers``) runs
    the forces over the partitioned stages (:class:`PartitionStages`); None is plain autograd of
    the all-reduced energy. ``blocks`` checkpoints each block (the block only; the halo exchange
    is not repeated); ``forces`` runs the force-aware sweep over the stages
    ``x_owned -> block(halo_exchange(x_owned))[:n_owned]``, each stage's checkpoint and recomputed
    VJP repeating its halo exchange (forward and backward), on every rank alike.
    ``memory.edge_chunk_size`` is not partitioned: with P > 1 the runner refuses it here
    (``runner.for_partitions(P)``: each rank would cut its own number of chunks, and the halo
    exchanges in them would no longer pair up); with P = 1 it chunks as in one process.
    After each call, ``last_partition`` holds the :class:`GraphPartition` and
    ``last_partition_seconds`` the time spent building it (graph excluded).
    """

    def __init__(self, model, group=None, check_inputs: bool = True, runner=None):
        super().__init__()
        self.model = model
        self.group = group
        self.check_inputs = check_inputs
        self.runner = runner.for_partitions(self.num_parts) if runner is not None else None
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

    def local_energy(self, pos, z, batch_vec, num_graphs, part: LocalPart, run_block=None) -> torch.Tensor:
        """This rank's share of the energy per graph [num_graphs] (float64): the stages on the
        local nodes, with a halo exchange before each block (``run_block``: see ``Equiformer.energy``)."""
        model, group = self.model, self.group
        n_own = part.num_owned
        z_l, b_l, edges = self._local_inputs(pos, z, batch_vec, part)
        x = model.embed(z_l, edges, z_l.shape[0])  # halo rows incomplete: replaced below
        node_attr = model.node_attr(x)
        for block in model.blocks:
            x_l = halo_exchange(x[:n_own], part, group)  # [n_local, irreps.dim]
            x = block(x_l, node_attr, edges, b_l) if run_block is None else run_block(block, x_l, node_attr, edges, b_l)
        return model.readout(x[:n_own], z_l[:n_own], b_l[:n_own], num_graphs)

    def _local_inputs(self, pos, z, batch_vec, part: LocalPart):
        """Atomic numbers and molecule of the local nodes (owned, then halo) [n_local], and the
        features of this part's edges (local numbering: only edges into owned atoms)."""
        nodes = part.nodes
        pos_l = pos.index_select(0, nodes)  # [n_local, 3]; grads flow back to all of pos
        z_l, b_l = z.index_select(0, nodes), batch_vec.index_select(0, nodes)
        return z_l, b_l, self.model.edge_features(pos_l, part.edge_index)  # [2, E_p] edges

    def forward(self, batch, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        model = self.model
        training = model.training
        self._check_dropout(training)
        pos, z, batch_vec, num_graphs = prepare_inputs(model, batch)
        if self.check_inputs and self.num_parts > 1:
            self._check_same_inputs(pos, z)
        _, part = self.partition(pos, batch_vec)
        stages = PartitionStages(self, z, batch_vec, num_graphs, part)
        if self.runner is not None:
            return self.runner.run(stages, pos, training, compute_forces)
        if not compute_forces:
            return {"energy": stages.energy(pos)}
        return autograd_forces(stages.energy, pos, training, reduce=stages.total)

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


def partitioned_model(model: torch.nn.Module, partitions: int, group=None):
    """``model`` over the ranks of ``group`` (a :class:`PartitionedModel`) for inference (the ASE
    calculator, the MD potential); UserError without an initialised process group of
    ``partitions`` ranks."""
    from ..errors import UserError

    P = int(partitions)
    if not (dist.is_available() and dist.is_initialized()):
        raise UserError(
            f"partitions={P}: the calculator runs the graph over the ranks of an initialised torch.distributed "
            f"process group and none is initialised in this process; run the same ASE script on {P} ranks "
            f"(e.g. torchrun --nproc_per_node {P} md.py) and call torch.distributed.init_process_group first")
    size = dist.get_world_size(group)
    if size != P:
        raise UserError(f"partitions={P}, but the process group has {size} ranks; pass group= a group of {P} ranks "
                        "(e.g. the partition group of scalable_equiformer.parallel.make_groups)")
    return PartitionedModel(model, group=group)


class PartitionStages:
    """The partitioned model's stages on this rank for one call, in the form a force runner takes
    (``memory.runner``: ``energy``, ``sweep``, ``total``)."""

    def __init__(self, pmodel: PartitionedModel, z, batch_vec, num_graphs: int, part: LocalPart):
        self.pmodel, self.model, self.part = pmodel, pmodel.model, part
        self.z, self.batch_vec, self.num_graphs = z, batch_vec, num_graphs

    def energy(self, pos, run_block=None) -> torch.Tensor:
        """The energy per graph, all-reduced over the group (replicated)."""
        local = self.pmodel.local_energy(pos, self.z, self.batch_vec, self.num_graphs, self.part, run_block)
        return self.total(local)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of the ranks' shares (energy, or each rank's dE/dpos over its own edges)."""
        return sum_replicated(t, self.pmodel.group)

    def sweep(self, pos):
        """The force-aware chain over stages ``x_owned [n_own, d] -> rows [n_own, d]`` that start
        with the halo exchange (embedding: the owned rows of ``embed``). P = 1: local numbering =
        global, so edge chunks cut as in one process."""
        model, group, part = self.model, self.pmodel.group, self.part
        n_own = part.num_owned
        z_l, b_l, edges = self.pmodel._local_inputs(pos, self.z, self.batch_vec, part)
        attr = node_attr_once(model)

        def stage(s, x, e):
            if s == 0:
                return model.embed(z_l, e, z_l.shape[0])[:n_own]
            x_l = halo_exchange(x, part, group)  # [n_local, d]: every rank, every call
            return model.blocks[s - 1](x_l, attr(x_l), e, b_l)[:n_own]

        def readout(x):
            return model.readout(x, z_l[:n_own], b_l[:n_own], self.num_graphs)

        return stage, edges, pos.new_zeros(n_own, 1), readout, part.edge_index
