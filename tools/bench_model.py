#!/usr/bin/env python
"""Benchmark the Equiformer: forward, forward + forces, and a full training step.

    python tools/bench_model.py                       # paper-size Lmax-2 model, shipped aspirin + AT-AT
    python tools/bench_model.py --tiny --repeats 3    # a tiny model (smoke test)
    python tools/bench_model.py --data a.npz --batch-size 8 --json out.json
    python tools/bench_model.py --tp compare          # hand-written vs e3nn depth-wise TP, alternated
    python tools/bench_model.py --compile compare --modes train_step --batch-size 8   # train.compile vs eager

Default rows: the paper's Lmax-2 model (``presets.paper_model_dict``), aspirin in batches of 8
and AT-AT in batches of 1 (``--batch-size`` gives one size for every file or one per file).

Modes (each: one warm-up, then ``--repeats`` timed runs; the median is reported):
  forward        eval, energy only, under no_grad
  forces         the inference step: eval, energy and forces, no graph kept (``training.steps.model_call``,
                 what evaluation runs)
  train_step     the trainer's step: ``training.steps.optimizer_step`` with the trainer's ``PlainEngine``
                 (forward, forces with create_graph, the config's loss, by default the paper's L2MAE
                 1:80, backward, AdamW with the paper's settings), as ``Trainer._train_step`` runs it
                 (data loading aside)

Counters (per data file, after the timed modes; ``--no-counters`` skips them), for the training
step and the inference step, each from one extra, untimed run:
  aten_calls     ATen operator calls, counted with ``torch.profiler`` (CPU activity): every
                 ``aten::`` event the dispatcher records, nested calls included (``aten::linear``
                 -> ``aten::matmul`` -> ``aten::mm`` counts 3), forward and backward (the autograd
                 engine's calls, also double backward); ``aten_calls_top``: those with no ``aten::``
                 caller (what Python and the autograd engine call); ``aten_calls_leaf``: those
                 calling no other ``aten::`` op (about the kernels a GPU would launch)
                 (``aten_calls_by_op``: the 30 most called ops); ``aten_self_time_by_op``: the 30 ops of
                 most self CPU time in that profiled run (``self_share``: of all events' self time;
                 under the profiler's overhead: where the time goes, not the step's time)
  matmul FLOPs   ``torch.utils.flop_counter.FlopCounterMode``: the matmul family (mm, addmm, bmm,
                 baddbmm, convolutions, attention kernels; einsums count through the bmm/mm they
                 become), ``matmul_gflop``; ``matmul_gflops_per_s`` = that over the step's median
                 time ``step_s`` (the timed mode's, else ``--repeats`` runs timed here; process CPU time
                 on the CPU, where other processes share the cores, wall time on a GPU); ``gemm_gflops_per_s``:
                 a plain 1024x1024 matmul in the model's dtype (sgemm in fp32) timed in the same
                 process and threads, and ``fraction_of_gemm`` = the step's rate over it
Peak memory per mode: CUDA ``max_memory_allocated`` on a GPU; on the CPU the process's resident
high-water mark (VmHWM, reset before each mode through /proc/self/clear_refs where the kernel
allows, else the lifetime peak), reported as the peak and its growth over the RSS at the start of
the mode (``profiling.meter.PeakMemoryMeter``). Times in seconds, memory in bytes (MiB in the table).

``--tp fast|e3nn|cueq`` picks the depth-wise tensor product implementation (default: the library's
default). ``--tp compare`` times both on the same model and batch, alternating them run by run
(order flipped every round) so that drift on a shared machine hits both alike, and reports the
ratio fast/e3nn of the medians. Its memory figures come from one run of each implementation after
both warm-ups, so freed-but-kept allocator memory blurs them on the CPU: compare peaks with two
separate processes (``--tp fast`` and ``--tp e3nn``).

``--compile compare`` (train_step only): the training step of ``train.compile: true``
(``training/compiled.py``: energies, forces and force-loss gradients by traced + inductor-compiled
code) against the eager step, alternated as ``--tp compare`` does; reported: the cold compile
(trace seconds, and the first compiled step's seconds, which include tracing and compiling), the
medians, the ratio compiled/eager, and a size probe: the first compiled step on batches of other
sizes (fewer frames) and how many graphs Dynamo compiled for each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch_geometric.data import Batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalable_equiformer import build_model, runtime  # noqa: E402
from scalable_equiformer.config import Config, ModelConfig  # noqa: E402
from scalable_equiformer.data.dataset import load_dataset  # noqa: E402
from scalable_equiformer.data.statistics import compute_statistics  # noqa: E402
from scalable_equiformer.errors import UserError  # noqa: E402
from scalable_equiformer.nn import tensor_product  # noqa: E402
from scalable_equiformer.nn.tensor_product import DepthwiseTensorProduct  # noqa: E402
from scalable_equiformer.presets import paper_model_dict, tiny_model_dict  # noqa: E402
from scalable_equiformer.profiling.meter import PeakMemoryMeter  # noqa: E402
from scalable_equiformer.training import compiled as compiled_module  # noqa: E402
from scalable_equiformer.training.batches import BatchPlan  # noqa: E402
from scalable_equiformer.training.compiled import CompiledEnergyForces, compile_count  # noqa: E402
from scalable_equiformer.training.engine import PlainEngine  # noqa: E402
from scalable_equiformer.training.steps import model_call, optimizer_step  # noqa: E402

DEMO = ROOT / "scalable_equiformer" / "demo_data"  # shipped GFN2-xTB frames (made for this project)
DEFAULT_DATA = [DEMO / "aspirin_xtb_500K.npz", DEMO / "AT-AT_xtb_500K_20frames.npz"]
#: --tiny: configs/tiny.yaml at twice its channels, with a wider radial network
TINY = dict(tiny_model_dict(width=2), num_radial=16, radial_hidden=[32])
#: --lmax 3: the paper's Lmax 3 model (configs/presets/md17_l3.yaml)
LMAX3 = {k: paper_model_dict(3)[k] for k in ("irreps_node", "irreps_head", "irreps_feedforward")}


# -- memory ------------------------------------------------------------------------------------


def _peak(meter: PeakMemoryMeter) -> dict:
    """The meter's reading as this tool reports it."""
    growth = meter.stop()
    return {"peak_bytes": int(meter.peak), "peak_growth_bytes": int(growth), "memory_method": meter.method}


