#!/usr/bin/env python
"""What one training step costs in memory, per lever set, and which levers fit a GPU.

    python tools/memory_profile.py --config md22_atat.yaml
    python tools/memory_profile.py --config md22_atat.yaml --levers none --levers checkpointing=forces
    python tools/memory_profile.py --config md22_atat.yaml --compare --json out.json
    python tools/memory_profile.py --config md17_aspirin --atoms 120 --sweep atoms --plot mem.png
    python tools/memory_profile.py --config md22_atat.yaml --gpu-memory 40GB --plan
    python tools/memory_profile.py --config md22_atat.yaml --levers none --levers graph_partitions=4,precision=bf16
    python tools/memory_profile.py --config md22_atat.yaml --gpu-memory 16GB --gpus 4 --plan

Each measurement runs one full training step (forward, forces with create_graph, loss, backward,
optimizer step) in a fresh subprocess: on CUDA the peak is torch.cuda.max_memory_allocated, on
the CPU the growth of the peak resident memory (VmHWM) over the step plus the resident model
states. Next to it: the analytic estimate (scalable_equiformer/profiling/estimate.py) and the
ratio measured/estimated (its census of the model's graph runs on --device). --levers takes none, all,
config, or comma-separated lever names
(memory.* keys: checkpointing, micro_batch_size, edge_chunk_size, precision, keep_blocks, and
graph_partitions = parallel.graph_partitions), each optionally =value; it can be repeated to
compare lever sets. With graph_partitions=P the measurement runs P ranks (gloo on the CPU) on
one molecule and reports the largest rank's peak and time: what each GPU must hold. --plan
--gpus N also considers graph partitions P dividing N (with --gpus-per-node G, only P dividing G:
a molecule's partitions on one node; the launch lines are then multi-node); with several molecules
(--sweep) it plans for the largest. Sizes are in GiB (2**30 bytes).

--one-process runs all measurements in one subprocess (on a GPU: seconds per measurement instead of
a process start each; the CUDA peak is reset per measurement), --time-budget S records what is not
measured within S seconds as such and still writes the JSON (benchmarks/gpu/run.sh uses both).

:func:`run` is three steps over one :class:`_Session` (the config, device, batch and activation
profiles): :func:`measure_jobs` (the table), :func:`plan_levers` (--plan) and :func:`report`
(--json, --plot).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalable_equiformer.errors import ConfigError, UserError  # noqa: E402
from scalable_equiformer.memory import Levers  # noqa: E402

GiB = 2**30
MEMORY_KEYS = Levers.keys("memory")
LEVER_KEYS = MEMORY_KEYS + Levers.keys("parallel")
#: the value a bare lever name turns on
LEVER_ON = {"checkpointing": "forces", "micro_batch_size": 1, "edge_chunk_size": "auto", "precision": "bf16",
            "graph_partitions": 2, "keep_blocks": 1}
COMPARE = ["none", "checkpointing=blocks", "checkpointing=forces", "precision=bf16",
           "checkpointing=forces,precision=bf16", "micro_batch_size=1", "checkpointing=forces,micro_batch_size=1",
           "checkpointing=forces,micro_batch_size=1,edge_chunk_size=auto"]


def parse_levers(spec: str, cfg, batch: int) -> dict:
    """A ``--levers`` value -> memory.* values (``auto`` chunk resolved later per molecule)."""
    base = cfg.memory.as_dict()
    off = Levers().as_dict()
    spec = spec.strip()
    if spec == "config":
        return base
    if spec == "none":
        return dict(off)
    if spec == "all":
        spec = "checkpointing,micro_batch_size,edge_chunk_size,precision"
    out = dict(off)
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = item.partition("=")
        key = key.strip().removeprefix("memory.").removeprefix("parallel.")
        key = "graph_partitions" if key == "partitions" else key
        if key not in LEVER_KEYS:
            raise ConfigError(f"--levers {spec!r}: unknown lever {key!r}; levers: {', '.join(LEVER_KEYS)}, "
                              "or none | all | config")
        if not value:
            out[key] = LEVER_ON[key]
        elif key in ("micro_batch_size", "edge_chunk_size"):
            out[key] = None if value in ("null", "none") else (value if value == "auto" else _int(spec, key, value))
        elif key == "graph_partitions":
            out[key] = _int(spec, key, value)
            if out[key] < 1:
                raise ConfigError(f"--levers {spec!r}: graph_partitions must be >= 1")
        elif key == "keep_blocks":
            out[key] = _int(spec, key, value)
        else:
            out[key] = value
    if out["keep_blocks"]:
        out["checkpointing"] = "forces"  # the blocks that force-aware checkpointing does not recompute
    if out["edge_chunk_size"] is not None:
        if out["graph_partitions"] > 1:
            raise ConfigError(f"--levers {spec!r}: edge_chunk_size is single-process only (not with graph_partitions)")
        out["checkpointing"] = "forces"  # chunking works inside the force-aware checkpointing
    if out["micro_batch_size"] is not None:
        out["micro_batch_size"] = min(int(out["micro_batch_size"]), batch)
        if out["micro_batch_size"] == batch:
            out["micro_batch_size"] = None
    return out


def _int(spec: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--levers {spec!r}: {key} must be an integer, not {value!r}") from None


def resolve_levers(levers: dict, edges_per_molecule: int) -> dict:
    out = dict(levers)
    if out["edge_chunk_size"] == "auto":  # about a quarter of one molecule's edges
        out["edge_chunk_size"] = max(256, int(math.ceil(edges_per_molecule / 4 / 256)) * 256)
    return out


def load(args):
    from scalable_equiformer.config import load_config

    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.path={args.data}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as exc:
        if "data.name" in str(exc) and "set data.name or data.path" in str(exc):
            return load_config(args.config, overrides + ["data.name=synthetic"])
        raise


def molecule_source(args, cfg):
    """(data file or None, atoms or None, note)."""
    if args.data:
        return args.data, None, ""
    if args.atoms:
        return None, args.atoms, ""
    if cfg.data.path:
        p = Path(cfg.data.path)
        if not p.is_file():
            p = Path(__file__).resolve().parents[1] / cfg.data.path
        if p.is_file():
            return str(p), None, ""
        raise UserError(f"data.path {cfg.data.path}: not found (pass --data FILE or --atoms N)")
    if cfg.data.name and cfg.data.name != "synthetic":
        from scalable_equiformer.data.catalog import dataset_file, get_info
        try:
            return str(dataset_file(cfg.data.name, cfg.data.root)), None, ""
        except UserError:
            n = get_info(cfg.data.name).num_atoms
            return None, n, f"{cfg.data.name} not on disk: synthetic molecule of its {n} atoms"
    raise UserError("no molecule: pass --data FILE or --atoms N (or a config with data.path / data.name)")


def molecule_stats(data, atoms, batch, cutoff):
    """(atoms, largest molecule's edges, all edges of the batch, the largest molecule's positions)."""
    from scalable_equiformer.profiling import systems

    if data is not None:
        z, frames = systems.load_frames(data, batch)
        counts = [systems.count_edges(f, cutoff) for f in frames]
        k = max(range(len(counts)), key=counts.__getitem__)
        return len(z), counts[k], sum(counts), frames[k]
    z, pos = systems.synthetic_molecule(atoms)
    e = systems.count_edges(pos, cutoff)
    return len(z), e, e * batch, pos


class _PartStats:
    """Partition statistics of one molecule per P, computed once."""

    def __init__(self, pos, cutoff):
        self.pos, self.cutoff, self.cache = pos, cutoff, {}

    def __call__(self, parts: int):
        from scalable_equiformer.profiling.estimate import partition_stats

        if parts <= 1:
            return None
        if parts not in self.cache:
            self.cache[parts] = partition_stats(self.pos, self.cutoff, parts)
        return self.cache[parts]


def fmt_gib(b):
    return f"{'-':>8}" if b is None else f"{b / GiB:8.3f}"


def main(argv=None) -> int:
    from scalable_equiformer.cli import (ArgumentParser, add_set_argument, exit_on_user_error, int_range, memory_size,
                                         nonnegative_int, output_file, positive_float, positive_int, positive_int_list)

    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", help="config file or name in configs/ (default: the dataclass defaults)")
    add_set_argument(p, dest="set",
                     help="config overrides, e.g. --set memory.precision=bf16 train.batch_size=4 (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="data file (sGDML npz / rMD17 npz / extxyz): frames 0..B-1")
    src.add_argument("--atoms", type=positive_int, help="synthetic molecule of N atoms (AT-AT copies at real density)")
    p.add_argument("--batch-size", type=positive_int, help="molecules per step (default train.batch_size)")
    p.add_argument("--levers", action="append", metavar="SPEC",
                   help="none | all | config | a,b=v,... (repeatable; default config)")
    p.add_argument("--compare", action="store_true", help="profile the standard ladder of lever sets")
    p.add_argument("--sweep", choices=["atoms"], help="profile a series of synthetic molecule sizes")
    p.add_argument("--sweep-atoms", type=positive_int_list, default=[30, 60, 120, 240],
                   help="sizes for --sweep atoms (default 30,60,120,240)")
    p.add_argument("--json", type=output_file, help="write the runs as JSON to this file")
    p.add_argument("--plot", type=output_file,
                   help="write a PNG to this file (memory per lever set, or memory vs atoms with --sweep)")
    p.add_argument("--plan", action="store_true", help="pick the fastest lever set that fits --gpu-memory")
    p.add_argument("--gpu-memory", type=memory_size, help="memory budget for --plan, e.g. 40GB (GiB)")
    p.add_argument("--allow-bf16", action="store_true", help="let --plan choose bf16 (changes numerics by ~2%%)")
    p.add_argument("--estimate-only", action="store_true", help="no measurement, estimates only")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads per measurement (default 1)")
    p.add_argument("--meter", default="rss", choices=["rss", "alloc"],
                   help="CPU peak: rss = the process's resident-set peak (VmHWM; default), alloc = peak of live "
                        "tensor bytes from the profiler's allocation events (deterministic, like CUDA's "
                        "max_memory_allocated; the step runs under the profiler, timing steps do not)")
    p.add_argument("--timing-steps", type=nonnegative_int, default=2, help="timed steps after the measured one")
    p.add_argument("--zero-stage", type=int_range(0, 3),
                   help="ZeRO stage for the breakdown (default deepspeed.zero_stage)")
    p.add_argument("--ranks", type=positive_int, default=1, help="data-parallel ranks for the ZeRO breakdown")
    p.add_argument("--gpus", type=positive_int,
                   help="GPUs for --plan (default --ranks): data parallel x graph partitions")
    p.add_argument("--gpus-per-node", type=positive_int,
                   help="GPUs per node for --plan (default all of --gpus: one node): graph partitions stay within a "
                        "node, and the launch lines are multi-node")
    p.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per measurement")
    p.add_argument("--one-process", action="store_true",
                   help="all measurements in one subprocess (libraries and CUDA started once; exact on CUDA, where "
                        "the peak is reset per measurement; approximate on the CPU)")
    p.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                   help="measurements stop this many seconds after the tool started: those not done by then are "
                        "recorded as not measured (the JSON is still written)")
    args = p.parse_args(argv)
    return exit_on_user_error(lambda: run(args))


class _Session:
    """What the measure, plan and report steps of one ``run`` share: the arguments, the config,
    the device, the batch, the ZeRO stage, the parameter count and the activation profiles (one
    census per precision, made on first use)."""

    def __init__(self, args):
        import time

        import torch

        self.t_start = time.monotonic()
        self.args = args
        self.cfg = load(args)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        self.batch = args.batch_size or self.cfg.train.batch_size
        self.zero_stage = self.cfg.deepspeed.zero_stage if args.zero_stage is None else args.zero_stage
        self.config_name = args.config or "defaults"
        self.profiles = {}

    @functools.cached_property
    def model_cfg(self):
        return _with_stats(self.cfg)

    @functools.cached_property
    def num_params(self) -> int:
        """The parameter count for the estimate (the model is built on first use)."""
        from scalable_equiformer.model import build_model

        return sum(q.numel() for q in build_model(self.model_cfg).parameters())

    def profile_for(self, precision):
        from scalable_equiformer.profiling import estimate as est

        if precision not in self.profiles:
            # on the device measured: CUDA autocast keeps other tensors in fp32 than the CPU's, and
            # a GPU takes seconds where a CPU's emulated bf16 takes minutes
            self.profiles[precision] = est.activation_profile(self.model_cfg, precision, device=self.device)
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()
        return self.profiles[precision]

    def estimate(self, levers: Levers, atoms: int, edges: int, batch: int, ranks: int, part):
        from scalable_equiformer.profiling import estimate as est

        return est.estimate(self.cfg, self.profile_for(levers.precision), levers, atoms=atoms, edges=edges, batch=batch,
                            num_params=self.num_params, zero_stage=self.zero_stage, ranks=ranks,
                            part=part(levers.graph_partitions))


def run(args) -> int:
    """``--levers`` / ``--compare`` measured (or estimated) per molecule, then ``--plan``, then the files."""
    from scalable_equiformer.profiling import planner

    session = _Session(args)
    if args.plan and not args.gpu_memory:
        raise UserError("--plan needs --gpu-memory, e.g. --gpu-memory 40GB")
    if args.gpu_memory is not None:  # before anything is measured
        planner.check_budget(args.gpu_memory, f"{args.gpu_memory / GiB:g} GiB")
    sources = _sources(args, session.cfg)
    runs, jobs, plan_molecule = _jobs(session, sources, _lever_sets(args, session))
    measure_jobs(session, jobs)
    plan_out = plan_levers(session, plan_molecule) if args.plan else None
    report(session, runs, plan_out)
    return 0


def _sources(args, cfg) -> list:
    """``(data file or None, atoms or None)`` of each molecule measured."""
    if args.sweep == "atoms":
        if args.data:
            print("note: --sweep atoms uses synthetic molecules; --data is ignored")
        return [(None, n) for n in args.sweep_atoms]
    data, atoms, note = molecule_source(args, cfg)
    if note:
        print(f"note: {note}")
    return [(data, atoms)]


def _lever_sets(args, session) -> list[dict]:
    """The lever sets asked for, in order, without duplicates (e.g. micro_batch_size=1 with a batch
    of 1 is none), levers off first: the other sets' time ratios are relative to it."""
    cfg, batch = session.cfg, session.batch
    specs = list(args.levers or [])
    if args.compare:
        specs += [s for s in COMPARE if s not in specs]
    lever_sets = []
    for s in specs or ["config"]:
        lv = parse_levers(s, cfg, batch)
        if lv not in lever_sets:
            lever_sets.append(lv)
    lever_sets.sort(key=lambda lv: lv != parse_levers("none", cfg, batch))
    return lever_sets


