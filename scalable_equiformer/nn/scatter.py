"""Edge gather and node scatter-sum that keep only the index for backward, at any order.

``x.index_select(0, index)`` and ``zeros.index_add(0, index, src)`` are each other's backward, and
under ``create_graph`` (forces for the loss) that backward is recorded too. ``index_add`` saves its
whole ``source`` for backward (autograd's formula reshapes the gradient to it), so every per-edge
tensor summed into the atoms, and every per-edge gradient summed back through a gather, stayed
alive until ``loss.backward()``: 480 floats per edge twice per block in the paper's model (2.8 %
of a levers-off step). :func:`gather` and :func:`scatter_sum` compute the same values with
autograd Functions whose backward is the other Function, so each saves the index and a size,
whatever the order of differentiation.

>>> x = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)
>>> index = torch.tensor([2, 0, 2])
>>> gather(x, index).flatten().tolist()
[3.0, 1.0, 3.0]
>>> scatter_sum(torch.ones(3, 1), index, 3).flatten().tolist()
[1.0, 0.0, 2.0]
"""

from __future__ import annotations

import torch


class _Gather(torch.autograd.Function):
    """``x[index]`` along dim 0; backward: :class:`_ScatterSum` of the gradient into ``len(x)`` rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return _ScatterSum.apply(grad, index, ctx.num_rows), None


class _ScatterSum(torch.autograd.Function):
    """``out[i] = sum of src[e] over e with index[e] == i``; backward: :class:`_Gather` of the gradient."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return src.new_zeros((num_rows,) + tuple(src.shape[1:])).index_add_(0, index, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return _Gather.apply(grad, index), None, None


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [E] of ``x`` [N, ...] -> [E, ...] (``x.index_select(0, index)``)."""
    return _Gather.apply(x, index)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum rows of ``src`` [E, ...] into ``num_rows`` rows by ``index`` [E] -> [num_rows, ...].

    ``num_rows`` is used as given (no ``int()``): under a symbolic trace (``train.compile``) it is
    a symbolic size, and ``int()`` would fix the traced graph to the first molecule's atom count."""
    return _ScatterSum.apply(src, index, num_rows)
