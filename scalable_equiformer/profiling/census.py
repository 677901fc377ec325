"""Census of the tensors that a training step keeps for the force loss, per autograd op.

With forces from ``autograd.grad(E, pos, create_graph=True)``, what fills memory at the start of
``loss.backward()`` is every tensor saved for backward by two graphs: the forward graph of the
energy (``F``) and the graph of the force computation itself (``B``, the backward ops recorded
under ``create_graph``, which ``loss.backward()`` differentiates through). :func:`saved_census`
walks both graphs from the energy and the forces, reads what each node saved (``_saved_*``
attributes of built-in nodes, ``saved_tensors`` of custom ``autograd.Function`` nodes), and counts
each distinct storage once (parameters and buffers excluded), charged to the first node that holds
it (forward nodes first); 0-dim tensors (Python numbers that autograd wrapped, a few bytes) are
not counted. Rows group storages by graph, op and size per edge, so a tensor that a
block keeps on every edge shows up as e.g. ``F MmBackward0 1760 floats/edge x13``.

Its total equals the hook-based count of :func:`.estimate.activation_profile` on the same step
(``tests/test_memory_census.py``); ``tools/memory_census.py`` prints it. It is how issue 15 found
what this implementation kept that the original does not (see ``benchmarks/memory_original.md``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class CensusRow:
    graph: str  # "F" (forward of the energy) or "B" (the force computation, kept for the loss)
    op: str  # autograd node type, e.g. MmBackward0
    floats_per_edge: float  # storage elements per edge (rounded to 0.1)
    count: int
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Census:
    edges: int
    atoms: int
    rows: list = field(default_factory=list)  # CensusRow, largest first

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    def by_op(self) -> dict:
        """{"F MmBackward0": bytes, ...}, largest first."""
        out = defaultdict(int)
        for r in self.rows:
            out[f"{r.graph} {r.op}"] += r.bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def as_dict(self) -> dict:
        return {"edges": self.edges, "atoms": self.atoms, "bytes": self.bytes,
                "by_op": self.by_op(), "rows": [r.as_dict() for r in self.rows]}


def _graph_nodes(roots) -> list:
    seen, order, stack = set(), [], [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        order.append(node)
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return order


def _saved(node) -> list:
    out = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(node, name)
        except RuntimeError:  # freed, or not a tensor
            continue
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (tuple, list)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    if type(node).__name__.endswith("Backward") and hasattr(node, "saved_tensors"):  # custom Function
        try:
            out.extend(t for t in node.saved_tensors if isinstance(t, torch.Tensor))
        except RuntimeError:
            pass
    return out


def saved_census(energy: torch.Tensor, forces: torch.Tensor, num_edges: int, num_atoms: int, exclude=()) -> Census:
    """Census of what the graphs of ``energy`` and ``forces`` (computed with ``create_graph=True``)
    keep. ``exclude``: tensors not to count (parameters, buffers)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    forward = set(_graph_nodes([energy.grad_fn]))
    nodes = _graph_nodes([energy.grad_fn, forces.grad_fn])
    nodes.sort(key=lambda n: (n not in forward, type(n).__name__))  # deterministic charge: forward first
    owner = {}
    for node in nodes:
        graph = "F" if node in forward else "B"
        for t in _saved(node):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in skip or ptr in owner or t.dim() == 0:  # 0-dim: Python numbers autograd wrapped
                continue
            owner[ptr] = (graph, type(node).__name__, storage.nbytes(), storage.nbytes() // max(t.element_size(), 1))
    groups = defaultdict(lambda: [0, 0])
    for graph, op, nbytes, numel in owner.values():
        key = (graph, op, round(numel / max(num_edges, 1), 1))
        groups[key][0] += 1
        groups[key][1] += nbytes
    rows = [CensusRow(g, op, fpe, c, b) for (g, op, fpe), (c, b) in groups.items()]
    rows.sort(key=lambda r: (-r.bytes, r.graph, r.op))
    return Census(int(num_edges), int(num_atoms), rows)


def model_census(model, batch) -> Census:
    """Run ``model`` (training mode, forces kept for the loss, levers off) on ``batch`` and take
    the census. Levers off only: inside a checkpointed region, reading a node's saved tensors
    recomputes them, so the census would count what checkpointing does not keep."""
    from ..nn.forces import energy_and_forces

    exclude = list(model.parameters()) + list(model.buffers())
    out = energy_and_forces(model, batch, training=True)
    num_edges = int(model.build_graph(batch.pos.to(model.dtype), batch.batch).shape[1])
    return saved_census(out["energy"], out["forces"], num_edges, int(batch.pos.shape[0]), exclude)
