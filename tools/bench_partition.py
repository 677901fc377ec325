"""Benchmark graph partitioning: per-rank peak memory and step time for P ranks, halo traffic.

    python tools/bench_partition.py [--partitions 1 2 4] [--checkpointing none|blocks|forces]
                                    [--out runs/bench_partition.json]

For each P, P gloo processes on this machine run, with the same weights:
  * a training step (energy, forces with create_graph, loss.backward) on a >= 1,000-atom system;
  * inference (energy and forces, no graph kept) on a >= 10,000-atom system;
both tiles of the AT-AT frame (``--data``) on a grid, ``--gap`` Å apart, so neighbouring copies
interact. Default model: the tiny model of ``tools/partition_harness.py`` (lmax 2, every
stage of the paper's model, a few thousand parameters) because the paper's model is slow on CPUs;
``--config NAME`` uses a config's model.

``--checkpointing`` is ``memory.checkpointing`` (the partitioned model's force strategy): ``none``
(plain autograd, the default), ``blocks`` (per-block checkpointing) or ``forces`` (the force-aware
block-wise recomputation).

Per rank: step time (median of ``--repeats``), peak memory growth of the step (CPU: the peak
resident set, VmHWM reset through /proc/self/clear_refs, minus the resident set before the step,
with glibc told to mmap tensors >= 64 KiB and trim at once so the resident set follows the live
tensors;
CUDA: ``max_memory_allocated`` growth), owned / halo atoms, edges. Per system and P: the time to
partition (recursive bisection + halo maps, radius graph excluded), the radius graph's time, edge
balance (max / mean edges per part), and the bytes one halo exchange moves (all ranks together,
per block, forward) against an all-gather of all node features (each rank receiving the N - n_own
rows it does not own), for this model's node irreps and for the paper's (128x0e+64x1e+32x2e).

The report goes to ``--out`` (default ``runs/bench_partition.json``, under the git-ignored ``runs/``);
the figures against P=1 (peak memory, speed-up) are printed when P=1 is among ``--partitions``.

Timings on a CPU with fewer cores than ranks measure oversubscription as much as the method; the
JSON records the core count. Memory per rank is the number that carries over to GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # the partition harness: tools/partition_harness.py

from scalable_equiformer.data import radius_graph  # noqa: E402
import partition_harness as C  # noqa: E402
from scalable_equiformer.memory import CHECKPOINTING, ForceRunner, Levers  # noqa: E402
from scalable_equiformer.parallel.launch import spawn_local  # noqa: E402
from scalable_equiformer.parallel.partition import partition_graph  # noqa: E402
from scalable_equiformer.profiling.meter import PeakMemoryMeter  # noqa: E402
from scalable_equiformer.parallel.partitioned import PartitionedModel  # noqa: E402

DEFAULT_DATA = ROOT / "scalable_equiformer" / "demo_data" / "AT-AT_xtb_500K_20frames.npz"  # shipped
PAPER_NODE_DIM = 128 * 1 + 64 * 3 + 32 * 5  # 128x0e+64x1e+32x2e


def _measure(fn, device):
    """(seconds, peak memory growth in bytes) of ``fn()``."""
    meter = PeakMemoryMeter(device)
    meter.start()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, meter.stop()


def _tight_malloc() -> None:
    """glibc: serve tensors >= 64 KiB by mmap and return freed memory at once, so the resident
    set follows the live tensors (otherwise freed-but-kept heap blurs the per-rank peak)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world: int, workdir: str) -> None:
    """One rank (started by ``spawn_local``: gloo group initialised, one thread)."""
    _tight_malloc()
    job = torch.load(Path(workdir) / "job.pt", weights_only=False)
    device = torch.device("cpu")
    model = C._build(job["model_config"], job["state_dict"]).to(device)
    pmodel = PartitionedModel(model, check_inputs=False, runner=ForceRunner(Levers(job["checkpointing"])))
    out = {}
    # warm-up (lazy initialisation, allocator) on the small molecule
    model.train()
    o = pmodel(C._as_batch(job["warmup"]))
    C._loss(o).backward()
    model.zero_grad(set_to_none=True)
    for task in job["tasks"]:
        batch = C._as_batch(task["system"])
        times, peaks = [], []
        for _ in range(job["repeats"]):
            if task["mode"] == "train":
                model.train()

                def step():
                    o = pmodel(batch)
                    C._loss(o).backward()
                    model.zero_grad(set_to_none=True)
            else:
                model.eval()

                def step():
                    pmodel(batch)

            dist.barrier()
            t, p = _measure(step, device)
            times.append(t)
            peaks.append(p)
        part = pmodel.last_partition.local(pmodel.part_rank)
        out[task["name"]] = {
            "seconds": statistics.median(times),
            "seconds_all": times,
            "peak_bytes": max(peaks),
            "owned": part.num_owned,
            "halo": part.num_halo,
            "edges": int(part.edge_ids.numel()),
            "partition_seconds": pmodel.last_partition_seconds,
        }
    torch.save(out, Path(workdir) / f"rank{rank}.pt")


