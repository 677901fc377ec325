"""The measuring side of :mod:`.profiler`: what runs in its subprocess (``python -m
scalable_equiformer.profiling.worker --worker`` reads one :class:`~.profiler.Request` as JSON on
stdin, ``--worker-many`` a list of them) and prints each record on a line tagged ``RESULT_TAG``.
How the peak is counted, per device, is told in :mod:`.profiler`'s docstring.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from .meter import AllocationMeter, PeakMemoryMeter, _tensor_bytes
from .profiler import RESULT_TAG, Request, failed_record




def measure_in_process(req: Request) -> dict:
    """Run the measurement here (the subprocess calls this). Returns the result record."""
    if int(req.partitions) <= 1:
        return _measure_rank(req)
    import tempfile

    from ..parallel.launch import spawn_local

    with tempfile.TemporaryDirectory(prefix="se_profile_") as tmp:
        spawn_local(_rank_entry, int(req.partitions), args=(req.to_json(), tmp), threads=req.threads or None)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(int(req.partitions))]
    out = dict(ranks[0])
    for key in ("peak_bytes", "activation_bytes", "step_growth_bytes", "step_seconds", "step_cpu_seconds",
                "first_step_seconds", "rank_edges", "rank_atoms"):
        out[key] = max(r[key] for r in ranks)
    out["per_rank"] = [{k: r[k] for k in ("peak_bytes", "activation_bytes", "step_cpu_seconds", "rank_edges",
                                           "rank_owned", "rank_atoms")} for r in ranks]
    return out


def _rank_entry(rank: int, world: int, req_json: str, out_dir: str) -> None:
    result = _measure_rank(Request(**json.loads(req_json)), partitioned=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def _init_cuda_libraries(device) -> None:
    """cuBLAS handles and workspaces (fp32 and 16-bit matrix products, forward and backward):
    allocated once per process and kept, so they are outside every measurement alike."""
    import torch

    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
        (a @ a).sum().backward()
    torch.cuda.synchronize(device)


def _request_config(req: Request):
    """The Config of a request: its config with the request's levers, batch and partitions."""
    from ..config import config_from_dict

    cfg_dict = json.loads(json.dumps(req.config))
    cfg_dict.setdefault("memory", {}).update(req.levers)
    cfg_dict.setdefault("train", {})["batch_size"] = req.batch
    cfg_dict.setdefault("parallel", {})["graph_partitions"] = int(req.partitions)
    return config_from_dict(cfg_dict, origin=req.config_name or "profile request")


