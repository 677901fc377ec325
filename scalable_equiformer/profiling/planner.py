"""Pick the lever set with the best expected speed whose estimated peak fits a memory budget.

Candidates combine ``memory.checkpointing`` (none, blocks, forces), ``memory.precision`` (the
config's, or also bf16 when allowed), ``memory.micro_batch_size`` (divisors of the molecules per
rank per step), with ``forces`` also ``memory.edge_chunk_size`` or ``memory.keep_blocks`` (blocks
not recomputed: between forces and none in time and memory), and, on several GPUs,
``parallel.graph_partitions`` (P dividing the GPU count; the other factor is data parallel).
Each gets an estimated per-rank peak (``estimate.py``) and an expected time per optimizer step
relative to the levers-off step on one GPU (:func:`relative_time`), from time factors
(:class:`TimeFactors`, :func:`time_factors`). The plan is the fastest candidate that fits
``usable = gpu_memory * (1 - headroom) - reserve``; ties go to fewer partitions, then the
smaller peak.

Where the time factors come from:

* CPU: measured on this project's CPU benchmarks (``benchmarks/memory.md``): :data:`CPU_FACTORS`.
* CUDA: the file :data:`CUDA_FACTORS_FILE` (``time_factors_cuda.json`` next to this module), written
  by ``tools/memory_tables.py --cuda-factors`` from the JSON of a GPU run of
  ``benchmarks/gpu/run.sh`` (:func:`factors_from_profile`: median time ratios over the molecules
  measured). Until a GPU run exists the file holds ``"factors": null`` and the planner uses
  :data:`CUDA_ASSUMED`: the CPU's checkpointing factors, and bf16 / micro-batch factors that are
  assumptions, not measurements; its ``source`` says so, and ``memory_profile --plan`` prints it.
  Measured CUDA factors replace the assumed ones key by key; keys a run did not measure stay.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import UserError
from ..memory.levers import Levers

#: step time of each checkpointing mode relative to none (CPU, Lmax 2, hand-written tensor
#: product; benchmarks/memory.md: blocks 1.31-1.35, forces 1.9-2.2 at 21-180 atoms)
CHECKPOINT_TIME = {"none": 1.0, "blocks": 1.33, "forces": 2.05}
#: what ``forces`` costs beyond the blocks' recomputations (edge-feature graph, per-stage autograd
#: calls), which ``keep_blocks`` does not save: AT-AT, keep 1-4 of 6 blocks measured 2.06, 1.76,
#: 1.71, 1.51 (benchmarks/memory_keep_atat_b1.json), i.e. ~0.14 per kept block down from 2.05
FORCES_FIXED = 0.2
#: step time of each precision relative to fp32 (cuda: tensor cores, assumed, not measured here;
#: cpu bf16: measured 0.92-1.12; cpu fp16: assumed)
PRECISION_TIME = {"cuda": {"fp32": 1.0, "bf16": 0.75, "fp16": 0.75}, "cpu": {"fp32": 1.0, "bf16": 1.0, "fp16": 1.5}}
#: cost of each extra micro-batch (kernel launches, smaller matrices) relative to one
MICRO_OVERHEAD = {"cuda": 0.05, "cpu": 0.01}
#: cost of each extra edge chunk (node-level work repeated per chunk)
CHUNK_OVERHEAD = 0.08

HEADROOM = 0.10  # allocator fragmentation and caching
RESERVE = 0.5 * 2**30  # bytes: CUDA context, kernels, workspace (not in max_memory_allocated)


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
    """``"40GB"``, ``"40 GiB"``, ``"512MB"``, ``"1.5e9"`` -> bytes (GB = GiB = 2**30: GPUs are sold
    in binary gigabytes). Unparsable text, a size that is not finite, not > 0 or under one byte is a
    :class:`UserError` ``<flag> '<text>': <problem>`` (``flag`` "" for the argparse type, which names
    the flag itself).

    >>> parse_bytes("40GB") == 40 * 2**30
    True
    """
    where = f"{flag} {text!r}" if flag else repr(text)
    example = "such as 40GB or 80GiB"
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    try:
        value = float(m.group(1)) if m else None
    except ValueError:
        value = None
    if value is None:
        raise UserError(f"{where}: expected a size {example}")
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    size = value * 1024.0 ** power
    if not math.isfinite(size):
        raise UserError(f"{where}: not a finite size; expected one {example}")
    if not value > 0:
        raise UserError(f"{where}: must be > 0")
    if size < 1:
        raise UserError(f"{where}: less than one byte; expected a size {example}")
    return int(size)


#: extra time of a partitioned step over its share of the work (halo exchanges, replicated node
#: work on halo atoms, the radius graph built on every rank); CPU gloo measured 5 % halo traffic at
#: P = 4 (benchmarks/partition_cpu.json); assumed 10 % for GPUs
PARTITION_OVERHEAD = 0.10


@dataclass(frozen=True)
class TimeFactors:
    """Step-time factors of the levers, relative to the levers-off step (see the module docstring)."""

    checkpoint: dict  # memory.checkpointing -> time factor (none 1.0)
    forces_fixed: float  # what `forces` costs beyond its recomputations (keep_blocks does not save it)
    precision: dict  # memory.precision -> time factor (fp32 1.0)
    micro_overhead: float  # per extra micro-batch
    chunk_overhead: float  # per extra edge chunk
    partition_overhead: float  # partitioned step over its share of the work
    source: str = ""  # where these numbers come from (measured where, or assumed)

    def as_dict(self) -> dict:
        return asdict(self)


#: measured on the CPU (benchmarks/memory.md)
CPU_FACTORS = TimeFactors(dict(CHECKPOINT_TIME), FORCES_FIXED, dict(PRECISION_TIME["cpu"]), MICRO_OVERHEAD["cpu"],
                          CHUNK_OVERHEAD, PARTITION_OVERHEAD,
                          "CPU: measured (benchmarks/memory.md); fp16 1.5 assumed")
#: for CUDA while no CUDA figures exist
CUDA_ASSUMED = TimeFactors(dict(CHECKPOINT_TIME), FORCES_FIXED, dict(PRECISION_TIME["cuda"]), MICRO_OVERHEAD["cuda"],
                           CHUNK_OVERHEAD, PARTITION_OVERHEAD,
                           "CUDA: no CUDA figures yet; checkpointing and chunk factors measured on the CPU, "
                           "bf16/fp16 0.75, micro-batch overhead 0.05 and partition overhead 0.10 assumed")
#: where measured CUDA factors go (``tools/memory_tables.py --cuda-factors``); "factors": null = none yet
CUDA_FACTORS_FILE = Path(__file__).with_name("time_factors_cuda.json")


def load_time_factors(path=None, base: TimeFactors = CUDA_ASSUMED) -> Optional[TimeFactors]:
    """The measured factors in ``path`` (default :data:`CUDA_FACTORS_FILE`) over ``base``, key by
    key; None when the file is absent or holds no factors."""
    path = Path(path) if path is not None else CUDA_FACTORS_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a time-factors JSON ({exc})") from None
    f = doc.get("factors")
    if not f:
        return None
    out = replace(base, checkpoint={**base.checkpoint, **f.get("checkpoint", {})},
                  precision={**base.precision, **f.get("precision", {})},
                  source=str(doc.get("source") or path))
    for key in ("forces_fixed", "micro_overhead", "chunk_overhead", "partition_overhead"):
        if f.get(key) is not None:
            out = replace(out, **{key: float(f[key])})
    return out


def time_factors(device: str = "cuda", path=None) -> TimeFactors:
    """The factors for ``device``: CPU_FACTORS, or the measured CUDA ones, else CUDA_ASSUMED."""
    if not str(device).startswith("cuda"):
        return CPU_FACTORS
    return load_time_factors(path) or CUDA_ASSUMED


def factors_from_profile(doc: dict, name: str = "") -> dict:
    """Time factors measured in a ``tools/memory_profile.py`` JSON (``doc``): per molecule and
    batch, each lever set's step time over the levers-off one; each factor the median over the
    molecules. On CUDA the step time is the synchronised wall time (``step_seconds``), on the CPU
    the process CPU time. Returns ``{"factors", "source", "samples"}`` for
    :data:`CUDA_FACTORS_FILE`; only what was measured is in ``factors``."""

    device = str(doc.get("device", "?"))
    key_t = "step_seconds" if device.startswith("cuda") else "step_cpu_seconds"
    blocks = int(doc.get("num_blocks") or 0)
    ok = [r for r in doc.get("runs", [])
          if r.get(key_t) and not (r.get("oom") or r.get("error") or r.get("not_measured"))]
    base = {(r.get("data"), r["atoms"], r["batch"]): r[key_t] for r in ok if Levers(**r["levers"]).label() == "none"}
    ratios = {}
    for r in ok:
        key = (r.get("data"), r["atoms"], r["batch"])
        b = base.get(key)
        if b:
            ratios.setdefault(key, []).append((Levers(**r["levers"]), r[key_t] / b, r))
    samples: dict = {}

    def add(name_, value, r):
        samples.setdefault(name_, []).append({"atoms": r["atoms"], "batch": r["batch"], "value": round(value, 4)})

    for mol in ratios.values():
        forces = next((t for lv, t, _ in mol if lv == Levers("forces")), None)
        for lv, t, r in mol:  # one lever on (or forces + one), each against its base
            if lv in (Levers("blocks"), Levers("forces")):
                add(f"checkpoint.{lv.checkpointing}", t, r)
            elif lv in (Levers(precision="bf16"), Levers(precision="fp16")):
                add(f"precision.{lv.precision}", t, r)
            elif lv.micro_batch_size and lv == Levers(micro_batch_size=lv.micro_batch_size):
                n = math.ceil(r["batch"] / lv.micro_batch_size)
                if n > 1:
                    add("micro_overhead", (t - 1.0) / (n - 1), r)
            elif forces and lv == Levers("forces", keep_blocks=lv.keep_blocks) and 0 < lv.keep_blocks < blocks:
                kept = lv.keep_blocks / blocks  # t = 1 + F + (forces - 1 - F)(1 - kept)
                add("forces_fixed", (t - 1.0 - (forces - 1.0) * (1.0 - kept)) / kept, r)
            elif forces and lv == Levers("forces", edge_chunk_size=lv.edge_chunk_size) and lv.edge_chunk_size:
                n = math.ceil(r["edges"] / lv.edge_chunk_size)
                if n > 1:
                    add("chunk_overhead", (t / forces - 1.0) / (n - 1), r)
    factors: dict = {}
    for k, vals in samples.items():
        med = round(statistics.median(v["value"] for v in vals), 4)
        if "." in k:
            group, sub = k.split(".")
            factors.setdefault(group, {})[sub] = med
        else:
            factors[k] = med
    mols = sorted({(r["atoms"], r["batch"]) for r in ok})
    source = (f"measured on {device}{' (' + name + ')' if name else ''}: median step-time ratios over "
              f"{len(mols)} molecule(s) " + ", ".join(f"{a} atoms x {b}" for a, b in mols))
    return {"factors": factors or None, "source": source, "samples": samples}


def relative_time(levers: Levers, *, batch: int, edges: int, device: str = "cuda", gpus: int = 1,
                  edge_fraction: Optional[float] = None, num_blocks: int = 0,
                  factors: Optional[TimeFactors] = None) -> float:
    """Expected time per optimizer step of ``levers`` relative to the levers-off step on one GPU.

    ``batch`` molecules per step over ``gpus`` GPUs: ``gpus / P`` data-parallel groups share the
    batch, and each molecule's edge work is split over the P ranks of a group (``edge_fraction``:
    the largest part's share, from :class:`~.estimate.PartStats`; default ``1 / P``).
    ``num_blocks``: the model's blocks, for ``keep_blocks``. ``factors``: default
    :func:`time_factors` of ``device``.
    """
    f = factors or time_factors(device)
    parts = max(int(levers.graph_partitions), 1)
    groups = max(gpus // parts, 1)
    per_rank = max(batch // groups, 1)
    micro = min(levers.micro_batch_size or per_rank, per_rank)
    n_micro = math.ceil(per_rank / micro)
    ckpt = f.checkpoint[levers.checkpointing]
    if levers.checkpointing == "forces" and levers.keep_blocks and num_blocks:
        # a kept block costs what it costs in the plain path; the machinery's own cost stays
        swept = max(num_blocks - levers.keep_blocks, 0)  # blocks the sweep recomputes
        ckpt = 1.0 + f.forces_fixed + (ckpt - 1.0 - f.forces_fixed) * swept / num_blocks
    t = ckpt * f.precision[levers.precision]
    t *= 1.0 + f.micro_overhead * (n_micro - 1)
    if levers.edge_chunk_size is not None:
        n_chunks = math.ceil(edges * micro / levers.edge_chunk_size)
        t *= 1.0 + f.chunk_overhead * max(n_chunks - 1, 0)
    t *= per_rank / batch  # data parallel: each group takes its share of the batch
    if parts > 1:
        share = edge_fraction if edge_fraction is not None else 1.0 / parts
        t *= share * (1.0 + f.partition_overhead)
    return t


@dataclass
class Candidate:
    levers: Levers
    peak_bytes: int
    relative_time: float
    fits: bool = False
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"levers": self.levers.as_dict(), "peak_bytes": self.peak_bytes,
                "relative_time": self.relative_time, "fits": self.fits}


@dataclass
class Plan:
    budget_bytes: int
    usable_bytes: int
    candidates: list  # sorted: fitting first, fastest first
    best: Optional[Candidate]
    factors: Optional[TimeFactors] = None  # the time factors the candidates were ranked with

    def overrides(self) -> list[str]:
        return self.best.levers.overrides() if self.best is not None else []


def node_partitions(gpus: int, batch: int, gpus_per_node: Optional[int] = None) -> list[int]:
    """The graph partition counts P worth trying on ``gpus`` GPUs, ``gpus_per_node`` to a node:
    P divides ``gpus``, the data-parallel factor ``gpus / P`` divides ``batch``, and on more than
    one node P divides ``gpus_per_node`` (a molecule's partitions on one node: halo traffic stays
    on its links; the trainer refuses other P). UserError when ``gpus_per_node`` does not divide
    ``gpus``."""
    G = gpus if gpus_per_node is None else gpus_per_node
    if G < 1 or gpus % G:
        raise UserError(f"--gpus-per-node {G} must divide --gpus {gpus}")
    return [p for p in range(1, gpus + 1) if gpus % p == 0 and batch % (gpus // p) == 0 and (G == gpus or G % p == 0)]


def launch_lines(gpus: int, gpus_per_node: Optional[int], args: str) -> list[str]:
    """How to start ``train.py args`` on ``gpus`` GPUs: one deepspeed line on one node; on N > 1
    nodes of G GPUs each, the torchrun line each node runs and the DeepSpeed hostfile and no-ssh
    forms (README, "Multi-node")."""
    G = gpus if gpus_per_node is None else gpus_per_node
    nodes = gpus // G
    if nodes == 1:
        return [f"deepspeed --num_gpus {gpus} train.py {args}".rstrip()]
    return [
        f"torchrun --nnodes {nodes} --node_rank $NODE_RANK --nproc_per_node {G} --rdzv_backend c10d "
        f"--rdzv_endpoint NODE0:29500 train.py {args}".rstrip(),
        f"deepspeed --hostfile hostfile --master_addr NODE0 --master_port 29500 train.py {args}".rstrip()
        + f"   # hostfile: {nodes} lines 'HOST slots={G}'",
        f"deepspeed --no_ssh --node_rank $NODE_RANK --master_addr NODE0 --master_port 29500 --hostfile hostfile "
        f"train.py {args}".rstrip(),
    ]


def candidate_levers(batch: int, edges: int, precisions: Iterable[str] = ("fp32",),
                     chunk_sizes: Optional[Iterable[int]] = None, gpus: int = 1,
                     partitions: Optional[Iterable[int]] = None, num_blocks: int = 0) -> list[Levers]:
    """All combinations worth considering for ``batch`` molecules of ``edges`` edges each on
    ``gpus`` GPUs. ``partitions``: the graph partition counts to try (default: every divisor P of
    ``gpus`` whose data-parallel factor ``gpus / P`` divides the batch). Edge chunks are tried
    without partitions only (the partitioned model does not chunk); ``keep_blocks`` 1 ..
    ``num_blocks - 1`` with ``forces`` and no chunks."""
    if partitions is None:
        partitions = [p for p in range(1, gpus + 1) if gpus % p == 0 and batch % (gpus // p) == 0]
    out = []
    for parts in partitions:
        per_rank = batch // max(gpus // parts, 1)
        micro_sizes = [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
        for precision in precisions:
            for micro in micro_sizes:
                micro_value = None if micro == per_rank else micro
                for ckpt in ("none", "blocks", "forces"):
                    out.append(Levers(ckpt, micro_value, None, precision, parts))
                for keep in range(1, num_blocks):
                    out.append(Levers("forces", micro_value, None, precision, parts, keep))
                if micro == 1 and parts == 1:
                    sizes = chunk_sizes if chunk_sizes is not None else _default_chunks(edges)
                    for c in sizes:
                        out.append(Levers("forces", micro_value, int(c), precision, parts))
    return out


def _default_chunks(edges: int) -> list[int]:
    """Chunk sizes halving the edges of one molecule, rounded to 256, down to 1/16."""
    sizes = []
    for div in (2, 4, 8, 16):
        c = max(256, int(math.ceil(edges / div / 256.0)) * 256)
        if c < edges and c not in sizes:
            sizes.append(c)
    return sizes


def usable_bytes(budget_bytes: int, *, device: str = "cuda", headroom: float = HEADROOM,
                 reserve: float = RESERVE) -> int:
    """What a step may use of ``budget_bytes``: minus the allocator's headroom and, on CUDA, the
    runtime's reserve (context, kernels). Zero or less: nothing can fit.

    >>> usable_bytes(40 * 2**30) / 2**30
    35.5
    """
    return int(budget_bytes * (1.0 - headroom) - (reserve if device.startswith("cuda") else 0))


def check_budget(budget_bytes: int, text: str, *, device: str = "cuda") -> None:
    """UserError when ``budget_bytes`` (as the user wrote it: ``text``) leaves nothing for a step."""
    if usable_bytes(budget_bytes, device=device) <= 0:
        least = RESERVE / (1.0 - HEADROOM) / 2**30
        raise UserError(f"--gpu-memory {text}: below what the CUDA runtime reserves ({RESERVE / 2**30:.1f} GiB for its "
                        f"context and kernels, plus {HEADROOM:.0%} allocator headroom): nothing can fit; give the "
                        f"GPU's memory (more than {least:.2f} GiB), e.g. 40GB")


def plan(estimator: Callable[..., int], budget_bytes: int, *, batch: int, edges: int,
         device: str = "cuda", precisions: Iterable[str] = ("fp32",), headroom: float = HEADROOM,
         reserve: float = RESERVE, timer: Optional[Callable[[Levers], float]] = None,
         chunk_sizes: Optional[Iterable[int]] = None, gpus: int = 1,
         partitions: Optional[Iterable[int]] = None, edge_fractions: Optional[dict] = None,
         num_blocks: int = 0) -> Plan:
    """The fastest lever set whose ``estimator(levers, batch_per_group)`` peak fits ``budget_bytes``.

    ``estimator`` maps Levers and the molecules per partition group per step to the peak bytes
    of one rank (e.g. :func:`estimate.estimate`); ``timer`` maps Levers to the relative step time
    (default :func:`relative_time`, with ``edge_fractions[P]`` the largest part's edge share).
    """
    usable = usable_bytes(budget_bytes, device=device, headroom=headroom, reserve=reserve)
    fractions = edge_fractions or {}
    factors = time_factors(device)
    timer = timer or (lambda lv: relative_time(lv, batch=batch, edges=edges, device=device, gpus=gpus,
                                               edge_fraction=fractions.get(lv.graph_partitions), num_blocks=num_blocks,
                                               factors=factors))
    cands = []
    for lv in candidate_levers(batch, edges, precisions, chunk_sizes, gpus=gpus, partitions=partitions,
                               num_blocks=num_blocks):
        per_group = batch // max(gpus // lv.graph_partitions, 1)
        peak = int(estimator(lv, per_group))
        cands.append(Candidate(lv, peak, float(timer(lv)), peak <= usable))
    cands.sort(key=lambda c: (not c.fits, round(c.relative_time, 6), c.levers.graph_partitions, c.peak_bytes))
    best = cands[0] if cands and cands[0].fits else None
    return Plan(budget_bytes, usable, cands, best, factors)
