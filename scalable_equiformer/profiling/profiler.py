"""Measure the peak memory of one full training step, one fresh subprocess per measurement.

A measurement builds the model and optimizer from the config, runs one warm-up step on a tiny
molecule (it initialises the libraries and allocates the optimizer state), then measures one
training step on the requested batch: forward, forces with ``create_graph=True``, loss, backward,
optimizer step (with micro-batching, checkpointing and precision as the levers say).

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the peak of all
  tensors on the device during the step (parameters, optimizer state, gradients, activations).
* **CPU**: peak resident memory of the process (``VmHWM`` in ``/proc/self/status``) over the step,
  minus the resident memory just before it; ``VmHWM`` is reset by writing ``5`` to
  ``/proc/self/clear_refs`` (when that is not allowed the warm-up peak is tiny, so the growth is
  still the step's). Large allocations are served by ``mmap`` with a fixed threshold
  (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the process at once and resident
  memory follows the live tensors, as the CUDA allocator's count does. The reported
  ``peak_bytes`` adds the resident parameters and optimizer state, so both devices report the same
  quantity.
* **CPU, ``meter="alloc"``** (``memory_profile.py --meter alloc``): the peak of live tensor bytes
  over the step, counted from the profiler's allocation events (:class:`.meter.AllocationMeter`),
  the CPU analogue of CUDA's count: deterministic, machine-independent, free of malloc's
  fragmentation. The measured step runs under the profiler (``first_step_seconds`` includes its
  overhead); the timing steps do not.

``activation_bytes`` is the peak minus parameters, gradients and optimizer state.
``step_seconds`` is the median of ``timing_steps`` steps after the measured one.

With ``partitions`` P > 1 (``parallel.graph_partitions``) the subprocess starts P ranks in one
process group (gloo, :func:`~scalable_equiformer.parallel.launch.spawn_local`; with CUDA tensors
on a GPU machine, rank r on GPU ``r % device_count``), each running the partitioned model on its
part of the same molecules and measuring its own peak; the record gives the largest rank's figures
(what must fit on each GPU) and ``per_rank``.

:func:`measure_many` runs a list of measurements one after another in *one* subprocess (the
libraries and the CUDA context are started once: a GPU sweep of many lever sets and sizes takes
minutes instead of a process start per measurement). On CUDA that is exact: each measurement
counts ``max_memory_allocated`` from its own reset, minus what was allocated before its model was
built (a previous measurement's leftovers, cuBLAS workspaces: these are initialised before the
first measurement, in both modes). On the CPU the resident-memory count can keep pages of an
earlier measurement, so there a fresh subprocess per measurement (:func:`measure`) is the
reference. Results stream back as each measurement ends; a time budget stops the rest
(``not_measured``) without losing what was measured, and an out-of-memory step is recorded
(``oom``) and the next one runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .meter import AllocationMeter, PeakMemoryMeter, ProfileError, _tensor_bytes

RESULT_TAG = "MEMORY_PROFILE_RESULT "
MMAP_THRESHOLD = 1 << 17  # bytes; fixed, which also turns off glibc's dynamic threshold


@dataclass
class Request:
    """One measurement: a config (as :meth:`Config.to_dict`), a molecule, a batch size, levers."""

    config: dict
    config_name: str = ""
    data: Optional[str] = None  # a data file: frames 0..batch-1
    atoms: Optional[int] = None  # or a synthetic molecule of this many atoms
    batch: int = 1
    levers: dict = field(default_factory=dict)  # memory.* keys
    device: str = "cpu"
    threads: int = 1
    timing_steps: int = 2
    seed: int = 0
    partitions: int = 1  # parallel.graph_partitions: ranks sharing each molecule
    meter: str = "rss"  # CPU: rss (resident-set peak) | alloc (live tensor bytes, meter.AllocationMeter)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# --------------------------------------------------------------------------------------------
# the measuring side (runs in the subprocess)


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
    import numpy as np
    import torch

    from . import measured_step, systems

    torch.manual_seed(req.seed)
    if req.threads:
        torch.set_num_threads(req.threads)
    cfg = _request_config(req)
    device, start_allocated = _measurement_device(req, partitioned)
    z, frames = _request_frames(req)
    atoms = len(z)
    edges = sum(systems.count_edges(f, cfg.model.cutoff) for f in frames)

    model, dtype = measured_step.build(cfg, device, atoms)
    module = model
    if partitioned:
        from ..memory import ForceRunner
        from ..parallel.partitioned import PartitionedModel

        module = PartitionedModel(model, runner=ForceRunner(cfg.memory))
    batch = measured_step.make_batch(z, frames, dtype, device)
    small = min(atoms, 8)
    warm = measured_step.make_batch(z[:small], np.repeat(frames[:1, :small], req.batch, axis=0), dtype, device)
    step, engine = measured_step.make_step(module, cfg, world=int(req.partitions) if partitioned else 1)
    optimizer = engine.optimizer

    step(warm)  # libraries initialised, optimizer state allocated
    optimizer.zero_grad(set_to_none=True)
    params_bytes = _tensor_bytes(model.parameters())
    grads_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt_bytes = _tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    del warm

    meter = AllocationMeter(device) if req.meter == "alloc" and device.type == "cpu" else PeakMemoryMeter(device)
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    info = step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    growth = meter.stop()

    times, cpu_times = _timed_steps(step, batch, device, req.timing_steps)

    if device.type == "cuda":
        peak = meter.base + growth - start_allocated  # this measurement's tensors on the device at the peak
    else:
        peak = params_bytes + opt_bytes + growth  # resident model states + the step's growth
    activation = max(peak - params_bytes - grads_bytes - opt_bytes, 0)
    n_params = sum(p.numel() for p in model.parameters())
    rank_edges, rank_owned, rank_atoms = int(edges), atoms * req.batch, atoms * req.batch
    if partitioned and module.last_partition is not None:
        part = module.last_partition.local(module.part_rank)
        rank_edges, rank_owned, rank_atoms = int(part.edge_index.shape[1]), part.num_owned, part.num_local
    return {
        "config": req.config_name,
        "atoms": atoms,
        "edges": int(edges),
        "batch": req.batch,
        "levers": cfg.memory.as_dict(),
        "peak_bytes": int(peak),
        "activation_bytes": int(activation),
        "step_growth_bytes": int(growth),
        "params_bytes": int(params_bytes),
        "grads_bytes": int(grads_bytes),
        "optimizer_bytes": int(opt_bytes),
        "num_params": int(n_params),
        "step_seconds": statistics.median(times) if times else first,
        "step_cpu_seconds": statistics.median(cpu_times) if cpu_times else first_cpu,
        "first_step_seconds": first,
        "rank_edges": rank_edges,  # edges this rank computes (all, without partitions)
        "rank_owned": rank_owned,
        "rank_atoms": rank_atoms,  # owned + halo atoms
        "method": meter.method,
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "loss": float(info.get("loss", float("nan"))),
        "device_total_memory_bytes": (int(torch.cuda.get_device_properties(device).total_memory)
                                      if device.type == "cuda" else None),
    }


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


# --------------------------------------------------------------------------------------------
# the calling side


def measure(req: Request, *, timeout: Optional[float] = None, python: str = sys.executable) -> dict:
    """Measure ``req`` in a fresh subprocess; return its record (``oom: true`` when it ran out)."""
    env = _worker_env(req)
    try:
        proc = subprocess.run([python, "-m", "scalable_equiformer.profiling.profiler", "--worker"],
                              input=req.to_json(), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ProfileError(f"measurement timed out after {timeout} s ({req.atoms or req.data}, batch {req.batch})") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    if any("out of memory" in x.lower() for x in tail) or proc.returncode in (-9, 137):
        return {"config": req.config_name, "batch": req.batch, "levers": req.levers, "oom": True,
                "error": "\n".join(tail[-3:])}
    raise ProfileError("measurement subprocess failed (exit %s):\n%s" % (proc.returncode, "\n".join(tail)))


def _worker_env(req: Request) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    env.setdefault("DS_ACCELERATOR", "cuda" if req.device.startswith("cuda") else "cpu")
    if req.threads:
        env["OMP_NUM_THREADS"] = str(req.threads)
        env["MKL_NUM_THREADS"] = str(req.threads)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _failed(req: Request, **extra) -> dict:
    return {"config": req.config_name, "batch": req.batch, "levers": req.levers, **extra}


def measure_many(reqs: list, *, timeout: Optional[float] = None, python: str = sys.executable,
                 on_result: Optional[Callable[[int, dict], None]] = None) -> list:
    """Measure ``reqs`` one after another in one subprocess (see the module docstring).

    Returns one record per request, in order: the measurement, or ``oom: true``, or
    ``error`` (the step failed; the next ones still run), or ``not_measured: true`` (the
    ``timeout``, seconds for all of them, ran out first, or the worker died). ``on_result(i,
    record)`` is called as each arrives. All requests must use the same device and threads.
    """
    import queue
    import threading

    if not reqs:
        return []
    out: list = [None] * len(reqs)
    proc = subprocess.Popen([python, "-m", "scalable_equiformer.profiling.profiler", "--worker-many"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_worker_env(reqs[0]), start_new_session=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    err_tail: list = []

    def pump(stream, sink):
        for line in stream:
            sink(line)
        if stream is proc.stdout:
            lines.put(None)

    threading.Thread(target=pump, args=(proc.stdout, lines.put), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, lambda x: (err_tail.append(x), err_tail[:-40].clear())),
                     daemon=True).start()
    proc.stdin.write(json.dumps([asdict(r) for r in reqs]))
    proc.stdin.close()
    deadline = None if timeout is None else time.monotonic() + timeout
    why = None
    while True:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            why = f"time budget of {timeout:.0f} s used up"
            break
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            continue
        if line is None:  # the worker ended
            break
        if line.startswith(RESULT_TAG):
            item = json.loads(line[len(RESULT_TAG):])
            out[item["index"]] = item["record"]
            if on_result is not None:
                on_result(item["index"], item["record"])
    if proc.poll() is None:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if why is None and any(r is None for r in out):
        tail = "".join(err_tail).strip().splitlines()[-3:]
        why = f"measurement worker exited with {proc.returncode}: " + " | ".join(tail)
    for i, r in enumerate(out):
        if r is None:
            out[i] = _failed(reqs[i], not_measured=True, error=why)
            if on_result is not None:
                on_result(i, out[i])
    return out


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
                record = _failed(req, oom=True, error=str(exc).strip().splitlines()[0][:300])
            else:
                record = _failed(req, error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")
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
    sys.exit("usage: python -m scalable_equiformer.profiling.profiler --worker[-many] < request(s).json")
