"""Dtypes and devices as users name them, parsed in one place (re-exported by :mod:`.runtime`,
where callers find them): :data:`DTYPES` (the one map of model dtype names), :func:`torch_dtype`,
:func:`parse_dtype`, :func:`default_dtype`, :func:`configure_tf32` (TF32 matmuls), and the device:
:func:`select_device` (a rank's GPU: :func:`cuda_index`), :func:`parse_device`.

Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: model dtype names -> torch dtypes: the one map of the package (:func:`torch_dtype`)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---- dtype, TF32 ---------------------------------------------------------------------------

def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def parse_dtype(value) -> torch.dtype:
    """A model dtype given by a user (``"float64"``, ``"torch.float64"`` or ``torch.float64``): one of
    :data:`DTYPES`, else :class:`~scalable_equiformer.errors.UserError`."""
    want = DTYPES.get(value.removeprefix("torch.")) if isinstance(value, str) else value
    if want not in DTYPES.values():
        from .errors import UserError

        raise UserError(f"dtype must be float32 or float64, not {value}")
    return want


@contextlib.contextmanager
def default_dtype(name_or_dtype) -> Iterator[None]:
    """Set torch's default floating dtype inside the block; the previous one is restored."""
    dtype = torch_dtype(name_or_dtype) if isinstance(name_or_dtype, str) else name_or_dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def configure_tf32(enabled: bool = False) -> None:
    """TF32 matmuls on Ampere+ GPUs. Off by default: forces are gradients, and TF32's 10-bit
    mantissa shows in them."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


# ---- device ---------------------------------------------------------------------------------

def cuda_index(local_rank: int, device_count: int) -> int:
    """The GPU of local rank ``local_rank``: ranks share the GPUs round robin (P partitions on
    fewer GPUs, e.g. one, share them).

    >>> [cuda_index(r, 1) for r in range(3)], [cuda_index(r, 2) for r in range(3)]
    ([0, 0, 0], [0, 1, 0])
    """
    return int(local_rank) % max(int(device_count), 1)


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("train.device: cuda requested but no CUDA device is available (use auto or cpu)")
    index = cuda_index(local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def parse_device(device) -> torch.device:
    """A device given by a user (a name such as ``"cuda:1"``, a ``torch.device``; None or ``"auto"``:
    the GPU when CUDA is available, else the CPU); :class:`~scalable_equiformer.errors.UserError`
    for CUDA on a machine without it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .errors import UserError

        raise UserError(f"device {device} asked for, but CUDA is not available here; use device='cpu'")
    return device
