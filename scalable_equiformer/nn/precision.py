"""The fp32 islands of mixed precision (``memory.precision``; the switch itself is
``memory.precision.autocast``, this package knows no lever).

``bf16`` and ``fp16`` run the model under ``torch.autocast``: matrix products
(the tensor products, linear layers and radial MLPs) run in 16 bits; parameters, their gradients
and the optimizer state stay fp32, so the saving is in activations only. Some parts run as
*fp32 islands* (:func:`fp32_island`): the equivariant layer norms (means of squares) and the
energy head; the energy sum is float64 (``Equiformer.readout``), and the force accumulation is
fp32 because autograd sums the edge-vector gradients into the fp32 positions. With ``fp16`` the
radial MLPs are fp32 islands too (their layer norm's double backward overflows fp16's range:
every gradient came out NaN), and the loss is scaled (``training.steps.loss_scaler``) so that small
gradients do not flush to zero. bf16 has fp32's range; putting its radial MLPs in fp32 made the
gradients worse (fp32 weights meeting bf16 tensor products), so bf16 keeps them in bf16.

Tolerance against fp32 (tests/test_memory_levers.py, a small Lmax-2 model): forces within 5 %
(relative norm), parameter gradients within 10 % (relative global norm); measured 1-2 % and
2-3 % for bf16 (8 significant bits), about 0.2 % for both with fp16 (11 bits).
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _to_fp32(x):
    if torch.is_tensor(x) and x.is_floating_point() and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _autocast_dtypes() -> set:
    return {torch.get_autocast_dtype(d) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)}


def fp32_island(fn=None, *, only=None):
    """Run ``fn`` in fp32 when autocast is on: 16-bit tensor arguments are cast up, autocast off.

    ``only`` (a dtype) limits the island to autocast in that dtype: ``only=torch.float16`` for
    parts that overflow fp16's range (bf16 has fp32's range). Without autocast it is a plain call
    (fp64 stays fp64), so the oracle paths are untouched. Use as ``@fp32_island`` or
    ``@fp32_island(only=torch.float16)``.
    """
    if fn is None:
        return functools.partial(fp32_island, only=only)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _autocast_on() or (only is not None and only not in _autocast_dtypes()):
            return fn(*args, **kwargs)
        args = tuple(_to_fp32(a) for a in args)
        kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


__all__ = ["fp32_island"]