def run(model, tasks, warmup, P: int, repeats: int, checkpointing: str = "none") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        job = {
            "checkpointing": checkpointing,
            "model_config": dataclasses.asdict(model._check_config),
            "state_dict": model.state_dict(),
            "tasks": tasks,
            "warmup": warmup,
            "repeats": repeats,
        }
        torch.save(job, Path(tmp) / "job.pt")
        spawn_local(_worker, P, args=(tmp,), workdir=tmp)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(P)]


def partition_figures(system, cutoff: float, P: int, node_dim: int, itemsize: int) -> dict:
    """Partition cost, balance and halo traffic of ``system`` cut into ``P`` parts."""
    pos, batch = system["pos"], system["batch"]
    t0 = time.perf_counter()
    ei = radius_graph(pos, cutoff, batch)
    t_graph = time.perf_counter() - t0
    t0 = time.perf_counter()
    gp = partition_graph(pos, ei, P, batch=batch)
    for p in range(P):
        gp.local(p)
    t_part = time.perf_counter() - t0
    s = gp.stats()
    n = s["num_atoms"]
    halo_rows = s["halo_total"]
    allgather_rows = (P - 1) * n  # every rank receives the rows it does not own
    return {
        "atoms": n,
        "edges": s["num_edges"],
        "radius_graph_seconds": t_graph,
        "partition_seconds_all_parts": t_part,
        "edges_per_part": s["edges_per_part"],
        "edge_imbalance": s["edge_imbalance"],
        "atoms_per_part": s["atoms_per_part"],
        "halo_per_part": s["halo_per_part"],
        "halo_rows_per_block": halo_rows,
        "allgather_rows_per_block": allgather_rows,
        "halo_bytes_per_block": halo_rows * node_dim * itemsize,
        "allgather_bytes_per_block": allgather_rows * node_dim * itemsize,
        "halo_bytes_per_block_paper_irreps": halo_rows * PAPER_NODE_DIM * itemsize,
        "allgather_bytes_per_block_paper_irreps": allgather_rows * PAPER_NODE_DIM * itemsize,
        "halo_vs_allgather": halo_rows / allgather_rows if allgather_rows else 0.0,
    }


def main(argv=None) -> int:
    from scalable_equiformer.cli import (
        ArgumentParser, exit_on_user_error, nonnegative_float, output_file, positive_float, positive_int, tile_spec,
    )

    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help="npz file whose first frame is tiled (default: the shipped AT-AT xTB frames)")
    ap.add_argument("--config", help="config name or path (its model); default: the tiny model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--cutoff", type=positive_float, default=5.0)
    ap.add_argument("--partitions", type=positive_int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--train-tile", type=tile_spec, default="3x3x2",
                    help="copies for the training system (>= 1,000 atoms)")
    ap.add_argument("--infer-tile", type=tile_spec, default="7x6x4",
                    help="copies for the inference system (>= 10,000 atoms)")
    ap.add_argument("--gap", type=nonnegative_float, default=2.0, help="Å between copies")
    ap.add_argument("--repeats", type=positive_int, default=1)
    ap.add_argument("--checkpointing", default="none", choices=CHECKPOINTING,
                    help="memory.checkpointing of the partitioned model")
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--out", type=output_file, default="runs/bench_partition.json",
                    help="report JSON (default runs/bench_partition.json)")
    args = ap.parse_args(argv)
    return exit_on_user_error(lambda: _main(args))


