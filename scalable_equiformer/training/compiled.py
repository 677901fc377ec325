"""A compiled force-training step: energies, forces (``create_graph``) and, through them, the
parameter gradients of the force loss, computed by ``torch.compile``-generated code
(``train.compile: true``; :func:`.steps.model_call` calls :func:`compiled_energy_and_forces`).

Why not ``torch.compile(model)``: Dynamo stops on the model before any double backward (a guard on
e3nn's ``Irrep.__len__``, the data-dependent checks of the radius graph). So, the NequIP way:

1. **Trace** energy-and-forces as one graph: ``make_fx`` (symbolic shapes, duck sizing off) over
   ``torch.func.functional_call`` of ``(params, buffers, pos, z, batch_vec, edge_index,
   graph_ids) -> (energy, forces)``, where ``forces = -autograd.grad(E.sum(), pos,
   create_graph=True)``. The traced graph holds the forward *and* the first backward as plain
   aten ops. What reads tensor values stays outside the traced region: the radius graph
   (``edge_index`` is an input), the number of molecules (carried as the size of ``graph_ids``,
   an empty ``[num_graphs]`` tensor) and the atomic-number range check
   (``model.check_atomic_numbers``; the trace calls ``model.energy(..., check=False)``, whose
   one-hot embedding is a comparison with ``arange`` and reads no values).
2. **Remove the detach nodes that autograd's saved tensors introduced** (:func:`strip_saved_detaches`).
   ``make_fx`` records the ``aten.detach`` that autograd applies to a tensor it saves for the
   backward (when saving an op's output) and again when the backward unpacks it. In eager mode
   the first backward's graph (``create_graph``) still connects the unpacked tensors to the
   parameters; in the traced graph each ``detach`` cuts that connection, so differentiating the
   *traced* forces again (the force loss) silently drops every term that flows through a saved
   tensor: energies and forces stay exact, the parameter gradients of the force loss come out
   wrong (4-15 % relative on the tiny model, up to 39 % measured on others). The detaches the
   model's own code asks for (``logits.detach()`` before the softmax's ``amax`` in
   ``nn/attention.py``, one per block) are *kept*: they feed a real op in the forward, and the
   eager model takes no gradient through them either. ``keep_saved_detaches=True`` keeps all
   detaches: the wrong gradients, for the test that shows the trap.
3. **Compile** the traced graph module with ``torch.compile`` (inductor, dynamic shapes) and call
   it with the live parameters: AOTAutograd differentiates the traced graph, so
   ``loss.backward()`` fills ``param.grad`` as the eager path does.

Recompilation: the traced graph is symbolic in the number of atoms, edges and molecules (duck
sizing off, so an atom count equal to some parameter dimension does not merge with it), and the
compiled function marks those sizes dynamic from its first compilation (parameters stay static).
Torch still compiles a few size classes separately: a batch of one molecule (a size of 1 is
specialised), at most 16 atoms on the CPU (inductor's small-matmul decomposition guards on it), and
guards of inductor's code generation that were not identified. Measured: the test model (one
block), batches of 16, 19, 12 (one molecule), 14 and 12 atoms: 3 compilations; the tiny model of
``tools/bench_model.py --tiny``, batches of 168, 84 and 21 (one molecule) atoms: 3 compilations;
sizes within one class reuse the compiled code (``tests/test_compiled.py``). Dynamo's
``recompile_limit`` (:data:`RECOMPILE_LIMIT`) caps the compilations per model; beyond it the
traced graph runs uncompiled (still correct, slower). The trace is remade (and compiled again)
only when the model's training mode, dtype, device or parameter set changes.

Not supported (refused at config load, ``config.TrainConfig`` / ``Config.validate``): force-aware or
per-block checkpointing (their custom recomputation is exactly what the traced graph replaces),
graph partitions (halo exchange between blocks), mixed precision, DeepSpeed, dropout and drop path
(random masks inside the traced region). Evaluation (no ``create_graph``) runs eagerly.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Callable

import torch
import torch._dynamo
from torch.fx.experimental.proxy_tensor import make_fx

from ..nn import dim_major

log = logging.getLogger(__name__)

#: Dynamo's recompile_limit set here: compiled variants per traced graph before Dynamo runs it uncompiled
RECOMPILE_LIMIT = 8

class _EnergyForces(torch.nn.Module):
    """``(pos, z, batch_vec, edge_index, graph_ids) -> (energy [B] float64, forces [N, 3])`` of
    ``model``, with the graph of the forces kept (``create_graph``); traced, never run eagerly."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pos, z, batch_vec, edge_index, graph_ids):
        m = self.model
        pos = pos.requires_grad_(True) if not pos.requires_grad else pos
        with torch.enable_grad():
            # the range of z is checked before the trace (compiled_energy_and_forces): no value reads here
            energy = m.energy(pos, z, batch_vec, graph_ids.shape[0], edge_index=edge_index, check=False)
            _mark_grad_start(self)
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
        return energy, -grad