# -- benchmark ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_batch(ds, batch_size: int, device: torch.device) -> Batch:
    frames = [ds[i] for i in range(min(batch_size, len(ds)))]
    return Batch.from_data_list(frames).to(device)


def set_tp_implementation(model, implementation: str) -> None:
    for m in model.modules():
        if isinstance(m, DepthwiseTensorProduct):
            m.implementation = implementation


def full_config(model_cfg: ModelConfig, compile: bool = False) -> Config:
    """The trainer's config around ``model_cfg``: the default train, optim and memory sections
    (the paper's L2MAE loss 1:80 and AdamW; every memory lever off), ``train.compile`` as given."""
    cfg = Config(model=model_cfg)
    cfg.train.compile = compile
    return cfg


def make_engine(model, cfg: Config) -> PlainEngine:
    """The trainer's engine on one process (``training.engine.PlainEngine``: AdamW of ``cfg.optim``)."""
    return PlainEngine(model, cfg, BatchPlan.from_config(cfg, 1))


def mode_step(model, batch, mode: str, engine: PlainEngine, compiled=None):
    """One timed unit of ``mode``: forward; forces (the inference step, ``model_call`` in eval
    mode); train_step (the trainer's ``optimizer_step`` on ``engine``). ``compiled``: a
    ``training.compiled.CompiledEnergyForces``: the train_step of ``train.compile: true`` with it
    (else eager)."""
    if compiled is not None:  # an engine of its own: the engine's config decides (model_call)
        engine = make_engine(model, full_config(engine.cfg.model, compile=True))
        compiled_module._CACHE[model] = compiled  # model_call's compiled path takes the model's function from here
    cfg = engine.cfg

    def step():
        if mode == "forward":
            model.eval()
            with torch.no_grad():
                model(batch, compute_forces=False)
        elif mode == "forces":
            model.eval()
            model_call(model, batch, cfg)
        else:
            model.train()
            optimizer_step(engine, [batch], cfg, cfg.optim.lr, n_molecules=float(batch.num_graphs),
                           n_atoms=float(batch.num_nodes))

    return step


