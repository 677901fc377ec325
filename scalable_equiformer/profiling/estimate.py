"""Analytic estimate of a training step's peak memory, per config, atoms, edges, batch and levers.

peak = parameters + gradients + optimizer state (per ZeRO stage and rank count) + activations.

* **Model states** are exact counts: P parameters of ``b`` bytes; AdamW keeps two moments
  (8 bytes per parameter). ZeRO stage 1 shards the optimizer state over R ranks, stage 2 also the
  gradients, stage 3 also the parameters (plus the largest gathered layer in flight).
* **Activations** are what the force loss keeps: the forward graph, plus the graph of the force
  computation (``create_graph=True``) that ``loss.backward()`` differentiates through. Per block
  that is a number of floats per edge and per node that follows from the irreps (see
  :func:`activation_coefficients`); levers change how many blocks' graphs are alive at once:

  - ``checkpointing=none``: all L blocks' forward + double-backward graphs at the peak.
  - ``checkpointing=blocks``: recomputed activations are captured by the double-backward graph,
    so only the forward half of the saving remains (measured, not assumed; see
    ``BLOCK_CKPT_KEEP``).
  - ``checkpointing=forces``: block inputs (node features) for all blocks, plus one block's
    forward + double-backward graph at a time; with ``keep_blocks=k`` also the k kept blocks'
    forward + VJP graphs (alive until ``loss.backward()``, as in the plain path).
  - ``micro_batch_size=m``: the graph of m molecules instead of B.
  - ``edge_chunk_size=c``: edge work in chunks; only the transient part of one block shrinks.
  - ``precision=bf16|fp16``: tensors of the low-precision ops take 2 bytes instead of 4.
  - ``graph_partitions=P`` (``parallel.graph_partitions``): each rank holds the graph of its part
    only: the edges into the atoms it owns and its owned + halo atoms (:class:`PartStats`, from
    the real partition of the molecule), with every lever above applied to that part.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..memory.levers import Levers

ADAM_STATE_PER_PARAM = 2  # exp_avg and exp_avg_sq


@dataclass
class ModelStates:
    """Bytes per rank of what lives for the whole run."""

    params: int
    grads: int
    optimizer: int
    zero_stage: int = 0
    ranks: int = 1

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def model_states(num_params: int, *, param_bytes: int = 4, zero_stage: int = 0, ranks: int = 1,
                 largest_layer: int = 0) -> ModelStates:
    """Parameters, gradients and AdamW state per rank.

    ``param_bytes`` is 4 for fp32 parameters (autocast keeps parameters in fp32), 8 for fp64.
    ``largest_layer`` (parameters) is the stage-3 gather buffer that is alive during a layer's use.

    >>> model_states(1000, zero_stage=0).total
    16000
    >>> model_states(1000, zero_stage=2, ranks=4).as_dict()["optimizer"]
    2000
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    r = max(int(ranks), 1)
    params = num_params * param_bytes
    grads = num_params * param_bytes
    opt = num_params * param_bytes * ADAM_STATE_PER_PARAM
    if zero_stage >= 1:
        opt = -(-opt // r)
    if zero_stage >= 2:
        grads = -(-grads // r)
    if zero_stage >= 3:
        params = -(-params // r) + largest_layer * param_bytes
    return ModelStates(params=params, grads=grads, optimizer=opt, zero_stage=zero_stage, ranks=r)


@dataclass
class Estimate:
    states: ModelStates
    activation_bytes: int
    detail: dict = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return self.states.total + self.activation_bytes

    def as_dict(self) -> dict:
        return {"states": self.states.as_dict(), "activation_bytes": self.activation_bytes,
                "peak_bytes": self.peak_bytes, "detail": self.detail}


# ---------------------------------------------------------------------------------------------
# activations: a census of the autograd graph on tiny molecules, extrapolated linearly in edges
# and atoms


#: Peak activations / census bytes per lever, fitted to CPU measurements of the paper's Lmax-2
#: model (benchmarks/memory.md, "How the estimate is made"): none, blocks and forces on synthetic
#: molecules of 60 and 120 atoms, batch 1, fp32 (benchmarks/memory_calibration.json); forces_16bit
#: on AT-AT and aspirin with bf16. The census counts the tensors the graph saves; the peak adds the
#: gradient buffers alive while ``loss.backward()`` walks that graph. For ``forces`` those buffers
#: (one stage's double backward) are large next to one stage's graph, and in 16 bits they stay
#: mostly fp32 (gradients of fp32 leaves and parameters), hence the larger factor.
CALIBRATION = {"none": 1.02, "blocks": 1.03, "forces": 1.18, "forces_16bit": 1.5}


class _Census:
    """Bytes of the distinct storages that autograd saved for backward and that are still alive
    when :attr:`bytes` is read (parameters and buffers excluded)."""

    def __init__(self, exclude):
        self.exclude = exclude
        self.saved = []

    def pack(self, t):
        if t.untyped_storage().data_ptr() not in self.exclude:
            self.saved.append(weakref.ref(t))
        return t

    def unpack(self, t):
        return t

    @property
    def bytes(self) -> int:
        seen = {}
        for ref in self.saved:
            t = ref()
            if t is not None:
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())


@dataclass
class Linear:
    """``per_edge * E + per_node * N + const`` bytes."""

    per_edge: float
    per_node: float
    const: float = 0.0

    def __call__(self, edges: float, nodes: float) -> float:
        return max(self.per_edge * edges + self.per_node * nodes + self.const, 0.0)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ActivationProfile:
    """Census coefficients of one model config in one precision."""

    plain: Linear  # whole graph kept for the force loss, checkpointing=none
    blocks: Linear  # the same with per-block checkpointing
    forces_kept: Linear  # what checkpointing=forces keeps between stages (inputs, edge features)
    stage: Linear  # one stage's forward + VJP graph (the largest stage): alive once at a time
    stage_node: float  # per-node bytes of a stage that every edge chunk repeats

    def as_dict(self) -> dict:
        return {k: (v.as_dict() if isinstance(v, Linear) else v) for k, v in asdict(self).items()}


def _fit(points) -> Linear:
    import numpy as np

    a = np.array([[e, n, 1.0] for e, n, _ in points])
    b = np.array([v for _, _, v in points])
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    return Linear(float(coef[0]), float(coef[1]), float(coef[2]))


def activation_profile(cfg, precision: Optional[str] = None, device: str = "cpu") -> ActivationProfile:
    """Run the model on three tiny molecules and count what each lever's graph saves.

    Takes a few seconds: it builds the model from ``cfg`` and runs forces with
    ``create_graph=True`` under ``torch.autograd.graph.saved_tensors_hooks``.
    """
    import copy

    import torch

    from . import measured_step, systems

    precision = precision or cfg.memory.precision
    cfg = copy.deepcopy(cfg)
    model, dtype = measured_step.build(cfg, torch.device(device), 20)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    z, pos = systems.synthetic_molecule(24)
    # (atoms, cutoff): edges vary at fixed atoms and atoms vary at fixed density
    probes = [(12, cfg.model.cutoff), (24, cfg.model.cutoff), (24, 0.6 * cfg.model.cutoff)]
    full_cutoff = model.cutoff
    results = {"plain": [], "blocks": [], "forces": [], "stage": []}
    try:
        for n, cutoff in probes:
            model.cutoff = cutoff
            batch = measured_step.make_batch(z[:n], pos[None, :n], dtype, device)
            num_edges = systems.count_edges(pos[:n], cutoff)
            for name, saved in _path_census(model, batch, exclude, precision, device).items():
                results[name].append((num_edges, n, saved))
            results["stage"].append((num_edges, n, _largest_stage_bytes(model, batch, n, exclude, precision, device)))
    finally:
        model.cutoff = full_cutoff
    stage = _fit(results["stage"])
    return ActivationProfile(plain=_fit(results["plain"]), blocks=_fit(results["blocks"]),
                             forces_kept=_fit(results["forces"]), stage=stage, stage_node=max(stage.per_node, 0.0))


def _path_census(model, batch, exclude, precision: str, device) -> dict:
    """Bytes autograd saves for the force loss on ``batch`` along each force path (plain, blocks,
    forces), each counted while its output still holds the graph."""
    import torch

    from ..memory import ForceRunner, autocast

    saved = {}
    for name, checkpointing in (("plain", "none"), ("blocks", "blocks"), ("forces", "forces")):
        census = _Census(exclude)
        runner = ForceRunner(Levers(checkpointing))  # no edge chunks, no kept blocks: the census of each path
        with autocast(precision, device), torch.autograd.graph.saved_tensors_hooks(census.pack, census.unpack):
            out = runner(model, batch)
        saved[name] = census.bytes  # while `out` holds the graph
        del out
    return saved


def _largest_stage_bytes(model, batch, n: int, exclude, precision: str, device) -> int:
    """The largest single stage: forward + VJP with create_graph (what `forces` recomputes)."""
    import torch

    from ..memory import autocast
    from ..memory import force_checkpoint as fc

    stage_bytes = 0
    with torch.enable_grad():
        p = batch.pos.detach().requires_grad_(True)
        edges = model.edge_features(p, model.build_graph(p, batch.batch))
        names = fc._grad_fields(edges)
        feats = [getattr(edges, k).detach().requires_grad_(True) for k in names]
        e2 = fc._with_fields(edges, names, feats)
        x = model.embed(batch.z, e2, n).detach()
        attr = model.node_attr(x)
        for block in model.blocks:
            xin = x.detach().requires_grad_(True)
            census = _Census(exclude)
            with autocast(precision, device), torch.autograd.graph.saved_tensors_hooks(census.pack, census.unpack):
                y = block(xin, attr, e2, batch.batch)
                gr = torch.autograd.grad(y, [xin] + feats, torch.ones_like(y), create_graph=True, allow_unused=True)
            stage_bytes = max(stage_bytes, census.bytes)
            x = y.detach()
            del gr, y
    return stage_bytes


@dataclass
class PartStats:
    """One molecule cut into ``parts`` parts as the partitioned model cuts it: the largest part's
    edges (incoming edges of its owned atoms) and local atoms (owned + halo), each a maximum over
    the parts, and ``edge_fraction`` = largest part's edges / all edges (the per-rank share of the
    edge work)."""

    parts: int
    edges: int
    local_atoms: int
    edge_fraction: float

    def as_dict(self) -> dict:
        return asdict(self)


def partition_stats(pos, cutoff: float, parts: int) -> PartStats:
    """:class:`PartStats` of positions ``pos [N, 3]`` (Å) at ``cutoff`` cut into ``parts`` parts.

    >>> import numpy as np
    >>> s = partition_stats(np.arange(30.0).reshape(10, 3), 6.0, 2)
    >>> s.parts, s.edges, s.local_atoms
    (2, 9, 6)
    """
    import torch

    from ..nn.graph import radius_graph
    from ..parallel.partition import partition_graph

    p = torch.as_tensor(pos, dtype=torch.float64)
    ei = radius_graph(p, float(cutoff))
    gp = partition_graph(p, ei, int(parts))
    edges = gp.edges_per_part()
    local = gp.atoms_per_part() + gp.halo_per_part()
    total = max(int(ei.shape[1]), 1)
    return PartStats(int(parts), int(edges.max()), int(local.max()), float(edges.max()) / total)


def activation_bytes(profile: ActivationProfile, levers: Levers, *, atoms: int, edges: int, batch: int,
                     calibration: Optional[dict] = None, part: Optional[PartStats] = None) -> tuple[int, dict]:
    """Peak activation bytes of one training step for ``batch`` molecules of ``atoms`` / ``edges``
    (edges per molecule), under ``levers``, on one rank. With ``levers.graph_partitions > 1`` the
    molecule is the largest part, ``part`` (:func:`partition_stats`); without ``part`` the edges
    are split evenly and every atom is counted (an upper bound on the halo). Returns (bytes, detail)."""
    cal = dict(CALIBRATION, **(calibration or {}))
    if levers.graph_partitions > 1:
        if part is not None and part.parts == levers.graph_partitions:
            atoms, edges = part.local_atoms, part.edges
        else:
            edges = -(-edges // levers.graph_partitions)
    micro = min(levers.micro_batch_size or batch, batch)
    n, e = atoms * micro, edges * micro
    if levers.checkpointing == "none":
        act = cal["none"] * profile.plain(e, n)
        detail = {"graph": act}
    elif levers.checkpointing == "blocks":
        act = cal["blocks"] * profile.blocks(e, n)
        detail = {"graph": act}
    else:
        chunk_e = e if levers.edge_chunk_size is None else min(e, levers.edge_chunk_size)
        # a chunk's edge work plus the node work that every chunk repeats (all atoms)
        stage = profile.stage.per_edge * chunk_e + profile.stage_node * n + profile.stage.const
        kept = profile.forces_kept(e, n)
        factor = cal["forces"] if levers.precision == "fp32" else cal["forces_16bit"]
        graphs = levers.keep_blocks * cal["none"] * profile.stage(e, n)  # kept blocks: whole, unchunked
        act = kept + factor * stage + graphs
        detail = {"kept": kept, "stage": factor * stage, "kept_graphs": graphs}
    return int(act), {k: int(v) for k, v in detail.items()}


def estimate(cfg, profile: ActivationProfile, levers: Levers, *, atoms: int, edges: int, batch: int,
             num_params: int, zero_stage: int = 0, ranks: int = 1, calibration: Optional[dict] = None,
             part: Optional[PartStats] = None) -> Estimate:
    """Peak bytes of one training step on one rank: model states (per ZeRO stage and rank count;
    DeepSpeed shards over every rank, graph partitions included) + activations. ``batch`` is the
    molecules this rank's partition group takes per step."""
    param_bytes = 8 if cfg.model.dtype == "float64" else 4
    states = model_states(num_params, param_bytes=param_bytes, zero_stage=zero_stage, ranks=ranks)
    act, detail = activation_bytes(profile, levers, atoms=atoms, edges=edges, batch=batch, calibration=calibration,
                                   part=part)
    return Estimate(states, act, detail)