def _jobs(session, sources, lever_sets):
    """Print the table's header; per molecule and lever set the record (with its estimate) and the
    measurement request. Returns ``(records, jobs, plan molecule)``: --plan plans for the largest
    molecule (the last, in a sweep of growing sizes)."""
    from scalable_equiformer.profiling.profiler import Request

    args, cfg, batch = session.args, session.cfg, session.batch
    runs, jobs = [], []  # jobs: (record, request, levers, estimate) in the order of the table
    print(f"config {session.config_name}  device {session.device}  batch {batch}  parameters "
          f"{session.num_params / 1e6:.3f} M  ZeRO stage {session.zero_stage} x {args.ranks} rank(s)  sizes in GiB")
    header = (f"{'levers':<34} {'atoms':>6} {'edges':>7} {'peak':>8} {'activ.':>8} {'est.':>8} {'meas/est':>8} "
              f"{'KB/edge':>8} {'step s':>7} {'cpu s':>7} {'time x':>6}")
    print(header)
    print("-" * len(header))
    plan_molecule = None
    for data_i, atoms_i in sources:
        n_atoms, edges_max, edges_total, pos_max = molecule_stats(data_i, atoms_i, batch, cfg.model.cutoff)
        part_stats = _PartStats(pos_max, cfg.model.cutoff)
        if plan_molecule is None or edges_max >= plan_molecule[1]:
            plan_molecule = (n_atoms, edges_max, part_stats)
        for levers in lever_sets:
            lv = resolve_levers(levers, edges_max)
            lev_obj = Levers(**lv)
            e = session.estimate(lev_obj, n_atoms, edges_max, batch, max(args.ranks, lev_obj.graph_partitions),
                                 part_stats)
            record = {"config": session.config_name, "atoms": n_atoms, "edges": edges_total, "batch": batch,
                      "levers": lv, "lever_set": _set_label(levers), "data": data_i, "estimate": e.as_dict(),
                      "estimated_peak_bytes": e.peak_bytes}
            req = None
            if not args.estimate_only:
                req = Request(config=cfg.to_dict(), config_name=session.config_name, data=data_i, atoms=atoms_i,
                              batch=batch, levers=lev_obj.section("memory"), partitions=lev_obj.graph_partitions,
                              device=session.device, threads=args.threads, timing_steps=args.timing_steps,
                              meter=args.meter)
            runs.append(record)
            jobs.append((record, req, lev_obj, e))
    return runs, jobs, plan_molecule


