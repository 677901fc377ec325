"""The force runner: energies and forces of a model under a :class:`~.levers.Levers` value.

``ForceRunner(levers)(model, batch, compute_forces=True)`` returns what ``model(batch)`` returns
(``{"energy": [B] eV float64, "forces": [N, 3] eV/Å}``, the graph kept in ``model.training``) with
the same numbers, computed under ``memory.checkpointing``:

* ``none``: plain autograd (``nn/forces.py``: the oracle, ``Equiformer.forward``);
* ``blocks``: the same with each block in a non-reentrant checkpoint;
* ``forces``: the force-aware sweep of :mod:`.force_checkpoint`, with ``memory.edge_chunk_size``
  chunks and ``memory.keep_blocks`` kept blocks.

The runner is the one place that dispatches on the levers. It takes the model's stages from a
*stages* object: :class:`ModelStages` for one process, the graph-partitioned model's
(``parallel/partitioned.py``, built per call, whose stages start with a halo exchange) otherwise.
A stages object has

* ``model``: the module whose parameters the sweep differentiates;
* ``energy(pos, run_block) -> [B]``: all stages composed (``run_block(block, x, node_attr, edges,
  batch)`` runs each block; None: a plain call), the total energy;
* ``sweep(pos) -> (stage, edges, x0, readout, edge_index)``: the chain for
  :func:`.force_checkpoint.blockwise_sweep` (``x0``'s rows = the rows the stages return);
* ``total(t)``: a partial result made whole (the sum over the ranks of a partition group; one
  process: ``t`` itself).

:class:`LeveredModel` is a model whose ``forward`` runs under a runner: what training hands to
its engine (``with_levers``); the graph-partitioned model takes a runner itself.
"""

from __future__ import annotations

import torch

from ..nn.forces import autograd_forces, finish, node_attr_once, prepare_inputs, requiring_grad
from .force_checkpoint import blockwise_sweep, checkpointed_call, edge_chunks
from .levers import Levers


def checkpointed_block(block, x, node_attr, edges, batch):
    """``run_block`` of ``memory.checkpointing`` blocks / forces: a checkpoint when grad is on."""
    if torch.is_grad_enabled():
        return checkpointed_call(block, x, node_attr, edges, batch)
    return block(x, node_attr, edges, batch)


class ModelStages:
    """The stages of one process's model for the runner (see the module docstring)."""

    def __init__(self, model, z, batch_vec, num_graphs: int):
        self.model, self.z, self.batch_vec, self.num_graphs = model, z, batch_vec, num_graphs

    def energy(self, pos, run_block=None):
        return self.model.energy(pos, self.z, self.batch_vec, self.num_graphs, run_block=run_block)

    def sweep(self, pos):
        model, z, batch_vec, n = self.model, self.z, self.batch_vec, pos.shape[0]
        edge_index = model.build_graph(pos, batch_vec)
        edges = model.edge_features(pos, edge_index)  # small graph in pos, kept
        attr = node_attr_once(model)

        def stage(s, x, e):
            return model.embed(z, e, n) if s == 0 else model.blocks[s - 1](x, attr(x), e, batch_vec)

        def readout(x):
            return model.readout(x, z, batch_vec, self.num_graphs)

        return stage, edges, pos.new_zeros(n, 1), readout, edge_index

    @staticmethod
    def total(t):
        return t


class ForceRunner:
    """Energies and forces under ``levers`` (see the module docstring)."""

    def __init__(self, levers: Levers = Levers()):
        self.levers = levers

    def __repr__(self) -> str:
        return f"ForceRunner({self.levers.label()})"

    def for_partitions(self, parts: int) -> "ForceRunner":
        """This runner on a partition group of ``parts`` ranks: the levers' rules hold for that count
        (``memory.edge_chunk_size`` is single-process only: a :class:`~.levers.LeverError` otherwise)."""
        if parts == self.levers.graph_partitions:
            return self
        return ForceRunner(self.levers.replace(graph_partitions=parts))

    def run_block(self):
        """How each block runs: in a checkpoint under ``blocks`` / ``forces``, else a plain call."""
        return None if self.levers.checkpointing == "none" else checkpointed_block

    def __call__(self, model, batch, compute_forces: bool = True,
                 training: bool | None = None) -> dict[str, torch.Tensor]:
        """``model``'s energy and forces on ``batch``; ``training`` (default ``model.training``):
        keep the graph for the force loss (else the results are detached)."""
        pos, z, batch_vec, num_graphs = prepare_inputs(model, batch)
        training = model.training if training is None else training
        return self.run(ModelStages(model, z, batch_vec, num_graphs), pos, training, compute_forces)

    def run(self, stages, pos, training: bool, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        """Energy (and forces) of ``stages`` at ``pos`` (the centred positions, model dtype)."""
        run_block = self.run_block()
        if not compute_forces:
            return {"energy": stages.energy(pos, run_block)}
        if self.levers.checkpointing != "forces":
            return autograd_forces(lambda p: stages.energy(p, run_block), pos, training, reduce=stages.total)
        with torch.enable_grad():
            pos = requiring_grad(pos)
            stage, edges, x0, readout, edge_index = stages.sweep(pos)
            energy, grad = blockwise_sweep(
                stages.model, stage, edges, pos, x0, readout, training,
                chunks=edge_chunks(edge_index, x0.shape[0], self.levers.edge_chunk_size),
                keep=self.levers.keep_blocks,
            )
            energy, forces = stages.total(energy), -stages.total(grad)
        return finish(energy, forces, training)


class LeveredModel(torch.nn.Module):
    """``model`` whose ``forward(batch, compute_forces=True)`` runs under ``runner``'s levers; the
    bare model is ``.model`` (its state dict is what checkpoints hold)."""

    def __init__(self, model: torch.nn.Module, runner: ForceRunner):
        super().__init__()
        self.model = model
        self.runner = runner

    def forward(self, batch, compute_forces: bool = True) -> dict[str, torch.Tensor]:
        return self.runner(self.model, batch, compute_forces)


def with_levers(model: torch.nn.Module, levers: Levers) -> torch.nn.Module:
    """``model`` run under ``levers``: the model itself when its forward already is the levers'
    path (``memory.checkpointing=none``), else a :class:`LeveredModel`."""
    if levers.checkpointing == "none":
        return model
    return LeveredModel(model, ForceRunner(levers))


__all__ = ["ForceRunner", "LeveredModel", "ModelStages", "checkpointed_block", "with_levers"]
