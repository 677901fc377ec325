"""Peak memory over a region of code: the project's one meter (:class:`PeakMemoryMeter`).

On CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the
process's peak resident set (``VmHWM`` of ``/proc/self/status``), reset through
``/proc/self/clear_refs`` where allowed. The profiler (``profiler.py``), ``tools/bench_model.py``
and ``tools/bench_partition.py`` measure with it.
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


__all__ = ["PeakMemoryMeter", "ProfileError", "read_proc_status", "reset_peak_rss"]
