"""Differentiable communication for a partition group: halo exchange and replicated sums.

:func:`halo_exchange` turns a part's owned node features ``[n_owned, ...]`` into its local node
features ``[n_owned + n_halo, ...]`` by receiving the halo rows from their owners with one
``all_to_all_single`` (uneven splits; works on gloo and NCCL). Its backward is the adjoint: the
gradients of the halo rows travel back to the owners with the reverse ``all_to_all`` and are
*added* (``index_select``'s backward is ``index_add``) into the owners' gradients of the rows they
sent — a row sent to several parts collects the sum of all their gradients. The backward is
itself differentiable, so forces with ``create_graph=True`` and their double backward work.

:func:`sum_replicated` is an all-reduce (sum) whose backward is the identity. It is used where
the result is *replicated*: every rank goes on to compute the same function of it (the energy,
the forces), so the loss is one quantity held by every rank, not P copies to be added. With this
convention, each rank's backward covers exactly the computations it did itself, and summing the
ranks' gradients (parameters, positions) gives the single-process gradient exactly once.

All collectives run in the same order on every rank of the group (parts with no atoms included),
which the partitioned model guarantees by running the same stages on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .partition import LocalPart

__all__ = ["HaloExchange", "halo_exchange", "sum_replicated", "SumReplicated"]


class HaloExchange(torch.autograd.Function):
    """``all_to_all_single`` of rows with uneven splits; backward = the reverse exchange.

    ``forward(send [S, ...], send_counts, recv_counts, group) -> recv [R, ...]``.
    """

    @staticmethod
    def forward(ctx, send, send_counts, recv_counts, group):  # noqa: D102
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        send = send.contiguous()
        recv = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
        dist.all_to_all_single(
            recv, send, output_split_sizes=list(recv_counts),
            input_split_sizes=list(send_counts), group=group,
        )
        return recv

    @staticmethod
    def backward(ctx, grad_recv):  # noqa: D102
        grad_send = HaloExchange.apply(
            grad_recv.contiguous(), ctx.recv_counts, ctx.send_counts, ctx.group
        )
        return grad_send, None, None, None


def halo_exchange(x_owned: torch.Tensor, part: LocalPart, group=None) -> torch.Tensor:
    """Local node features ``[n_owned + n_halo, ...]`` from owned features ``[n_owned, ...]``.

    Every rank of ``group`` must call it (with its own ``part``), in the same order.
    """
    if x_owned.shape[0] != part.num_owned:
        raise ValueError(
            f"part {part.part}: expected {part.num_owned} owned rows, got {x_owned.shape[0]}"
        )
    if part.num_parts == 1:
        return x_owned
    send = x_owned.index_select(0, part.send_index)  # [S, ...]; backward adds into owners
    recv = HaloExchange.apply(send, part.send_counts, part.recv_counts, group)  # [n_halo, ...]
    return torch.cat([x_owned, recv], dim=0)


class SumReplicated(torch.autograd.Function):
    """All-reduce (sum) over ``group`` with identity backward (result replicated on all ranks)."""

    @staticmethod
    def forward(ctx, x, group):  # noqa: D102
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def sum_replicated(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``; see the module docstring for the gradient."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    return SumReplicated.apply(x, group)
