"""CUDA autocast's cast policy, emulated under CPU autocast (for tests on machines without a GPU).

``torch.autocast("cuda")`` and ``torch.autocast("cpu")`` cast different op lists. Both run matrix
products in 16 bits, but CUDA also runs a list of ops in fp32 whatever their 16-bit inputs (exp,
pow, sum, softmax, norms, layer_norm, log, rsqrt, ...) and promotes the inputs of a few others to
the widest type (scatter_add, index_put, addcmul, ...), where CPU autocast leaves them in 16 bits.
Code that mixes the results (a bf16 ``new_zeros`` receiving an fp32 ``index_add`` source, an
``index_add`` of bf16 into fp32) works on the CPU and fails on a GPU. Inside
:func:`cuda_autocast_policy`, CUDA's fp32 and promote lists apply on top of CPU autocast, so such
mixes show up in CPU tests.

The lists are PyTorch's (``aten/src/ATen/autocast_mode.cpp``, CUDA: ``AT_FORALL_FP32``,
``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_PROMOTE``), out-of-place ops only, as autocast does.
The ops are wrapped where Python code reaches them (``torch.X``, ``Tensor.X``,
``torch.nn.functional.X``, ``torch.linalg.X``) rather than through a ``TorchFunctionMode``: a
mode is not active in the recomputations that checkpointing runs inside ``backward()``, while
autocast is (checkpoint restores it), so a mode would make forward and recomputation disagree.
"""

from __future__ import annotations

import contextlib
import functools

import torch

#: ops CUDA autocast runs in fp32 (16-bit floating inputs cast up; fp64 stays fp64)
FP32_OPS = frozenset("""
    acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow __pow__ __rpow__
    softplus layer_norm group_norm cosine_similarity poisson_nll_loss
    cosine_embedding_loss nll_loss hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss
    margin_ranking_loss soft_margin_loss triplet_margin_loss multi_margin_loss
    binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp
    prod softmax log_softmax cumprod cumsum vector_norm matrix_norm norm sum
""".split())
#: ops CUDA autocast runs in the widest floating type of their inputs
PROMOTE_OPS = frozenset("addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put scatter_add tensordot".split())

_LOW = (torch.float16, torch.bfloat16)
_NAMESPACES = (torch, torch.Tensor, torch.nn.functional, torch.linalg)


def _map(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    return obj


def _floats(obj):
    if torch.is_tensor(obj):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _floats(o)


def _wrap(fn, name, hits):
    fp32 = name in FP32_OPS

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            tensors = list(_floats((args, tuple(kwargs.values()))))
            if fp32 and any(t.dtype in _LOW for t in tensors):
                def cast(t):
                    return t.float() if t.is_floating_point() and t.dtype in _LOW else t
            elif not fp32 and len({t.dtype for t in tensors}) > 1:
                wide = functools.reduce(torch.promote_types, (t.dtype for t in tensors))

                def cast(t):
                    return t.to(wide) if t.is_floating_point() else t
            else:
                return fn(*args, **kwargs)
            hits[name] = hits.get(name, 0) + 1
            args, kwargs = _map(args, cast), {k: _map(v, cast) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def cuda_autocast_policy():
    """Within the block, CUDA autocast's fp32 and promote lists apply under CPU autocast.
    Yields a dict counting the calls that were cast, per op name."""
    hits: dict[str, int] = {}
    saved = []
    try:
        for ns in _NAMESPACES:
            for name in FP32_OPS | PROMOTE_OPS:
                fn = ns.__dict__.get(name) if isinstance(ns, type) else getattr(ns, name, None)
                if fn is None or not callable(fn):
                    continue
                saved.append((ns, name, fn))
                setattr(ns, name, _wrap(fn, name, hits))
        yield hits
    finally:
        for ns, name, fn in reversed(saved):
            setattr(ns, name, fn)