def _measurement_device(req: Request, partitioned: bool):
    """(device, bytes already allocated on it): a partition rank's own GPU; CUDA initialised and emptied."""
    import torch

    device = torch.device(req.device)
    if partitioned and device.type == "cuda":
        from ..runtime import cuda_index

        device = torch.device("cuda", cuda_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        _init_cuda_libraries(device)
        gc.collect()
        torch.cuda.empty_cache()
    # allocated before this measurement's model exists (a previous measurement's leftovers in
    # measure_many): not this step's
    return device, (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0)


def _request_frames(req: Request):
    """(z, frames [batch, atoms, 3]) of a request: its data file's first frames, or a synthetic molecule."""
    import numpy as np

    from . import systems

    if req.data is not None:
        return systems.load_frames(req.data, req.batch)
    z, pos = systems.synthetic_molecule(int(req.atoms), seed=req.seed)
    return z, np.repeat(pos[None], req.batch, axis=0)


def _timed_steps(step, batch, device, n: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``n`` steps on ``batch``."""
    import torch

    times, cpu_times = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return times, cpu_times


def _measure_rank(req: Request, partitioned: bool = False) -> dict:
    """One process's measurement; with ``partitioned`` it is one rank of the partition group."""
    import torch

    from . import systems

    torch.manual_seed(req.seed)
    if req.threads:
        torch.set_num_threads(req.threads)
    cfg = _request_config(req)
    device, start_allocated = _measurement_device(req, partitioned)
    z, frames = _request_frames(req)
    atoms = len(z)
    edges = sum(systems.count_edges(f, cfg.model.cutoff) for f in frames)
    model, module, step, dtype, batch, states = _warmed_up_step(req, cfg, device, z, frames, partitioned)

    meter = AllocationMeter(device) if req.meter == "alloc" and device.type == "cpu" else PeakMemoryMeter(device)
    info, first, first_cpu, growth = _first_step(step, batch, device, meter)
    times, cpu_times = _timed_steps(step, batch, device, req.timing_steps)

    if device.type == "cuda":
        peak = meter.base + growth - start_allocated  # this measurement's tensors on the device at the peak
    else:
        peak = states["params_bytes"] + states["optimizer_bytes"] + growth  # resident model states + the growth
    return {
        "config": req.config_name,
        "atoms": atoms,
        "edges": int(edges),
        "batch": req.batch,
        "levers": cfg.memory.as_dict(),
        "peak_bytes": int(peak),
        "activation_bytes": int(max(peak - sum(states.values()), 0)),
        "step_growth_bytes": int(growth),
        **states,
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "step_seconds": statistics.median(times) if times else first,
        "step_cpu_seconds": statistics.median(cpu_times) if cpu_times else first_cpu,
        "first_step_seconds": first,
        **_rank_share(module if partitioned else None, int(edges), atoms * req.batch),
        "method": meter.method,
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "loss": float(info.get("loss", float("nan"))),
        "device_total_memory_bytes": _device_total_memory(device),
    }


def _warmed_up_step(req: Request, cfg, device, z, frames, partitioned: bool) -> tuple:
    """The model (partitioned when asked) and its training step, run once on a tiny molecule (the
    libraries initialised, the optimizer state allocated): (model, module, step, dtype, the request's
    batch, :func:`_model_state_bytes`)."""
    import numpy as np

    from . import measured_step

    model, dtype = measured_step.build(cfg, device, len(z))
    module = model
    if partitioned:
        from ..memory import ForceRunner
        from ..parallel.partitioned import PartitionedModel

        module = PartitionedModel(model, runner=ForceRunner(cfg.memory))
    batch = measured_step.make_batch(z, frames, dtype, device)
    small = min(len(z), 8)
    warm = measured_step.make_batch(z[:small], np.repeat(frames[:1, :small], req.batch, axis=0), dtype, device)
    step, engine = measured_step.make_step(module, cfg, world=int(req.partitions) if partitioned else 1)
    step(warm)
    engine.optimizer.zero_grad(set_to_none=True)
    return model, module, step, dtype, batch, _model_state_bytes(model, engine.optimizer)


def _model_state_bytes(model, optimizer) -> dict:
    """Bytes of the parameters, their gradients and the optimizer state (the step's resident states)."""
    import torch

    opt_tensors = (v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {
        "params_bytes": int(_tensor_bytes(model.parameters())),
        "grads_bytes": int(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)),
        "optimizer_bytes": int(_tensor_bytes(opt_tensors)),
    }


def _first_step(step, batch, device, meter) -> tuple:
    """The measured step under ``meter``: (step info, wall seconds, CPU seconds, peak growth bytes)."""
    import torch

    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    info = step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    return info, first, first_cpu, meter.stop()


def _rank_share(module, edges: int, atoms: int) -> dict:
    """The edges and atoms this rank computes: all of them, or its partition's (``module`` partitioned)."""
    rank_edges, rank_owned, rank_atoms = edges, atoms, atoms
    if module is not None and module.last_partition is not None:
        part = module.last_partition.local(module.part_rank)
        rank_edges, rank_owned, rank_atoms = int(part.edge_index.shape[1]), part.num_owned, part.num_local
    return {
        "rank_edges": rank_edges,  # edges this rank computes (all, without partitions)
        "rank_owned": rank_owned,
        "rank_atoms": rank_atoms,  # owned + halo atoms
    }


def _device_total_memory(device) -> Optional[int]:
    """The CUDA device's total memory in bytes (None on the CPU)."""
    import torch

    return int(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"cpu:{cpu}"


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _worker() -> int:
    _die_with_parent()
    req = Request(**json.loads(sys.stdin.read()))
    result = measure_in_process(req)
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the process that started it dies (a benchmark that
    kills the profiler at its time limit must not leave a worker holding the GPU)."""
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _worker_many() -> int:
    import traceback

    import torch

    _die_with_parent()
    reqs = [Request(**r) for r in json.loads(sys.stdin.read())]
    for i, req in enumerate(reqs):
        try:
            record = measure_in_process(req)
            record["one_process"] = True
        except Exception as exc:  # noqa: BLE001 - recorded, and the next measurement runs
            if _is_oom(exc):
                record = failed_record(req, oom=True, error=str(exc).strip().splitlines()[0][:300])
            else:
                record = failed_record(req, error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")
                traceback.print_exc(file=sys.stderr)
            del exc
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        sys.stdout.write("\n" + RESULT_TAG + json.dumps({"index": i, "record": record}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker())
    if sys.argv[1:] == ["--worker-many"]:
        sys.exit(_worker_many())
    sys.exit("usage: python -m scalable_equiformer.profiling.worker --worker[-many] < request(s).json")