# -- counters: ATen calls and the matmul FLOP rate ----------------------------------------------


def count_aten_calls(step) -> dict:
    """ATen calls of one ``step()`` from ``torch.profiler`` (see the module docstring)."""
    prof = torch.profiler
    with prof.profile(activities=[prof.ProfilerActivity.CPU]) as p:
        step()
    events = [e for e in p.events() if e.name.startswith("aten::")]

    def has_aten_parent(e):
        q = e.cpu_parent
        while q is not None:
            if q.name.startswith("aten::"):
                return True
            q = q.cpu_parent
        return False

    top = sum(1 for e in events if not has_aten_parent(e))
    leaf = sum(1 for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children))
    by_op: dict = {}
    for e in events:
        by_op[e.name] = by_op.get(e.name, 0) + 1
    # where the time goes: self CPU time per op (under the profiler's overhead), as a share of all events' self time
    avg = p.key_averages()
    total = sum(a.self_cpu_time_total for a in avg) or 1.0
    self_time = sorted(((a.key, a.count, a.self_cpu_time_total) for a in avg if a.key.startswith("aten::")),
                       key=lambda t: -t[2])[:30]
    return {"aten_calls": len(events), "aten_calls_top": top, "aten_calls_leaf": leaf,
            "aten_calls_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:30]),
            "profiled_self_s": total / 1e6,
            "aten_self_time_by_op": {k: {"calls": n, "self_s": t / 1e6, "self_share": t / total}
                                     for k, n, t in self_time}}


