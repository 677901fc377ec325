"""The memory-saving force paths that :class:`.runner.ForceRunner` runs: per-block checkpointing
and block-wise force recomputation.

Both give the same energies, forces and parameter gradients as the plain path
(``nn/forces.py``, ``memory.checkpointing=none``, the oracle); ``tests/test_memory_levers.py``
checks it to 1e-10 in fp64. ``memory.checkpointing`` (a :class:`.levers.Levers` field) picks one:

``blocks`` (:func:`checkpointed_call` around each block of the plain path)
    The plain path with every transformer block in a non-reentrant
    ``torch.utils.checkpoint`` (the reentrant form does not support ``autograd.grad``). Forces
    come from ``autograd.grad(E, pos, create_graph=True)``, which recomputes each block; the
    double-backward graph captures the recomputed activations and keeps them alive, so only the
    forward half of the memory is saved.

``forces`` (:func:`blockwise_sweep`), the force-aware design of ``shared/DESIGN.md``
    1. edge features (spherical harmonics, radial basis, envelope) with their small graph in pos;
    2. forward: embedding and blocks, each in a non-reentrant checkpoint, so only each block's
       input node features ``x_k`` are kept;
    3. ``g_L = dE/dx_L`` through the (per-atom) energy head;
    4. backward, block by block, ``k = L-1 .. 0``: ``(g_k, e_k) = VJP of block k at x_k with
       cotangent g_{k+1}``, where ``e_k`` is the block's *direct* share of dE/d(edge features).
       Each VJP is a :class:`_RecomputedVJP`: its forward computes the VJP values and keeps only
       its inputs; its backward (during ``loss.backward()``) recomputes the block and the VJP
       with ``create_graph=True`` and differentiates through it, so one block's double-backward
       graph is alive at a time;
    5. the embedding's VJP likewise, then ``dE/dpos`` = VJP of the edge features with
       ``sum_k e_k``; forces = -dE/dpos.

    Two traps (both covered by the tests): a block's VJP must be taken with respect to fresh
    aliases of the shared edge features made inside that block's function, else
    ``autograd.grad`` returns the total derivative through earlier blocks and counts those paths
    twice; and checkpoint's early stop raises inside a hook when the checkpointed function
    itself calls ``autograd.grad`` (``set_checkpoint_early_stop(False)`` is used throughout).
    :class:`_RecomputedVJP` is a custom autograd Function rather than a checkpoint around
    ``autograd.grad``: under a checkpoint the inner ``autograd.grad`` would unpack the packed
    activations and trigger a second recomputation during the forward pass.

    Steps 2-5 are :func:`blockwise_sweep`, which takes the stages as a callable (the runner gets
    them from the model, or from the graph-partitioned model, ``parallel/partitioned.py``, whose
    stages start with a halo exchange, ``x_owned -> block(halo_exchange(x_owned))[:n_owned]``;
    the exchange's backward, itself differentiable, moves the cotangents between ranks inside
    each VJP). ``memory.edge_chunk_size`` cuts every stage into chunks of receiving atoms
    (:func:`edge_chunks`): a stage's output for an atom depends on that atom's incoming edges
    only, so each chunk's rows are exact, and one chunk's graph is alive at a time.

Cost (counted in forward passes of a block): the plain step runs each block's forward once, its
VJP (~2) and the double backward (~6): ~9. ``"forces"`` runs each block's forward four times (the
forward pass, the backward sweep, the recomputed VJP in ``loss.backward()``, and the chain's
recomputation for the parameter gradients of earlier blocks, which the double backward needs in
the opposite block order): ~16, i.e. ~1.8-2x the step. ``memory.keep_blocks=k`` keeps the last
k blocks' forward + VJP graphs instead (run once, as in the plain path): k stages' memory back
for their recomputations.

At evaluation (``training=False``) nothing has to be kept for a second backward: ``"forces"``
runs the blocks without a graph and each VJP directly, so the peak is one block's graph.

Dropout and drop-path draw the same random numbers in every recomputation: the random state
before each block's first call is captured and restored around every later call.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

#: EdgeFeatures fields that carry gradients to pos (``index`` does not).
_EDGE_FIELDS = ("vec", "length", "sh", "radial", "envelope")


# ---------------------------------------------------------------------------------------------
# random state


def _rng_capture(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_restored(state, device: torch.device):
    """Run with the random state ``state``; the surrounding state is put back afterwards."""
    if state is None:
        yield
        return
    saved = _rng_capture(device)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state(saved[1], device)


def _autocast_state(device: torch.device):
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return kind, torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled()


def _autocast_restored(state):
    if state is None:
        return contextlib.nullcontext()
    kind, dtype, cache = state
    return torch.autocast(kind, dtype=dtype, cache_enabled=cache)


# ---------------------------------------------------------------------------------------------
# helpers


def _grad_fields(edges) -> list[str]:
    return [f for f in _EDGE_FIELDS if getattr(edges, f, None) is not None and getattr(edges, f).requires_grad]


def _with_fields(edges, names, tensors):
    return edges._replace(**dict(zip(names, tensors)))


def checkpointed_call(fn, *args):
    """``fn(*args)`` in a non-reentrant checkpoint, early stop off (see DESIGN: it can raise inside a hook)."""
    with set_checkpoint_early_stop(False):
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


def _zeros_for_none(grads, like):
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like))


class _RecomputedVJP(torch.autograd.Function):
    """``outputs = vjp_fn(*inputs)`` keeping only ``inputs``; backward recomputes with a graph.

    ``vjp_fn(create_graph, *inputs) -> tuple of tensors`` computes a VJP (it calls
    ``autograd.grad`` inside). ``params`` are passed as extra inputs so that their gradients
    flow through autograd's normal accumulation (and DeepSpeed's hooks on it).
    """

    @staticmethod
    def forward(ctx, vjp_fn, rng, device, n_inputs, *inputs_and_params):
        inputs = inputs_and_params[:n_inputs]
        ctx.vjp_fn, ctx.rng, ctx.device, ctx.n_inputs = vjp_fn, rng, device, n_inputs
        ctx.autocast = _autocast_state(device)  # the recomputation runs in the same precision
        ctx.n_params = len(inputs_and_params) - n_inputs
        ctx.save_for_backward(*inputs)
        with torch.enable_grad(), _rng_restored(rng, device):
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            outs = vjp_fn(False, *leaves)
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        inputs = ctx.saved_tensors
        params = ctx.vjp_fn.params
        with torch.enable_grad(), _rng_restored(ctx.rng, ctx.device), _autocast_restored(ctx.autocast):
            needs = ctx.needs_input_grad[4:4 + ctx.n_inputs]
            leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
            outs = ctx.vjp_fn(True, *leaves)
            wrt_idx = [i for i, t in enumerate(leaves) if t.requires_grad]
            wrt = [leaves[i] for i in wrt_idx] + list(params)
            pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
            # structural, the same on every rank (grads are materialised, requires_grad follows the
            # graph's shape, not its data): a partition group never skips a collective on one rank
            if pairs and wrt:
                grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            else:
                grads = (None,) * len(wrt)
        in_grads = [None] * len(inputs)
        for i, g in zip(wrt_idx, grads[: len(wrt_idx)]):
            in_grads[i] = g
        return (None, None, None, None, *in_grads, *grads[len(wrt_idx):])


class _BlockVJP:
    """``(x, g, *feats) -> (dE/dx, *dE/dfeats)`` of one block (or the embedding) at cotangent g.

    The VJP is taken with respect to ``x`` and fresh aliases of the edge features made here
    (``f.view_as(f)``), so ``dE/dfeats`` is this block's direct share only.
    """

    def __init__(self, fn, names, params, wrt_x: bool = True):
        self.fn, self.names, self.params, self.wrt_x = fn, names, params, wrt_x

    def __call__(self, create_graph: bool, x, g, *feats):
        aliases = [f.view_as(f) for f in feats]
        y = self.fn(x, aliases)
        wrt = ([x] if self.wrt_x else []) + aliases
        grads = torch.autograd.grad(y, wrt, g, create_graph=create_graph, allow_unused=True)
        return _zeros_for_none(grads, wrt)


# ---------------------------------------------------------------------------------------------
# the force-aware sweep over a chain of stages; this module imports nothing from .runner, which
# runs it


def edge_chunks(edge_index: torch.Tensor, num_nodes: int, chunk_size) -> list[tuple[int, int, int, int]]:
    """Split nodes into contiguous ranges whose incoming edges number at most ``chunk_size``.

    Edges must be sorted by target (``edge_index[1]``, as ``radius_graph`` returns them). Returns
    ``(n0, n1, e0, e1)`` per chunk: nodes ``[n0, n1)`` receive exactly the edges ``[e0, e1)``. A
    node with more incoming edges than ``chunk_size`` gets a chunk of its own. ``None`` = one chunk.

    >>> ei = torch.tensor([[1, 2, 0, 2, 0, 1], [0, 0, 1, 1, 2, 2]])
    >>> edge_chunks(ei, 3, 4)
    [(0, 2, 0, 4), (2, 3, 4, 6)]
    """
    num_edges = edge_index.shape[1]
    if chunk_size is None or num_edges <= chunk_size:
        return [(0, num_nodes, 0, num_edges)]
    dst = edge_index[1]
    if num_edges > 1 and bool((dst[1:] < dst[:-1]).any()):
        raise ValueError("edge chunking needs edges sorted by target (edge_index[1])")
    # first edge of every node: starts[n] = number of edges with target < n
    starts = torch.searchsorted(dst, torch.arange(num_nodes + 1, device=dst.device)).tolist()
    chunks, n0 = [], 0
    while n0 < num_nodes:
        n1 = n0 + 1
        while n1 < num_nodes and starts[n1 + 1] - starts[n0] <= chunk_size:
            n1 += 1
        chunks.append((n0, n1, starts[n0], starts[n1]))
        n0 = n1
    return chunks


class _Chain:
    """The stages of one sweep, cut into chunks of receiving atoms: set up once per call.

    ``names`` / ``feats``: the edge features that carry gradients to pos; ``chunks``: ``(n0, n1,
    e0, e1)`` per chunk (``whole``: a single chunk, no slicing); ``params``: what the recomputed
    VJPs hand their parameter gradients to (training only).
    """

    def __init__(self, model, stage, edges, x0, training: bool, chunks, device):
        self.stage, self.edges, self.training, self.device = stage, edges, training, device
        self.names = _grad_fields(edges)
        self.feats = [getattr(edges, n) for n in self.names]
        self.params = [p for p in model.parameters() if p.requires_grad] if training else []
        self.num_stages = 1 + len(model.blocks)
        self.chunks = chunks if chunks is not None else [(0, x0.shape[0], 0, edges.index.shape[1])]
        self.whole = len(self.chunks) == 1
        # per chunk: its edges (index only; features come in as arguments) and its features
        self.chunk_edges = [edges if self.whole else edges._replace(index=edges.index[:, e0:e1])
                            for _, _, e0, e1 in self.chunks]
        self.chunk_feats = [self.feats if self.whole else [f[e0:e1] for f in self.feats]
                            for _, _, e0, e1 in self.chunks]

    def stage_fn(self, s, c):
        """``(x, feats of chunk c) -> rows of chunk c`` of stage ``s``."""
        n0, n1, _, _ = self.chunks[c]
        sub = self.chunk_edges[c]

        def fn(x, fs):
            y = self.stage(s, x, _with_fields(sub, self.names, fs))
            return y if self.whole else y[n0:n1]

        return fn

    def run_stage(self, s, x, rng):
        """Forward of one stage over all chunks; keeps only the stage input (training)."""
        outs = []
        for c in range(len(self.chunks)):
            fn = self.stage_fn(s, c)
            ctx = contextlib.nullcontext() if c == 0 else _rng_restored(rng, self.device)
            with ctx:
                if self.training:
                    outs.append(checkpointed_call(lambda x_, *fs, fn=fn: fn(x_, list(fs)), x, *self.chunk_feats[c]))
                else:
                    with torch.no_grad():
                        outs.append(fn(x, self.chunk_feats[c]))
        return outs[0] if self.whole else torch.cat(outs, 0)

    def run_kept(self, s, x):
        """Stage ``s`` once with its whole graph: ``(output, the aliases of the edge features it saw)``."""
        aliases = [f.view_as(f) for f in self.feats]  # fresh: this stage's direct share only
        return self.stage(s, x, _with_fields(self.edges, self.names, aliases)), aliases


def _forward_pass(chain: _Chain, x0, keep: int, rngs_on: bool):
    """Step 2: the stages in order. Returns ``(x_L, xs, rngs, kept)``: each stage's input ``xs[s]``
    (all that is kept of a recomputed stage), the random state before it (``rngs_on``: dropout),
    and ``kept[s] = (output, aliases)`` of the last ``keep`` stages (training), whose graphs stay."""
    first_kept = chain.num_stages - (max(0, min(int(keep), chain.num_stages)) if chain.training else 0)
    kept = {}
    xs, rngs, x = [], [], x0
    for s in range(chain.num_stages):
        rngs.append(_rng_capture(chain.device) if rngs_on else None)
        xs.append(x)
        if s >= first_kept:
            x, aliases = chain.run_kept(s, x)
            kept[s] = (x, aliases)
        else:
            x = chain.run_stage(s, x, rngs[-1])
    return x, xs, rngs, kept


def _backward_sweep(chain: _Chain, g, xs, rngs, kept) -> list:
    """Step 4 (and the embedding's share of 5): stages ``L-1 .. 0``, chunk by chunk, from
    ``g = dE/dx_L``. Returns ``dE/dfeats`` per edge feature: the sum of every stage's direct share
    (the cotangent for the edge features' VJP to pos)."""
    chunks, whole = chain.chunks, chain.whole
    total = [[None] * len(chunks) for _ in chain.feats]  # [feature][chunk]

    def add(i, c, e):
        total[i][c] = e if total[i][c] is None else total[i][c] + e

    for s in range(chain.num_stages - 1, -1, -1):
        wrt_x = s > 0
        if s in kept:  # its graph is alive: the VJP with create_graph, no recomputation
            g_next, shares = _kept_vjp(kept.pop(s), xs[s], g, wrt_x)
            for i, e in enumerate(shares):
                for c, (_, _, e0, e1) in enumerate(chunks):
                    add(i, c, e if whole else e[e0:e1])
        else:  # g_s = sum_c VJP_c, e = cat_c e_c
            g_next = None
            for c in range(len(chunks)):
                outs = _recomputed_vjp(chain, s, c, xs[s], g, rngs[s], wrt_x)
                if wrt_x:
                    g_next = outs[0] if g_next is None else g_next + outs[0]
                    outs = outs[1:]
                for i, e in enumerate(outs):
                    add(i, c, e)
        g = g_next
    return [parts[0] if whole else torch.cat(parts, 0) for parts in total]


def _kept_vjp(kept_stage, x, g, wrt_x: bool):
    """``(dE/dx or None, direct dE/dfeats)`` of a kept stage, on its live graph (create_graph)."""
    y, aliases = kept_stage
    wrt = ([x] if wrt_x else []) + aliases
    outs = _zeros_for_none(torch.autograd.grad(y, wrt, g, create_graph=True, allow_unused=True), wrt)
    return (outs[0], outs[1:]) if wrt_x else (None, outs)


def _recomputed_vjp(chain: _Chain, s, c, x, g, rng, wrt_x: bool):
    """``(dE/dx (if wrt_x), *direct dE/dfeats)`` of chunk ``c`` of stage ``s`` at cotangent ``g``:
    a :class:`_RecomputedVJP` in training (differentiable, recomputed in ``loss.backward()``),
    a plain detached VJP at evaluation."""
    n0, n1, _, _ = chain.chunks[c]
    vjp = _BlockVJP(chain.stage_fn(s, c), chain.names, chain.params, wrt_x=wrt_x)
    g_c = g if chain.whole else g[n0:n1]
    feats = chain.chunk_feats[c]
    if chain.training:
        return _RecomputedVJP.apply(vjp, rng, chain.device, 2 + len(chain.feats),
                                    x if wrt_x else x.detach(), g_c, *feats, *chain.params)
    with _rng_restored(rng, chain.device):
        x_leaf = x.detach().requires_grad_(wrt_x)
        outs = vjp(False, x_leaf, g_c.detach(), *[f.detach().requires_grad_(True) for f in feats])
    return [o.detach() for o in outs]


def blockwise_sweep(model, stage, edges, pos, x0, readout, training: bool, chunks=None, keep: int = 0):
    """Steps 2-5 of the force-aware strategy over a chain of stages: ``(energy, dE/dpos)``.

    ``stage(s, x, e) -> y``: stage ``s`` of the chain, 0 = the embedding (its ``x`` is ``x0``, a
    placeholder it ignores and that is not differentiated), ``s >= 1`` = ``model.blocks[s - 1]``;
    ``e`` is ``edges`` (or a chunk of them) with fresh aliases of the edge features, ``y`` the
    stage's output rows. ``readout(x_L) -> energy`` (per graph). ``pos`` requires grad and
    ``edges`` were computed from it. ``chunks``: ``(n0, n1, e0, e1)`` per chunk of
    :func:`edge_chunks` (``None``: one chunk with all ``x0.shape[0]`` rows and all edges).
    ``keep`` (``memory.keep_blocks``, training only): the last ``keep`` stages are not recomputed:
    they run once with their graph, unchunked, and their VJP is taken with ``create_graph`` on
    that graph, which stays alive for ``loss.backward()`` as in the plain path. Each kept stage
    costs the memory of one stage's forward + VJP graph and saves its three recomputations.

    Three parts: :func:`_forward_pass` (step 2), the energy head (step 3), :func:`_backward_sweep`
    (steps 4-5 up to the edge features), then one VJP of the edge features to pos.

    Run by :class:`.runner.ForceRunner` for one process and for the graph-partitioned model
    (``parallel/partitioned.py``, whose stages run a halo exchange: collectives). Every branch
    here depends on structure only (stage count, chunk count, which features require grad),
    never on data, so every rank of a partition group runs the same collectives in the same
    order: in the forward, in the backward sweep and inside ``loss.backward()``.
    """
    chain = _Chain(model, stage, edges, x0, training, chunks, pos.device)
    # dropout / drop-path: the same masks in every recomputation
    x, xs, rngs, kept = _forward_pass(chain, x0, keep, rngs_on=model.training)

    # energy and g = dE/dx_L through the per-atom head
    x_last = x if training else x.detach().requires_grad_(True)
    energy = readout(x_last)
    (g,) = torch.autograd.grad(energy.sum(), x_last, create_graph=training)

    total = _backward_sweep(chain, g, xs, rngs, kept)
    # dE/dpos through the edge features
    (grad,) = torch.autograd.grad(chain.feats, pos, total, create_graph=training)
    return energy, grad


__all__ = ["edge_chunks", "checkpointed_call", "blockwise_sweep"]
