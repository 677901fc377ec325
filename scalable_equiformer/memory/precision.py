"""The precision lever (``memory.precision``): ``torch.autocast`` for bf16 / fp16, nothing for fp32.

Which parts of the model stay fp32 under it (norms, the energy head, fp16's radial MLPs) is the
building blocks' business: :func:`scalable_equiformer.nn.precision.fp32_island`, which also states
the tolerances against fp32.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def low_dtype(precision: str):
    """The autocast dtype of a precision, or None for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return _DTYPES.get(precision)


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16 / fp16 on ``device``; a no-op context for fp32."""
    dtype = low_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


__all__ = ["PRECISIONS", "autocast", "low_dtype"]
