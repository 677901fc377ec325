"""Peak memory over a region of code: the project's one meter (:class:`PeakMemoryMeter`).

On CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the
process's peak resident set (``VmHWM`` of ``/proc/self/status``), reset through
``/proc/self/clear_refs`` where allowed. The profiler (``profiler.py``), ``tools/bench_model.py``
and ``tools/bench_partition.py`` measure with it.

:class:`AllocationMeter` (``memory_profile.py --meter alloc``) counts tensor allocations instead:
the peak of live tensor bytes from the PyTorch profiler's memory events, the CPU analogue of
``max_memory_allocated``. It does not depend on malloc's fragmentation or on the machine, so two
implementations (this one and the original Equiformer, ``benchmarks/original/``) compare exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

from ..errors import UserError


class ProfileError(UserError, RuntimeError):
    """A measurement subprocess failed."""


def read_proc_status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise ProfileError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) through /proc/self/clear_refs; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemoryMeter:
    """Peak memory over a region, on the CUDA allocator (``max_memory_allocated``) or as the
    process's resident set (VmHWM, reset through /proc/self/clear_refs where allowed).

    The one meter of the project: the profiler, ``tools/bench_model.py`` and
    ``tools/bench_partition.py`` measure with it. :meth:`start` collects garbage, empties the CUDA
    cache or trims malloc, resets the peak and records the base (allocated or resident bytes);
    :meth:`stop` returns the peak's growth over that base and keeps the absolute peak in
    :attr:`peak`. :attr:`method` says how it measured.
    """

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.method = "cuda_max_memory_allocated" if self.cuda else "cpu_vmhwm"
        self.base = 0
        self.peak = 0

    def start(self) -> None:
        gc.collect()
        if self.cuda:  # the peak counts from here: reset for every measurement
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            if reset_peak_rss():
                self.method = "cpu_vmhwm_clear_refs"
            else:  # the process's lifetime peak
                self.method = "cpu_vmhwm_baseline"
            self.base = read_proc_status("VmRSS")

    def stop(self) -> int:
        """Growth of the peak over the resident (or allocated) memory at :meth:`start`."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.peak = int(self.torch.cuda.max_memory_allocated(self.device))
            return int(self.peak - self.base)
        self.peak = read_proc_status("VmHWM")
        return max(self.peak - self.base, 0)


class AllocationMeter:
    """Peak of live tensor bytes over a region, counted from the allocation and free events that
    ``torch.profiler`` records with ``profile_memory=True`` (the CPU's ``max_memory_allocated``).

    Deterministic: the same code on the same inputs gives the same figure on any machine and in
    any run, where the resident-set peak also holds what malloc keeps after a free. Slower (the
    profiler records every op), so time the step separately. The interface of
    :class:`PeakMemoryMeter`: :meth:`stop` returns the peak's growth over the live bytes at
    :meth:`start`.

    >>> import torch
    >>> m = AllocationMeter("cpu"); m.start()
    >>> a = torch.ones(1000, 250); b = a * 2; del a, b
    >>> m.stop() // 1000  # two 1 MB tensors alive at once (and a few bytes of the profiler's)
    2000
    """

    method = "cpu_alloc_events"

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.base = 0
        self.peak = 0
        self._prof = None

    def start(self) -> None:
        gc.collect()
        prof = self.torch.profiler
        self._prof = prof.profile(activities=[prof.ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def stop(self) -> int:
        self._prof.__exit__(None, None, None)
        cpu = self.torch.autograd.DeviceType.CPU
        events = [e for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == cpu]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        self._prof = None
        self.peak = int(peak)
        return self.peak


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


__all__ = ["AllocationMeter", "PeakMemoryMeter", "ProfileError", "read_proc_status", "reset_peak_rss"]