def _take(session, record: dict, lev_obj: Levers, e, m: dict, base_times: dict) -> None:
    """One measurement ``m`` into its record (per-rank peak, measured / estimated, bytes per edge,
    time over the levers-off step), then its table row."""
    record.update({k: v for k, v in m.items() if k not in ("config", "levers", "batch", "atoms")})
    if not (m.get("oom") or m.get("error") or m.get("not_measured")):
        record["edges"] = m.get("edges", record["edges"])
        # this process's model states replaced by the ZeRO stage's, per rank
        states0 = m["params_bytes"] + m["grads_bytes"] + m["optimizer_bytes"]
        record["peak_bytes_per_rank"] = m["peak_bytes"] - states0 + e.states.total
        record["ratio_measured_estimated"] = m["peak_bytes"] / max(e.peak_bytes - e.states.total + states0, 1)
        # per edge that this rank computes (all edges of the step without partitions)
        record["bytes_per_edge"] = m["activation_bytes"] / max(m.get("rank_edges", record["edges"]), 1)
        t = m.get("step_cpu_seconds") if session.device == "cpu" else m.get("step_seconds")
        key = (record["data"], record["atoms"])
        if lev_obj.label() == "none":  # measured before the other sets (sorted first)
            base_times[key] = t
        base = base_times.get(key)
        record["time_ratio"] = t / base if base else None
    _print_row(record, lev_obj)


