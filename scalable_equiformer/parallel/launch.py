"""Start ``world`` local processes that form one gloo process group (one machine, CPU).

The one spawner of the package: ``tools/check_partitions.py`` (through :mod:`.check`),
``tools/bench_partition.py`` and ``tools/evaluate.py --partitions P`` (when not started by
torchrun / deepspeed) all use :func:`spawn_local`::

    def work(rank, world, *args):          # a module-level function (picklable under "spawn")
        ...                                # torch.distributed is initialised here (gloo)

    spawn_local(work, 2, args=(...,))      # returns when every rank returned; raises if one failed

Each process gets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment and joins the
group through a ``file://`` rendezvous in a temporary folder (no port to pick); the group is
destroyed when ``fn`` returns (unless ``fn`` destroyed it already).
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn_local", "default_start_method", "launched_ranks"]


def default_start_method() -> str:
    """``"fork"`` on Linux while CUDA is not initialised: the workers start without re-importing
    torch (seconds instead of tens of seconds on a busy CPU); ``"spawn"`` elsewhere."""
    return "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"


def launched_ranks() -> int:
    """World size this process already belongs to: the initialised group's, else the launcher's
    ``WORLD_SIZE`` (torchrun, deepspeed), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _entry(rank: int, fn, world: int, init_file: str, args: tuple, threads) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    if threads is not None:
        torch.set_num_threads(int(threads))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn, world: int, args: tuple = (), start_method: str | None = None, threads: int | None = 1,
                workdir=None) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` new processes joined in one gloo group.

    Blocks until all return. A failing rank makes the others stop and raises
    ``torch.multiprocessing.ProcessRaisedException`` (its traceback) or ``ProcessExitedException``.
    ``threads``: intra-op threads per process (1: ranks on a few cores do not oversubscribe them;
    None leaves torch's default). ``start_method``: see :func:`default_start_method`. ``workdir``:
    where the rendezvous folder is made (default: the system's temporary folder).
    """
    if int(world) < 1:
        raise ValueError(f"world must be >= 1, not {world}")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="se_spawn_") as tmp:
        mp.start_processes(
            _entry, args=(fn, int(world), os.path.join(tmp, "init"), tuple(args), threads),
            nprocs=int(world), join=True, start_method=start_method or default_start_method(),
        )
