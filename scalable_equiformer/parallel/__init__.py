"""Graph partitioning: one molecule's radius graph over the P ranks of a partition group.

Each rank holds all positions (small), owns the atoms of its part, computes the edges whose
receiving atom it owns (each edge exactly once over the group), and before every block receives
the node features of its halo atoms (senders of its edges owned elsewhere) from their owners. The
energy is the all-reduced sum of the ranks' owned-atom energies; forces are the all-reduced sum of
each rank's ``dE/dpos`` (each covers the paths it computed); the halo exchange's backward returns
gradients to the owners and adds them there, so forces and parameter gradients are exact.

Modules: :mod:`.partition` (recursive coordinate bisection balanced by incoming-edge count, halo
and send/receive maps), :mod:`.halo` (differentiable exchange and replicated sums over
``torch.distributed``), :mod:`.partitioned` (the model wrapper and group helpers), :mod:`.launch`
(:func:`spawn_local`: P local gloo processes, the one spawner of the package). The comparison
harness of partitioned vs single process lives outside the package (``tools/partition_harness.py``;
its command line is ``tools/check_partitions.py``).

Use in training (world = D data-parallel groups x P partitions)::

    from scalable_equiformer.parallel import PartitionedModel, make_groups, gradient_scale

    P = config.parallel.graph_partitions
    dp_group, part_group = make_groups(dist.get_world_size(), P)   # every rank calls it
    # data: the sampler's replica index is dist.get_rank() // P and its replica count
    # world_size // P: all P ranks of a partition group must get the SAME batch
    pmodel = PartitionedModel(model, group=part_group, runner=ForceRunner(config.memory))  # levers
    out = pmodel(batch, compute_forces=True)      # {"energy": [B] float64, "forces": [N, 3]}
    loss = loss_fn(out, batch)                    # identical on the P ranks of the group
    # gradients: each rank holds a partial gradient (its own edges and atoms)
    #  - DeepSpeed / DDP averaging over all D*P ranks:  (loss * gradient_scale(part_group)).backward()
    #    then the usual world average gives the mean over the D batches, as with D processes
    #  - plain torch, one group:  loss.backward(); allreduce_gradients(model.parameters(), part_group)

``out`` is replicated on every rank of the group (energy of each molecule, forces of all atoms),
as the single-process ``model(batch)`` returns it; in ``model.train()`` the forces keep their
graph for the force loss. ``group=None`` means the default (world) group; P = 1 is the plain
model. Inference for a large system: the same call in ``model.eval()`` on P ranks
(``tools/evaluate.py --partitions P``; ``EquiformerCalculator(..., partitions=P)`` on each rank
of a P-rank group).

Notes for integration:
  * ``PartitionedModel`` calls the model's stages (``build_graph``, ``edge_features``, ``embed``,
    ``node_attr``, ``blocks``, ``readout``), not ``model.forward``. Hand the bare model (e.g.
    ``engine.module``) to it; the model itself has no direct parameters (only submodules), so
    ZeRO-3's per-module hooks gather what each stage uses.
  * Dropout / drop-path draw their masks per rank: a partitioned step then differs from the
    single-process one (a warning says so); the equality tests run with them off.
  * Memory levers: the ``runner`` passed in (``memory.ForceRunner``, from ``config.memory``;
    this package imports nothing from ``memory/``): none is plain autograd (``torch.autograd.grad``
    of the all-reduced energy); ``memory.checkpointing=blocks`` recomputes each block in the
    backward; ``forces`` runs the force-aware block-wise recomputation of
    ``memory/force_checkpoint.py`` over partitioned stages that begin with the halo exchange
    (:class:`~.partitioned.PartitionStages`). ``memory.edge_chunk_size`` is single-process only.
  * Batches of several molecules are partitioned molecule by molecule (each molecule cut into
    P pieces, part p owning every p-th piece), so every rank works on every molecule.
"""

from .halo import halo_exchange, sum_replicated
from .launch import spawn_local
from .partition import GraphPartition, LocalPart, bisect_atoms, partition_graph
from .partitioned import (
    PartitionedModel,
    allreduce_gradients,
    gradient_scale,
    group_rank,
    group_size,
    make_groups,
    partitioned_model,
)

__all__ = [
    "PartitionedModel",
    "partitioned_model",
    "make_groups",
    "gradient_scale",
    "allreduce_gradients",
    "group_rank",
    "group_size",
    "partition_graph",
    "bisect_atoms",
    "GraphPartition",
    "LocalPart",
    "halo_exchange",
    "sum_replicated",
    "spawn_local",
]