def measure_jobs(session, jobs) -> None:
    """Measure every job (one subprocess each, or all in one with --one-process) within the time
    budget, or only print the estimates (--estimate-only); then the model states per rank."""
    import time

    from scalable_equiformer.profiling import estimate as est
    from scalable_equiformer.profiling.profiler import ProfileError, measure, measure_many

    args, cfg = session.args, session.cfg
    base_times = {}  # (data, atoms) -> levers-off step time

    def take(i, m):
        record, _, lev_obj, e = jobs[i]
        _take(session, record, lev_obj, e, m, base_times)

    if args.estimate_only:
        for record, _, lev_obj, _ in jobs:
            _print_row(record, lev_obj)
    elif args.one_process:
        left = None if args.time_budget is None else max(session.t_start + args.time_budget - time.monotonic(), 0.0)
        measure_many([j[1] for j in jobs], timeout=left, on_result=take)
    else:
        deadline = None if args.time_budget is None else session.t_start + args.time_budget
        for i, (record, req, _, _) in enumerate(jobs):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                take(i, {"not_measured": True, "error": f"time budget of {args.time_budget:.0f} s used up"})
                continue
            try:
                m = measure(req, timeout=args.timeout if left is None else min(args.timeout, left))
            except ProfileError as exc:
                if deadline is None:
                    raise
                m = {"error": str(exc).splitlines()[0]}  # with a budget: recorded, the others still run
            take(i, m)
    if not args.estimate_only:
        print("peak: whole step (model states + activations); activ.: peak minus parameters, gradients and "
              "AdamW state; cpu s: process CPU time (CPU runs, contention-free); time x: step time / levers-off "
              "step time")
    states = est.model_states(session.num_params, param_bytes=8 if cfg.model.dtype == "float64" else 4,
                              zero_stage=session.zero_stage, ranks=args.ranks)
    print(f"model states per rank (ZeRO {session.zero_stage}, {args.ranks} rank(s)): "
          f"parameters {fmt_gib(states.params)}  gradients {fmt_gib(states.grads)}  "
          f"optimizer {fmt_gib(states.optimizer)} GiB")