def _mark_grad_start(wrapper) -> None:
    """Remember the last node the tracer has recorded so far: the nodes after it were recorded by
    ``autograd.grad`` (the first backward). Nothing when not tracing."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    wrapper.grad_start = None if mode is None else list(mode.tracer.graph.nodes)[-1].name


def strip_saved_detaches(gm: torch.fx.GraphModule, grad_start: str) -> int:
    """Remove the ``aten.detach`` nodes that autograd's saved tensors put into the trace (module
    docstring, point 2); keep the model's own. Returns the number removed.

    What the trace looks like: a tensor that autograd saves for the backward is detached once when
    it is saved (in the forward, e.g. the output of ``exp``/``sigmoid``/a norm: a detach whose only
    users are further detaches, or none) and detached again each time the backward unpacks it
    (after ``grad_start``, the last node recorded before ``autograd.grad``, :func:`_mark_grad_start`). Both
    kinds go: the detaches after ``grad_start``, and the forward detaches used by nothing but
    detaches. A detach the model asks for itself (``logits.detach()`` feeding the softmax's
    ``scatter_reduce`` in ``nn/attention.py``) has a real user in the forward and stays: the eager
    model takes no gradient through it either.
    """
    graph = gm.graph
    detach = torch.ops.aten.detach.default
    nodes = list(graph.nodes)
    names = [n.name for n in nodes]
    if grad_start not in names:
        raise RuntimeError("traced energy-and-forces graph: where autograd.grad starts is unknown")
    cut = names.index(grad_start)
    doomed = [n for n in nodes[:cut] if n.op == "call_function" and n.target is detach
              and all(u.op == "call_function" and u.target is detach for u in n.users)]
    doomed += [n for n in nodes[cut + 1:] if n.op == "call_function" and n.target is detach]
    for node in doomed:  # each is replaced by its input (a chain of detaches collapses to its source)
        node.replace_all_uses_with(node.args[0])
    for node in reversed(doomed):  # graph order reversed: a detach of a detach goes before its input
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return len(doomed)


def trace_energy_and_forces(model, pos, z, batch_vec, edge_index, graph_ids,
                            keep_saved_detaches: bool = False) -> tuple[torch.fx.GraphModule, int]:
    """The traced graph (steps 1 and 2 of the module docstring), symbolic in all sizes, and the
    number of detaches removed.

    Called as ``gm(params, buffers, pos, z, batch_vec, edge_index, graph_ids)`` with
    ``params``/``buffers`` the model's ``named_parameters()``/``named_buffers()`` as dicts.
    """
    wrapper = _EnergyForces(model)

    def fn(params, buffers, pos, z, batch_vec, edge_index, graph_ids):
        state = {**{f"model.{k}": v for k, v in params.items()}, **{f"model.{k}": v for k, v in buffers.items()}}
        return torch.func.functional_call(wrapper, state, (pos, z, batch_vec, edge_index, graph_ids))

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    # duck sizing off: an atom or edge count that happens to equal a parameter dimension (or each
    # other) must not become the same symbol, else the graph silently specialises to that equality
    # the module path, not the fused one (nn/dim_major.module_path: inductor cannot lower its views)
    with torch.fx.experimental._config.patch(use_duck_shape=False), dim_major.module_path():
        gm = make_fx(fn, tracing_mode="symbolic")(params, buffers, pos.detach(), z, batch_vec, edge_index, graph_ids)
    removed = 0 if keep_saved_detaches else strip_saved_detaches(gm, wrapper.grad_start)
    log.debug("traced energy and forces: %d nodes, %d saved-tensor detaches removed", len(gm.graph.nodes), removed)
    return gm, removed


def compile_count() -> int:
    """Graphs compiled by Dynamo in this process so far (each new size class that recompiles adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledEnergyForces:
    """One model's traced-and-compiled energy-and-forces function (see the module docstring).

    ``compile=False`` runs the traced graph uncompiled (the same graph, for tests); ``backend``:
    torch.compile's (``"aot_eager"``: AOTAutograd without code generation, for quick checks);
    ``keep_saved_detaches=True`` skips :func:`strip_saved_detaches` (wrong gradients: the trap).
    ``traces``, ``trace_seconds``, ``detaches_removed``: what tracing did so far.
    """

    def __init__(self, model, keep_saved_detaches: bool = False, compile: bool = True, dynamic: bool = True,
                 backend: str = "inductor") -> None:
        self.model_ref = weakref.ref(model)
        self.backend = backend
        self.keep_saved_detaches = keep_saved_detaches
        self.compile = compile
        self.dynamic = dynamic
        self.fn: Callable | None = None
        self.gm: torch.fx.GraphModule | None = None
        self.key = None
        self.traces = 0
        self.trace_seconds = 0.0
        self.detaches_removed = 0

    @staticmethod
    def _key(model, pos):
        params = tuple((k, tuple(p.shape), p.dtype) for k, p in model.named_parameters())
        return (model.training, pos.dtype, pos.device, params)

    def __call__(self, pos, z, batch_vec, edge_index, num_graphs: int) -> dict[str, torch.Tensor]:
        model = self.model_ref()
        graph_ids = torch.empty(num_graphs, device=pos.device)  # carries num_graphs as a (symbolic) size
        key = self._key(model, pos)
        fresh = self.fn is None or key != self.key
        if fresh:
            log.info("train.compile: tracing energy and forces (%d atoms, %d molecules); the first compiled step "
                     "also compiles (minutes on a CPU)", pos.shape[0], num_graphs)
            t0 = time.perf_counter()
            self.gm, self.detaches_removed = trace_energy_and_forces(model, pos, z, batch_vec, edge_index, graph_ids,
                                                                     self.keep_saved_detaches)
            self.trace_seconds = time.perf_counter() - t0
            self.traces += 1
            if self.compile:
                torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
                self.fn = torch.compile(self.gm, backend=self.backend, dynamic=None if self.dynamic else False)
            else:
                self.fn = self.gm
            self.key = key
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        if self.compile and self.dynamic:
            # the sizes that change between batches are symbolic from the first compile on
            # (parameters stay static); torch still specialises a size of 1 (one molecule)
            for t, dim in ((pos, 0), (z, 0), (batch_vec, 0), (edge_index, 1), (graph_ids, 0)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        # duck sizing off for Dynamo's shape environment too (an atom count equal to the edge count
        # or to a parameter dimension must not become a guard that the next batch fails)
        t0 = time.perf_counter()
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            energy, forces = self.fn(params, buffers, pos, z, batch_vec, edge_index, graph_ids)
        if fresh:
            log.info("train.compile: traced in %.1f s (%d nodes, %d saved-tensor detaches removed); forward compiled "
                     "in %.1f s (the backward compiles in the first loss.backward())", self.trace_seconds,
                     len(self.gm.graph.nodes), self.detaches_removed, time.perf_counter() - t0)
        return {"energy": energy, "forces": forces}


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledEnergyForces]" = weakref.WeakKeyDictionary()


def compiled_for(model) -> CompiledEnergyForces:
    """The model's compiled function (made on first use, kept as long as the model lives)."""
    fn = _CACHE.get(model)
    if fn is None:
        fn = _CACHE[model] = CompiledEnergyForces(model)
    return fn


def compiled_energy_and_forces(model, batch, fn: CompiledEnergyForces | None = None) -> dict[str, torch.Tensor]:
    """``{"energy": [B] eV, "forces": [N, 3] eV/Å}`` of ``model`` (an Equiformer in training mode)
    on ``batch`` by the compiled function (``fn``, default :func:`compiled_for`); the graph is kept
    for ``loss.backward()``. The radius graph, the molecule count and the atomic-number check run
    here, eagerly."""
    from ..nn.forces import prepare_inputs

    pos, z, batch_vec, num_graphs = prepare_inputs(model, batch)
    model.check_atomic_numbers(z)
    edge_index = model.build_graph(pos, batch_vec)
    return (fn or compiled_for(model))(pos, z, batch_vec, edge_index, num_graphs)
