#!/usr/bin/env python
"""Benchmark the Equiformer: forward, forward + forces, and a full training step.

    python tools/bench_model.py                       # paper-size Lmax-2 model, shipped aspirin + AT-AT
    python tools/bench_model.py --tiny --repeats 3    # a tiny model (smoke test)
    python tools/bench_model.py --data a.npz --batch-size 8 --json out.json
    python tools/bench_model.py --tp compare          # hand-written vs e3nn depth-wise TP, alternated
    python tools/bench_model.py --compile compare --modes train_step --batch-size 8   # train.compile vs eager

Modes (each: one warm-up, then ``--repeats`` timed runs; the median is reported):
  forward        eval, energy only, under no_grad
  forces         eval, energy and forces (autograd, no graph kept)
  train_step     train: forces with create_graph, loss = mean|dE| + mean|dF| (eV, eV/Å),
                 loss.backward() and an AdamW step
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
from scalable_equiformer.config import ModelConfig  # noqa: E402
from scalable_equiformer.data.dataset import load_dataset  # noqa: E402
from scalable_equiformer.data.statistics import compute_statistics  # noqa: E402
from scalable_equiformer.errors import UserError  # noqa: E402
from scalable_equiformer.nn import tensor_product  # noqa: E402
from scalable_equiformer.nn.tensor_product import DepthwiseTensorProduct  # noqa: E402
from scalable_equiformer.presets import paper_model_dict, tiny_model_dict  # noqa: E402
from scalable_equiformer.profiling.meter import PeakMemoryMeter  # noqa: E402
from scalable_equiformer.training.compiled import (  # noqa: E402
    CompiledEnergyForces, compile_count, compiled_energy_and_forces)

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


def mode_step(model, batch, mode: str, optimizer, compiled=None):
    """One timed unit of ``mode`` (forward, forces, train_step: this tool's own L1 loss and optimizer
    step). ``compiled``: a ``training.compiled.CompiledEnergyForces`` for the train_step (else eager)."""

    def step():
        if mode == "forward":
            model.eval()
            with torch.no_grad():
                model(batch, compute_forces=False)
        elif mode == "forces":
            model.eval()
            model(batch)
        else:
            model.train()
            out = model(batch) if compiled is None else compiled_energy_and_forces(model, batch, fn=compiled)
            loss = (out["energy"] - batch.energy.reshape(-1).to(out["energy"].dtype)).abs().mean() + (
                out["forces"] - batch.forces.to(out["forces"].dtype)
            ).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def run_mode(model, batch, mode: str, repeats: int, device: torch.device, optimizer) -> dict:
    step = mode_step(model, batch, mode, optimizer)
    meter = PeakMemoryMeter(device)
    meter.start()
    step()  # warm-up (also part of the peak: same work)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    mem = _peak(meter)
    optimizer.zero_grad(set_to_none=True)
    return {"median_s": statistics.median(times), "times_s": times, **mem}


def run_mode_compare(model, batch, mode: str, repeats: int, device: torch.device, optimizer, impls=("e3nn", "fast")) -> dict:
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
    optimizer.zero_grad(set_to_none=True)
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
    print(f"    eager {res['eager']['times_s']} s, compiled {res['compiled']['times_s']} s", flush=True)  # before the probe
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
    optimizer.zero_grad(set_to_none=True)
    return res


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
    p.add_argument("--batch-size", type=positive_int, default=1, help="frames per batch (default 1)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per mode after one warm-up (default 5)")
    p.add_argument("--modes", nargs="+", choices=("forward", "forces", "train_step"), default=["forward", "forces", "train_step"])
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
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = runtime.parse_device(args.device)
    except UserError as e:
        p.error(str(e))
    torch.manual_seed(0)

    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tp": args.tp,
        "tp_default": tensor_product.DEPTHWISE_TP_IMPLEMENTATION,
        "compile": args.compile,
        "compile_backend": args.compile_backend if args.compile == "compare" else None,
        "units": {"time": "s", "memory": "bytes"},
        "datasets": [],
    }
    try:
        for path in args.data:
            ds = load_dataset(path)
            stats = compute_statistics(ds, cutoff=5.0)
            kw = dict(attention=args.attention, message=args.message, dtype=args.dtype)
            kw.update(TINY if args.tiny else (LMAX3 if args.lmax == 3 else {}))
            if args.lmax == 3:
                kw["lmax"] = 3
            cfg = ModelConfig(**kw)
            model = build_model(cfg, stats=stats).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            if args.tp in ("fast", "e3nn", "cueq"):
                set_tp_implementation(model, args.tp)
            batch = _make_batch(ds, args.batch_size, device)
            edges = int(model.build_graph(batch.pos.to(model.dtype), batch.batch).shape[1])
            entry = {
                "data": str(path),
                "atoms_per_frame": ds.num_atoms,
                "atoms": int(batch.num_nodes),
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
                        {(args.batch_size + 1) // 2, 1} - {args.batch_size}, reverse=True)
                    others = [_make_batch(ds, n, device) for n in probe_sizes]
                    entry["modes"][mode] = r = run_compile_compare(model, batch, args.repeats, device, optimizer, others,
                                                                      args.compile_backend)
                    rr = r["round_ratios_compiled_over_eager"]
                    print(
                        f"{path.name:28s} {mode:11s} atoms {entry['atoms']:5d} edges {edges:6d}  eager "
                        f"{r['eager']['median_s'] * 1e3:9.1f} ms  compiled {r['compiled']['median_s'] * 1e3:9.1f} ms  "
                        f"compiled/eager {r['ratio_compiled_over_eager']:.3f} (CPU time {r['cpu_ratio_compiled_over_eager']:.3f}; "
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
                    f"{path.name:28s} {mode:11s} atoms {entry['atoms']:5d} edges {edges:6d}  median {r['median_s'] * 1e3:9.1f} ms  "
                    f"peak {r['peak_bytes'] / 2**20:8.1f} MiB  (+{r['peak_growth_bytes'] / 2**20:7.1f} MiB)",
                    flush=True,
                )
            results["datasets"].append(entry)
            del model, optimizer
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