def plan_levers(session, plan_molecule) -> dict:
    """--plan: the fastest lever set whose estimated peak fits --gpu-memory on each of --gpus,
    printed with its ``--set`` overrides and launch lines; returns the plan's JSON part."""
    from scalable_equiformer.profiling import planner

    args, cfg, batch = session.args, session.cfg, session.batch
    budget = args.gpu_memory
    gpus = args.gpus or args.ranks
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be >= 1")
    n_atoms, edges_max, part_stats = plan_molecule
    precisions = ["fp32", "bf16"] if args.allow_bf16 else [cfg.memory.precision]

    def estimator(lv, per_group):
        return session.estimate(lv, n_atoms, edges_max, per_group, gpus, part_stats).peak_bytes

    partitions = planner.node_partitions(gpus, batch, args.gpus_per_node)
    fractions = {p: part_stats(p).edge_fraction for p in partitions if p > 1}
    pl = planner.plan(estimator, budget, batch=batch, edges=edges_max, device="cuda", precisions=precisions,
                      gpus=gpus, partitions=partitions, edge_fractions=fractions, num_blocks=cfg.model.num_blocks)
    _print_plan(args, pl, gpus, budget, n_atoms, edges_max, batch, session.zero_stage)
    return {"budget_bytes": budget, "usable_bytes": pl.usable_bytes, "gpus": gpus,
            "gpus_per_node": args.gpus_per_node or gpus, "partitions_tried": partitions,
            "best": pl.best.as_dict() if pl.best else None, "overrides": pl.overrides(),
            "atoms": n_atoms, "edges_per_molecule": edges_max, "batch": batch,
            "time_factors": pl.factors.as_dict(),
            "candidates": [c.as_dict() for c in pl.candidates]}