def _main(args) -> int:

    if args.config:
        from scalable_equiformer.config import load_config

        mcfg = load_config(args.config, [f"data.path={args.data}"]).model
        mcfg = dataclasses.replace(mcfg, dtype=args.dtype, cutoff=args.cutoff)
        if mcfg.avg_num_neighbors is None or mcfg.avg_num_atoms is None:
            mcfg = dataclasses.replace(mcfg, avg_num_neighbors=20.0, avg_num_atoms=60.0)
    else:
        mcfg = C.tiny_model_config(dtype=args.dtype, cutoff=args.cutoff)
    model = C.build_checked_model(mcfg)
    R, z = C.stack_frames(C.load_frames(args.data, 1))
    warmup = C.make_system("warmup", [(R[0], z)])
    systems = {"train": C.make_system("train", [C.tile_system(R[0], z, C.parse_tile(args.train_tile), args.gap)])}
    if not args.skip_infer:
        systems["infer"] = C.make_system("infer", [C.tile_system(R[0], z, C.parse_tile(args.infer_tile), args.gap)])
    tasks = [{"name": k, "mode": k, "system": s} for k, s in systems.items()]
    node_dim = model.irreps_node.dim
    itemsize = torch.empty(0, dtype=model.dtype).element_size()

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": "cpu", "backend": "gloo", "threads_per_rank": 1},
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype),
                  "irreps_node": str(model.irreps_node), "num_blocks": len(model.blocks),
                  "cutoff": model.cutoff, "config": args.config or "tiny (tools/partition_harness.py tiny_model)",
                  "checkpointing": args.checkpointing},
        "systems": {k: {"atoms": int(s["pos"].shape[0]), "mode": k} for k, s in systems.items()},
        "runs": {},
    }
    for P in args.partitions:
        t0 = time.perf_counter()
        ranks = run(model, tasks, warmup, P, args.repeats, args.checkpointing)
        wall = time.perf_counter() - t0
        for name, s in systems.items():
            per_rank = [r[name] for r in ranks]
            entry = {
                "per_rank": per_rank,
                "max_seconds": max(r["seconds"] for r in per_rank),
                "max_peak_bytes": max(r["peak_bytes"] for r in per_rank),
                **partition_figures(s, model.cutoff, P, node_dim, itemsize),
            }
            report["runs"].setdefault(name, {})[str(P)] = entry
            print(
                f"{name:5s} {entry['atoms']:6d} atoms {entry['edges']:8d} edges P={P}: "
                f"step {entry['max_seconds']:7.2f} s (max over ranks), "
                f"peak/rank {entry['max_peak_bytes'] / 2**20:8.1f} MiB, edges max/mean {entry['edge_imbalance']:.3f}, "
                f"halo/block {entry['halo_bytes_per_block'] / 2**10:.1f} KiB "
                f"= {100 * entry['halo_vs_allgather']:.1f} % of all-gather, "
                f"partition {entry['partition_seconds_all_parts'] * 1e3:.1f} ms "
                f"(radius graph {entry['radius_graph_seconds'] * 1e3:.1f} ms)"
            )
        print(f"P={P}: {wall:.1f} s wall (spawn included)")
    # targets of the issue
    summary = {}
    for name, runs in report["runs"].items():
        if "1" in runs:
            base = runs["1"]["max_peak_bytes"]
            summary[name] = {
                P: {
                    "peak_vs_P1": runs[P]["max_peak_bytes"] / base if base else None,
                    "target_1.25_over_P": 1.25 / int(P),
                    "halo_vs_allgather": runs[P]["halo_vs_allgather"],
                    "speedup_vs_P1": runs["1"]["max_seconds"] / runs[P]["max_seconds"],
                }
                for P in runs
            }
    report["summary"] = summary
    for name, runs in summary.items():
        for P, s in runs.items():
            peak = "-" if s["peak_vs_P1"] is None else f"{s['peak_vs_P1']:.3f}"
            print(f"{name:5s} P={P}: peak/rank {peak} of P=1 (target 1.25/P = {s['target_1.25_over_P']:.3f}), "
                  f"halo {100 * s['halo_vs_allgather']:.1f} % of all-gather, speed-up {s['speedup_vs_P1']:.2f}x")
    if not summary:
        print("no P=1 run: peak memory and speed-up against one process not computed (add 1 to --partitions)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