def count_matmul_flops(step) -> int:
    """Matmul-family FLOPs of one ``step()`` (``torch.utils.flop_counter.FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _clock(device: torch.device):
    """The clock of the rates: process CPU time on the CPU (a shared machine's other processes
    barely move it), wall time on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def gemm_rate(dtype: torch.dtype, device: torch.device, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of a plain ``n x n @ n x n`` matmul in ``dtype`` (best of ``repeats`` after a warm-up;
    :func:`_clock`)."""
    clock = _clock(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        a @ b
        _sync(device)
        best = min(best, clock() - t0)
    return 2 * n**3 / best / 1e9


def step_counters(model, batch, engine: PlainEngine, device: torch.device, repeats: int, gemm: float,
                  times: dict) -> dict:
    """The counters of the training step (``train_step``) and the inference step (``forces``):
    ``times``: {mode: median seconds} already measured (by :func:`_clock`; else timed here)."""
    clock = _clock(device)
    out = {}
    for mode, name in (("train_step", "train_step"), ("forces", "inference_step")):
        step = mode_step(model, batch, mode, engine)
        seconds = times.get(mode)
        if seconds is None:  # the mode has not run: a warm-up, then timed here
            step()
            _sync(device)
            ts = []
            for _ in range(repeats):
                t0 = clock()
                step()
                _sync(device)
                ts.append(clock() - t0)
            seconds = statistics.median(ts)
        flops = count_matmul_flops(step)
        out[name] = {**count_aten_calls(step), "matmul_gflop": flops / 1e9, "step_s": seconds,
                     "matmul_gflops_per_s": flops / 1e9 / seconds, "gemm_gflops_per_s": gemm,
                     "fraction_of_gemm": flops / 1e9 / seconds / gemm}
    engine.optimizer.zero_grad(set_to_none=True)
    return out


def run_mode(model, batch, mode: str, repeats: int, device: torch.device, optimizer) -> dict:
    """``optimizer``: the trainer's engine (:func:`make_engine`)."""
    step = mode_step(model, batch, mode, optimizer)
    meter = PeakMemoryMeter(device)
    meter.start()
    step()  # warm-up (also part of the peak: same work)
    _sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU time: less hit by other processes
    mem = _peak(meter)
    optimizer.optimizer.zero_grad(set_to_none=True)
    return {"median_s": statistics.median(times), "times_s": times, "median_cpu_s": statistics.median(cpu),
            "cpu_times_s": cpu, **mem}


def run_mode_compare(
    model, batch, mode: str, repeats: int, device: torch.device, optimizer, impls=("e3nn", "fast")
) -> dict:
    """Both TP implementations on the same model: warm-ups, one measured run each, then ``repeats``
    rounds of one timed run per implementation, the order flipped every round."""
    step = mode_step(model, batch, mode, optimizer)
    res = {impl: {"times_s": [], "cpu_times_s": []} for impl in impls}
    for impl in impls:
        set_tp_implementation(model, impl)
        step()
        _sync(device)
    for impl in impls:
        set_tp_implementation(model, impl)
        meter = PeakMemoryMeter(device)
        meter.start()
        step()
        _sync(device)
        res[impl].update(_peak(meter))

    def with_impl(impl):
        def run():
            set_tp_implementation(model, impl)
            step()
        return run

    _alternate({impl: with_impl(impl) for impl in impls}, repeats, device, res)
    optimizer.optimizer.zero_grad(set_to_none=True)
    return res


def _alternate(steps: dict, repeats: int, device: torch.device, res: dict) -> None:
    """Time the two callables of ``steps`` ({a: run_a, b: run_b}) ``repeats`` rounds, one run of
    each per round with the order flipped every round, into ``res[name]["times_s"]`` /
    ``["cpu_times_s"]``; then their medians and ``ratio_b_over_a``, ``cpu_ratio_b_over_a`` and the
    per-round ratios ``round_ratios_b_over_a``."""
    names = list(steps)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            _sync(device)
            res[name]["times_s"].append(time.perf_counter() - t0)
            res[name]["cpu_times_s"].append(time.process_time() - c0)  # CPU time: less hit by other processes
    for name in names:
        res[name]["median_s"] = statistics.median(res[name]["times_s"])
        res[name]["median_cpu_s"] = statistics.median(res[name]["cpu_times_s"])
    a, b = names
    res[f"ratio_{b}_over_{a}"] = res[b]["median_s"] / res[a]["median_s"]
    res[f"cpu_ratio_{b}_over_{a}"] = res[b]["median_cpu_s"] / res[a]["median_cpu_s"]
    # per-round ratios (each from two adjacent runs): less sensitive to slow drifts than the medians
    res[f"round_ratios_{b}_over_{a}"] = [tb / ta for ta, tb in zip(res[a]["times_s"], res[b]["times_s"])]


def run_compile_compare(model, batch, repeats: int, device: torch.device, optimizer, size_batches=(),
                        backend: str = "inductor") -> dict:
    """train_step compiled (``train.compile``) vs eager, alternated (see the module docstring)."""
    fn = CompiledEnergyForces(model, backend=backend)
    steps = {"eager": mode_step(model, batch, "train_step", optimizer),
             "compiled": mode_step(model, batch, "train_step", optimizer, compiled=fn)}
    res: dict = {"eager": {"times_s": [], "cpu_times_s": []}, "compiled": {"times_s": [], "cpu_times_s": []}}
    graphs0 = compile_count()
    t0 = time.perf_counter()
    steps["compiled"]()  # cold: trace + compile + run
    _sync(device)
    res["compile"] = {"first_step_s": time.perf_counter() - t0, "trace_s": fn.trace_seconds,
                      "graphs_compiled": compile_count() - graphs0, "detaches_removed": fn.detaches_removed}
    print(f"    cold compiled step {res['compile']['first_step_s']:.1f} s (trace {fn.trace_seconds:.1f} s, "
          f"{res['compile']['graphs_compiled']} graph(s))", flush=True)
    steps["eager"]()
    _sync(device)
    _alternate(steps, repeats, device, res)
    # before the probe
    print(f"    eager {res['eager']['times_s']} s, compiled {res['compiled']['times_s']} s", flush=True)
    probe = []
    for other in size_batches:  # other sizes: does the compiled step recompile?
        step = mode_step(model, other, "train_step", optimizer, compiled=fn)
        g0, t0 = compile_count(), time.perf_counter()
        step()
        _sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        step()
        _sync(device)
        probe.append({"atoms": int(other.num_nodes), "molecules": int(other.num_graphs), "first_step_s": first,
                      "second_step_s": time.perf_counter() - t0, "graphs_compiled": compile_count() - g0})
        print(f"    size probe: {probe[-1]}", flush=True)
    res["size_probe"] = probe
    res["traces"] = fn.traces
    compiled_module._CACHE.pop(model, None)
    optimizer.optimizer.zero_grad(set_to_none=True)
    return res


def counters_markdown(results: dict) -> str:
    """The counters of ``results`` (this tool's JSON) as a markdown table, one row per file and step."""
    rows = ["| data | atoms | step | ATen calls (all / top-level / leaf) | matmul GFLOP | step s (CPU time on a CPU) | "
            "matmul GFLOP/s | gemm GFLOP/s | % of gemm |", "|---|---|---|---|---|---|---|---|---|"]
    for e in results["datasets"]:
        for name, c in e.get("counters", {}).items():
            rows.append(f"| {Path(e['data']).stem} x{e['batch_size']} | {e['atoms']} | {name.replace('_', ' ')} | "
                        f"{c['aten_calls']:,} / {c['aten_calls_top']:,} / {c['aten_calls_leaf']:,} | "
                        f"{c['matmul_gflop']:.2f} | "
                        f"{c['step_s']:.3f} | {c['matmul_gflops_per_s']:.1f} | {c['gemm_gflops_per_s']:.1f} | "
                        f"{100 * c['fraction_of_gemm']:.1f} |")
    return "\n".join(rows)


def profile_markdown(results: dict, data: int = 0, step: str = "train_step", top: int = 10) -> str:
    """The ``top`` ATen ops of most self CPU time in the profiled ``step`` of ``results["datasets"][data]``."""
    c = results["datasets"][data]["counters"][step]
    rows = ["| op | calls | self s (profiled) | share of self time |", "|---|---|---|---|"]
    for k, v in list(c["aten_self_time_by_op"].items())[:top]:
        rows.append(f"| `{k}` | {v['calls']:,} | {v['self_s']:.3f} | {100 * v['self_share']:.1f} % |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from scalable_equiformer.cli import ArgumentParser, output_file, positive_int

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA,
                   help="sGDML npz files (default: shipped aspirin and AT-AT xTB data)")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of the paper's")
    p.add_argument("--lmax", type=int, choices=(2, 3), default=2, help="paper model at Lmax 2 (3.50 M) or 3 (5.50 M)")
    p.add_argument("--attention", choices=("mlp", "dot"), default="mlp")
    p.add_argument("--message", choices=("nonlinear", "linear"), default="nonlinear")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--batch-size", type=positive_int, nargs="+", default=None,
                   help="frames per batch: one size for every --data file or one per file (default: 8 for the "
                        "shipped aspirin, 1 otherwise)")
    p.add_argument("--no-counters", action="store_true",
                   help="skip the ATen-call and matmul FLOP-rate counters (see the module docstring)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per mode after one warm-up (default 5)")
    p.add_argument("--modes", nargs="+", choices=("forward", "forces", "train_step"),
                   default=["forward", "forces", "train_step"])
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=output_file, default=None, help="write the results to this file")
    p.add_argument(
        "--tp", choices=("default", "fast", "e3nn", "cueq", "compare"), default="default",
        help="depth-wise tensor product: the library default, hand-written, e3nn's, cuEquivariance's, "
             "or fast and e3nn alternated (default: default)",
    )
    p.add_argument(
        "--compile", choices=("off", "compare"), default="off",
        help="compare: the train_step of train.compile=true against the eager one, alternated (default off)",
    )
    p.add_argument("--compile-backend", choices=("inductor", "aot_eager", "eager"), default="inductor",
                   help="torch.compile backend of --compile compare (train.compile uses inductor; aot_eager: no code "
                        "generation; eager: Dynamo only, the traced graph run as it is: quick checks of the tracing)")
    p.add_argument("--size-probe", type=positive_int, nargs="*", default=None,
                   help="with --compile compare: frame counts of further batches run once compiled (default: half the "
                        "batch, rounded up, and 1)")
    args = p.parse_args(argv)
    if args.compile == "compare" and args.tp == "compare":
        p.error("--compile compare and --tp compare: one comparison at a time")
    if args.batch_size is None:
        sizes = [8 if Path(d).resolve() == DEFAULT_DATA[0].resolve() else 1 for d in args.data]
    elif len(args.batch_size) in (1, len(args.data)):
        sizes = args.batch_size * len(args.data) if len(args.batch_size) == 1 else list(args.batch_size)
    else:
        p.error(f"--batch-size: one size or one per --data file ({len(args.data)}), not {len(args.batch_size)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = runtime.parse_device(args.device)
    except UserError as e:
        p.error(str(e))
    torch.manual_seed(0)

    results = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch_size": sizes[0] if len(set(sizes)) == 1 else sizes,
        "repeats": args.repeats,
        "tp": args.tp,
        "tp_default": tensor_product.DEPTHWISE_TP_IMPLEMENTATION,
        "compile": args.compile,
        "compile_backend": args.compile_backend if args.compile == "compare" else None,
        "units": {"time": "s", "memory": "bytes"},
        "datasets": [],
    }
    try:
        gemm = None
        for path, batch_size in zip(args.data, sizes):
            ds = load_dataset(path)
            stats = compute_statistics(ds, cutoff=5.0)
            kw = dict(TINY) if args.tiny else paper_model_dict(args.lmax)
            kw.update(attention=args.attention, message=args.message, dtype=args.dtype)
            cfg = ModelConfig(**kw)
            model = build_model(cfg, stats=stats).to(device)
            optimizer = make_engine(model, full_config(cfg))
            if args.tp in ("fast", "e3nn", "cueq"):
                set_tp_implementation(model, args.tp)
            batch = _make_batch(ds, batch_size, device)
            edges = int(model.build_graph(batch.pos.to(model.dtype), batch.batch).shape[1])
            entry = {
                "data": str(path),
                "atoms_per_frame": ds.num_atoms,
                "atoms": int(batch.num_nodes),
                "batch_size": int(batch.num_graphs),
                "edges": edges,
                "parameters": sum(q.numel() for q in model.parameters()),
                "model": "tiny" if args.tiny else f"paper lmax {args.lmax}",
                "attention": args.attention,
                "message": args.message,
                "modes": {},
            }
            for mode in args.modes:
                if args.compile == "compare":
                    if mode != "train_step":
                        continue
                    probe_sizes = args.size_probe if args.size_probe is not None else sorted(
                        {(batch_size + 1) // 2, 1} - {batch_size}, reverse=True)
                    others = [_make_batch(ds, n, device) for n in probe_sizes]
                    entry["modes"][mode] = r = run_compile_compare(
                        model, batch, args.repeats, device, optimizer, others, args.compile_backend
                    )
                    rr = r["round_ratios_compiled_over_eager"]
                    print(
                        f"{path.name:28s} {mode:11s} atoms {entry['atoms']:5d} edges {edges:6d}  eager "
                        f"{r['eager']['median_s'] * 1e3:9.1f} ms  compiled {r['compiled']['median_s'] * 1e3:9.1f} ms  "
                        f"compiled/eager {r['ratio_compiled_over_eager']:.3f} "
                        f"(CPU time {r['cpu_ratio_compiled_over_eager']:.3f}; "
                        f"round ratios {min(rr):.3f}-{max(rr):.3f})  cold compile {r['compile']['first_step_s']:.1f} s",
                        flush=True,
                    )
                    continue
                if args.tp == "compare":
                    entry["modes"][mode] = r = run_mode_compare(model, batch, mode, args.repeats, device, optimizer)
                    for impl in ("e3nn", "fast"):
                        print(
                            f"{path.name:28s} {mode:11s} {impl:5s} atoms {entry['atoms']:5d} edges {edges:6d}  median "
                            f"{r[impl]['median_s'] * 1e3:9.1f} ms (CPU {r[impl]['median_cpu_s'] * 1e3:9.1f} ms)  "
                            f"peak {r[impl]['peak_bytes'] / 2**20:8.1f} MiB  "
                            f"(+{r[impl]['peak_growth_bytes'] / 2**20:7.1f} MiB)",
                            flush=True,
                        )
                    rr = r["round_ratios_fast_over_e3nn"]
                    print(
                        f"{path.name:28s} {mode:11s} fast/e3nn: ratio of medians {r['ratio_fast_over_e3nn']:.3f} "
                        f"(CPU time {r['cpu_ratio_fast_over_e3nn']:.3f}), "
                        f"median round ratio {statistics.median(rr):.3f} (min {min(rr):.3f}, max {max(rr):.3f})",
                        flush=True,
                    )
                    continue
                entry["modes"][mode] = run_mode(model, batch, mode, args.repeats, device, optimizer)
                r = entry["modes"][mode]
                print(
                    f"{path.name:28s} {mode:11s} atoms {entry['atoms']:5d} edges {edges:6d}  "
                    f"median {r['median_s'] * 1e3:9.1f} ms  "
                    f"peak {r['peak_bytes'] / 2**20:8.1f} MiB  (+{r['peak_growth_bytes'] / 2**20:7.1f} MiB)",
                    flush=True,
                )
            if not args.no_counters:
                if gemm is None:
                    gemm = gemm_rate(model.dtype, device)
                if args.tp == "compare":  # the counters of the library's default implementation (eager under --compile)
                    set_tp_implementation(model, tensor_product.DEPTHWISE_TP_IMPLEMENTATION)
                key = "median_cpu_s" if device.type == "cpu" else "median_s"
                times = {} if args.tp == "compare" or args.compile == "compare" else {
                    m: r[key] for m, r in entry["modes"].items()}
                entry["counters"] = c = step_counters(model, batch, optimizer, device, args.repeats, gemm, times)
                for name, r in c.items():
                    print(
                        f"{path.name:28s} {name:14s} ATen calls {r['aten_calls']:7d} "
                        f"(top-level {r['aten_calls_top']:6d}, leaf {r['aten_calls_leaf']:6d})  "
                        f"matmul {r['matmul_gflop']:8.2f} GFLOP in {r['step_s']:.3f} s: "
                        f"{r['matmul_gflops_per_s']:6.1f} GFLOP/s, {100 * r['fraction_of_gemm']:5.1f} % of the "
                        f"{r['gemm_gflops_per_s']:.1f} GFLOP/s of a 1024x1024 gemm",
                        flush=True,
                    )
            results["datasets"].append(entry)
            del model, optimizer
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any("counters" in e for e in results["datasets"]):
        print("\n" + counters_markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