def _print_plan(args, pl, gpus, budget, n_atoms, edges_max, batch, zero_stage) -> None:
    from scalable_equiformer.profiling import planner

    nodes = gpus // (args.gpus_per_node or gpus)
    where = f" on {nodes} nodes of {args.gpus_per_node}" if nodes > 1 else ""
    print(f"\nplan for {gpus} GPU(s){where} of {fmt_gib(budget).strip()} GiB "
          f"(usable {fmt_gib(pl.usable_bytes).strip()} GiB each), {n_atoms} atoms, {edges_max} edges per molecule, "
          f"batch {batch}, ZeRO stage {zero_stage}:")
    print(f"time factors: {pl.factors.source}")
    for c in pl.candidates[:6]:
        mark = "fits" if c.fits else "too big"
        print(f"  {c.levers.label():<40} est. peak {fmt_gib(c.peak_bytes)} GiB  time x{c.relative_time:.2f}  {mark}")
    if pl.best is None:
        more = "more GPUs (--gpus, for graph partitions)" if gpus == 1 else "more GPUs"
        print(f"nothing fits: use {more} or a larger GPU")
        return
    print("use: " + " ".join(f"--set {o}" for o in pl.overrides()))
    if gpus > 1:
        cfg_arg = f"--config {args.config} " if args.config else ""
        sets = " ".join(f"--set {o}" for o in pl.overrides())
        for line in planner.launch_lines(gpus, args.gpus_per_node, cfg_arg + sets):
            print(f"launch: {line}")


