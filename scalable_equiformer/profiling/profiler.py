"""Measure the peak memory of one full training step, one fresh subprocess per measurement
(this module is the calling side; :mod:`.worker` is what runs in the subprocess).

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
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .meter import ProfileError

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


def measure(req: Request, *, timeout: Optional[float] = None, python: str = sys.executable) -> dict:
    """Measure ``req`` in a fresh subprocess; return its record (``oom: true`` when it ran out)."""
    env = _worker_env(req)
    try:
        proc = subprocess.run([python, "-m", "scalable_equiformer.profiling.worker", "--worker"],
                              input=req.to_json(), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ProfileError(f"measurement timed out after {timeout} s "
                           f"({req.atoms or req.data}, batch {req.batch})") from None
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


def failed_record(req: Request, **extra) -> dict:
    return {"config": req.config_name, "batch": req.batch, "levers": req.levers, **extra}


def measure_many(reqs: list, *, timeout: Optional[float] = None, python: str = sys.executable,
                 on_result: Optional[Callable[[int, dict], None]] = None) -> list:
    """Measure ``reqs`` one after another in one subprocess (see the module docstring).

    Returns one record per request, in order: the measurement, or ``oom: true``, or
    ``error`` (the step failed; the next ones still run), or ``not_measured: true`` (the
    ``timeout``, seconds for all of them, ran out first, or the worker died). ``on_result(i,
    record)`` is called as each arrives. All requests must use the same device and threads.
    """
    if not reqs:
        return []
    out: list = [None] * len(reqs)
    proc, lines, err_tail = _start_worker_many(reqs, python)
    why = _collect_results(lines, out, timeout, on_result)
    _stop_worker(proc)
    if why is None and any(r is None for r in out):
        tail = "".join(err_tail).strip().splitlines()[-3:]
        why = f"measurement worker exited with {proc.returncode}: " + " | ".join(tail)
    for i, r in enumerate(out):
        if r is None:
            out[i] = failed_record(reqs[i], not_measured=True, error=why)
            if on_result is not None:
                on_result(i, out[i])
    return out


def _start_worker_many(reqs: list, python: str) -> tuple:
    """The ``--worker-many`` subprocess, given ``reqs``: (process, a queue of its stdout lines that
    ends with None, the last lines of its stderr)."""
    import queue
    import threading

    proc = subprocess.Popen([python, "-m", "scalable_equiformer.profiling.worker", "--worker-many"],
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
    return proc, lines, err_tail


def _collect_results(lines, out: list, timeout: Optional[float], on_result) -> Optional[str]:
    """Fill ``out`` from the worker's result lines until it ends (returns None) or ``timeout``
    seconds have passed (returns why)."""
    import queue

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            return f"time budget of {timeout:.0f} s used up"
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            continue
        if line is None:  # the worker ended
            return None
        if line.startswith(RESULT_TAG):
            item = json.loads(line[len(RESULT_TAG):])
            out[item["index"]] = item["record"]
            if on_result is not None:
                on_result(item["index"], item["record"])


def _stop_worker(proc) -> None:
    """Kill the worker's process group if it still runs, and reap it."""
    if proc.poll() is None:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
