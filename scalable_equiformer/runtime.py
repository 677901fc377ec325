"""Process-wide state in one place: seeds, default dtype, TF32, the device, distributed init,
the collectives every rank calls together, and the package's log handlers.

Nothing here runs at import time; entry points call these functions once, early.

* seeds: :func:`seed_everything`; dtype, TF32 and the device, parsed in :mod:`.devices` and
  re-exported here: :data:`DTYPES`, :func:`torch_dtype`, :func:`parse_dtype`, :func:`default_dtype`,
  :func:`configure_tf32`, :func:`select_device`, :func:`cuda_index`, :func:`parse_device`;
* the process group: :func:`launch_env`, :func:`init_distributed`, :func:`shutdown_distributed`,
  :func:`current_dist_info`;
* collectives (no-ops on one process): :func:`broadcast_object`, :func:`barrier`,
  :func:`sum_over_ranks`, :func:`failed_ranks`, :func:`error_everywhere` (an error on one rank
  stops all ranks, none hangs);
* logging of the ``scalable_equiformer`` logger: :func:`setup_logging`, :func:`add_log_file`,
  :func:`teardown_logging`;
* signals: :func:`sigterm_as_interrupt` (SIGTERM, what schedulers send first, stops a run the way
  Ctrl-C does: :class:`Terminated`, a ``KeyboardInterrupt``).

Launch modes handled by :func:`init_distributed`:

* ``python train.py ...`` — one process, no launcher. Without DeepSpeed nothing is initialised.
  With DeepSpeed (ZeRO stage > 0 or ``deepspeed.enabled: true``), the ``RANK`` / ``WORLD_SIZE``
  / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables are set here for a world of one
  on a free loopback port, so DeepSpeed never looks for mpi4py.
* ``torchrun --nproc_per_node N train.py ...`` and ``deepspeed [--num_gpus N] train.py ...`` —
  the launcher sets those variables (the DeepSpeed launcher also passes ``--local_rank``, which
  ``train.py`` accepts).
* several nodes (``torchrun --nnodes N --node_rank i ...``, ``deepspeed --hostfile ...``): the same;
  ``RANK`` is global (rank 0 writes the run folder), ``LOCAL_RANK`` picks the GPU, and
  ``LOCAL_WORLD_SIZE`` / ``LOCAL_SIZE`` (ranks per node) the partition layout
  (:func:`scalable_equiformer.parallel.partitioned.check_layout`).

Backend: nccl on CUDA, gloo on CPU. On CPU DeepSpeed would compile its shared-memory
communication op (``deepspeed_shm_comm``, 1-2 min) on first use; :func:`patch_deepspeed_cpu`
replaces its builder with a no-op (gloo does the communication). DeepSpeed's accelerator follows the
training device: :func:`deepspeed_accelerator` sets ``DS_ACCELERATOR`` (cuda or cpu) and refuses a
conflicting one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import socket
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

# dtypes and devices are parsed in .devices; here they stand beside the rest of the process-wide state
from .devices import (
    DTYPES,
    configure_tf32,
    cuda_index,
    default_dtype,
    parse_device,
    parse_dtype,
    select_device,
    torch_dtype,
)

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---- seeds ---------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---- distributed ----------------------------------------------------------------------------

@dataclasses.dataclass
class DistInfo:
    """Where this process stands. ``initialized``: a torch.distributed process group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: ranks on this node (``LOCAL_WORLD_SIZE`` from torchrun, ``LOCAL_SIZE`` from DeepSpeed; the
    #: whole world when neither is set)
    local_world_size: int = 1
    backend: Optional[str] = None
    launcher: str = "none"  # none | torchrun | deepspeed
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes the run folder and logs below WARNING."""
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """Local rank 0: the process of each node that does node-local work."""
        return self.local_rank == 0


def launch_env() -> DistInfo:
    """Rank, world and launcher as the environment tells them (before any init)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    rank = int(env.get("RANK", "0") or 0)
    local = int(env.get("LOCAL_RANK", "0") or 0)
    local_world = _local_world_size(world)
    if "CROSS_RANK" in env or "CROSS_SIZE" in env or env.get("SE_DEEPSPEED_LAUNCHER") == "1":
        launcher = "deepspeed"
    elif "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        launcher = "torchrun"
    else:
        launcher = "none" if world == 1 else "env"
    return DistInfo(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, launcher=launcher)


def _local_world_size(world: int) -> int:
    """Ranks on this node as the launcher says (torchrun ``LOCAL_WORLD_SIZE``, DeepSpeed
    ``LOCAL_SIZE``); ``world`` (one node) when it says nothing."""
    env = os.environ
    return int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """RANK=0, WORLD_SIZE=1, LOCAL_RANK=0 and a free loopback port, where not set already."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def patch_deepspeed_cpu() -> None:
    """CPU/gloo only: no shared-memory comm op build, CPU accelerator. Call before importing
    ``deepspeed`` initialises its accelerator, and before ``deepspeed.init_distributed``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm.torch  # noqa: F401  (the submodule; ``deepspeed.comm.torch`` as an attribute is torch itself)

    module = sys.modules["deepspeed.comm.torch"]
    if getattr(module.build_shm_op, "_scalable_equiformer_noop", False):
        return

    def build_shm_op():  # gloo does the communication; nothing to compile
        return None

    build_shm_op._scalable_equiformer_noop = True  # type: ignore[attr-defined]
    module.build_shm_op = build_shm_op


def deepspeed_accelerator(device: torch.device) -> str:
    """Point DeepSpeed at the training device: ``DS_ACCELERATOR`` = ``cuda`` or ``cpu``. Call before
    ``deepspeed`` is imported. DeepSpeed picks its accelerator once per process, from
    ``DS_ACCELERATOR`` or by probing; one that differs from ``device`` (``DS_ACCELERATOR=cpu`` left
    in the environment of a GPU run, or ``train.device=cpu`` on a GPU machine after DeepSpeed chose
    CUDA) would put its buffers and collectives on the other device, so it is a ConfigError."""
    from .errors import ConfigError

    want = "cuda" if device.type == "cuda" else "cpu"
    have = os.environ.get("DS_ACCELERATOR")
    if have and have != want:
        raise ConfigError(f"DS_ACCELERATOR={have} in the environment, but training runs on {device} (train.device): "
                          f"unset DS_ACCELERATOR or set it to {want}")
    chosen = getattr(sys.modules.get("deepspeed.accelerator.real_accelerator"), "ds_accelerator", None)
    if chosen is not None and chosen.device_name() != want:
        raise ConfigError(f"DeepSpeed already chose its {chosen.device_name()} accelerator in this process, but "
                          f"training runs on {device} (train.device): one process cannot switch")
    os.environ["DS_ACCELERATOR"] = want
    return want


def configure_threads(info: DistInfo, device: torch.device) -> int:
    """CPU runs: one intra-op thread per rank unless ``OMP_NUM_THREADS`` says otherwise.

    Measured on a shared 2-core machine with the demo model: 1.5 s per step with one thread,
    8-40 s with two (OpenMP threads wait on each other when other jobs hold the cores); Equiformer's
    many small tensor ops gain little from intra-op threads even on an idle machine.
    """
    if device.type != "cpu":
        return torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def init_distributed(use_deepspeed: bool, device_name: str = "auto",
                     timeout_s: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Initialise the process group this launch needs; return (DistInfo, device).

    One process without DeepSpeed: nothing is initialised. One process with DeepSpeed: a world
    of one on loopback. Several processes: the launcher's environment (``env://``).
    """
    import datetime

    info = launch_env()
    device = select_device(device_name, info.local_rank)
    info.backend = "nccl" if device.type == "cuda" else "gloo"
    configure_threads(info, device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        info.rank, info.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info.local_world_size = _local_world_size(info.world_size)
        info.initialized = True
        return info, device
    if info.world_size == 1 and not use_deepspeed:
        return info, device
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_deepspeed:
        if info.world_size == 1:
            set_single_process_env()
        deepspeed_accelerator(device)
        if device.type == "cpu":
            patch_deepspeed_cpu()
        import deepspeed

        deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    else:
        missing = [k for k in _ENV if k not in os.environ]
        if missing:
            from .errors import ConfigError

            raise ConfigError(f"WORLD_SIZE={info.world_size} but {', '.join(missing)} not set: "
                              "launch with torchrun or deepspeed")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend=info.backend, timeout=timeout, **kwargs)
    info.rank, info.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info.local_world_size = _local_world_size(info.world_size)
    info.initialized = True
    return info, device


def shutdown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass
    try:  # DeepSpeed keeps its own handle on the (now destroyed) group
        dscomm = sys.modules.get("deepspeed.comm.comm")
        if dscomm is not None:
            dscomm.cdb = None
    except Exception:  # pragma: no cover
        pass


def current_dist_info() -> DistInfo:
    """Rank, world and backend of the process group that exists now (not initialised: one process).
    For code that runs inside a group someone else made (the memory profiler's ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return DistInfo()
    world = torch.distributed.get_world_size()
    return DistInfo(rank=torch.distributed.get_rank(), world_size=world, local_world_size=_local_world_size(world),
                    backend=torch.distributed.get_backend(), initialized=True)


# ---- collectives (every rank calls them; one process: no-ops) -------------------------------

def _distributed(info: DistInfo) -> bool:
    return info.initialized and info.world_size > 1


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not _distributed(info):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if _distributed(info):
        torch.distributed.barrier()


def sum_over_ranks(values: torch.Tensor, info: DistInfo, device) -> torch.Tensor:
    """``values`` (a CPU tensor) summed over all ranks, back on the CPU (nccl: through ``device``)."""
    if not _distributed(info):
        return values
    t = values.to(device) if info.backend == "nccl" else values
    torch.distributed.all_reduce(t)
    return t.cpu()


def failed_ranks(ok: bool, info: DistInfo, device) -> int:
    """How many ranks have ``ok`` false."""
    t = sum_over_ranks(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64), info, device)
    return int(round(float(t)))


def error_everywhere(exc: Optional[BaseException], info: DistInfo, device) -> None:
    """Raise ``exc`` on its rank and a short TrainingError on the others, so no rank hangs.
    An error that only some ranks hit is marked ``rank_specific``: ``train.py`` prints those on
    every rank (it prints errors that are the same everywhere on rank 0 only)."""
    failed = failed_ranks(exc is None, info, device)
    if failed == 0:
        return
    if exc is not None:
        if failed < info.world_size:
            exc.rank_specific = True
        raise exc
    from .errors import TrainingError

    raise TrainingError("another rank stopped with an error (see its message)")


# ---- logging --------------------------------------------------------------------------------

def setup_logging(is_main: bool, level: str, log_file: Optional[Path] = None) -> list[logging.Handler]:
    """Handlers of the ``scalable_equiformer`` logger: stdout (every rank; below WARNING on rank 0
    only) and ``log_file`` (rank 0). Returns them for :func:`teardown_logging`."""
    root = logging.getLogger("scalable_equiformer")
    root.setLevel(getattr(logging, level.upper()) if is_main else logging.WARNING)
    root.propagate = False
    handlers: list[logging.Handler] = []
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    handlers.append(h)
    if is_main and log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        handlers.append(fh)
    for x in handlers:
        root.addHandler(x)
    return handlers


def add_log_file(path: Path) -> logging.Handler:
    """A file handler (date and time on each line) on the ``scalable_equiformer`` logger."""
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger("scalable_equiformer").addHandler(fh)
    return fh


def teardown_logging(handlers) -> None:
    root = logging.getLogger("scalable_equiformer")
    for h in handlers:
        root.removeHandler(h)
        h.close()


# ---- signals --------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM under :func:`sigterm_as_interrupt`: a stop like Ctrl-C's
    (``except KeyboardInterrupt`` catches both; ``signal_name`` tells them apart)."""

    signal_name = "SIGTERM"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` where the main thread is, as SIGINT raises
    ``KeyboardInterrupt``: ``finally`` blocks run (atomic writes remove their temp file, logs are
    flushed) and the caller can say where the run stopped. Only where SIGTERM has its default action
    and this is the main thread; the previous handler comes back on exit."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


__all__ = [
    "DTYPES",
    "DistInfo",
    "Terminated",
    "sigterm_as_interrupt",
    "add_log_file",
    "barrier",
    "broadcast_object",
    "current_dist_info",
    "error_everywhere",
    "failed_ranks",
    "setup_logging",
    "sum_over_ranks",
    "teardown_logging",
    "configure_tf32",
    "cuda_index",
    "deepspeed_accelerator",
    "default_dtype",
    "init_distributed",
    "launch_env",
    "parse_device",
    "parse_dtype",
    "patch_deepspeed_cpu",
    "seed_everything",
    "select_device",
    "set_single_process_env",
    "shutdown_distributed",
    "torch_dtype",
]