def report(session, runs: list, plan_out) -> None:
    """--json (the runs, the activation profiles, the plan) and --plot."""
    args, cfg = session.args, session.cfg
    if args.json:
        dev = runs[0].get("device") if runs and runs[0].get("device") else session.device
        doc = {"device": dev, "config": session.config_name, "num_params": session.num_params,
               "num_blocks": cfg.model.num_blocks, "model": cfg.to_dict()["model"], "census_device": session.device,
               "batch": session.batch, "one_process": bool(args.one_process), "runs": runs,
               "activation_profiles": {k: v.as_dict() for k, v in session.profiles.items()}}
        if plan_out:
            doc["plan"] = plan_out
        from scalable_equiformer.training.checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        _plot(runs, args.plot, sweep=args.sweep == "atoms", measured=not args.estimate_only)
        print(f"wrote {args.plot}")


def _with_stats(cfg):
    import copy

    c = copy.deepcopy(cfg)
    if c.model.avg_num_neighbors is None:
        c.model.avg_num_neighbors = 25.0
    if c.model.avg_num_atoms is None:
        c.model.avg_num_atoms = 20.0
    return c


def _set_label(levers: dict) -> str:
    """The lever set as asked for (an ``auto`` chunk size stays ``auto``), for grouping runs."""
    lv = dict(levers)
    auto = lv.get("edge_chunk_size") == "auto"
    if auto:
        lv["edge_chunk_size"] = _AUTO_CHUNK
    label = Levers(**lv).label()
    return label.replace(f"chunk={_AUTO_CHUNK}", "chunk=auto") if auto else label


#: stands for ``edge_chunk_size=auto`` in a label (a Levers holds numbers only)
_AUTO_CHUNK = 2**31 - 1


def _print_row(r, lev):
    if r.get("oom"):
        print(f"{lev.label():<34} {r['atoms']:>6} {r['edges']:>7}  out of memory "
              f"(estimate {fmt_gib(r['estimated_peak_bytes']).strip()})")
        return
    if r.get("not_measured") or r.get("error"):
        what = "not measured" if r.get("not_measured") else "failed"
        print(f"{lev.label():<34} {r['atoms']:>6} {r['edges']:>7}  {what}: {str(r.get('error', ''))[:120]}")
        return
    peak = r.get("peak_bytes")
    ratio = r.get("ratio_measured_estimated")
    kbe = r.get("bytes_per_edge")
    tr = r.get("time_ratio")
    print(f"{lev.label():<34} {r['atoms']:>6} {r['edges']:>7} {fmt_gib(peak)} {fmt_gib(r.get('activation_bytes'))} "
          f"{fmt_gib(r['estimated_peak_bytes'])} {('%8.2f' % ratio) if ratio else '       -'} "
          f"{('%8.0f' % (kbe / 1024)) if kbe else '       -'} "
          f"{('%7.2f' % r['step_seconds']) if 'step_seconds' in r else '      -'} "
          f"{('%7.2f' % r['step_cpu_seconds']) if 'step_cpu_seconds' in r else '      -'} "
          f"{('%6.2f' % tr) if tr else '     -'}", flush=True)


def _plot(runs, path, sweep: bool, measured: bool):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "peak_bytes" if measured else "estimated_peak_bytes"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in runs:
        if r.get("oom") or (measured and "peak_bytes" not in r):
            continue
        label = r.get("lever_set")
        if label is None:  # records written before lever_set existed
            lv = dict(r["levers"], edge_chunk_size="auto" if r["levers"]["edge_chunk_size"] else None)
            label = _set_label(lv)
        groups.setdefault(label, []).append(r)
    if sweep:
        for label, rs in groups.items():
            rs = sorted(rs, key=lambda r: r["atoms"])
            line, = ax.plot([r["atoms"] for r in rs], [r[key] / GiB for r in rs], "o-", label=label)
            if measured:
                ax.plot([r["atoms"] for r in rs], [r["estimated_peak_bytes"] / GiB for r in rs], "--",
                        color=line.get_color(), alpha=0.6)
        ax.set_xlabel("atoms per molecule")
        ax.set_title("training-step peak memory (solid: measured, dashed: estimated)" if measured else "estimated peak")
    else:
        labels = list(groups)
        ax.bar(range(len(labels)), [groups[k][0][key] / GiB for k in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_title("training-step peak memory per lever set")
    ax.set_ylabel("GiB")
    if sweep:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
