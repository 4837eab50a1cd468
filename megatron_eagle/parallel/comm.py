"""Collectives for context parallelism: differentiable all-to-all, ring P2P, gather/scatter, loss.

All work on NCCL (GPU) and gloo (CPU tests) alike; ``group`` is a torch process group and
ranks inside it are group ranks unless a name says ``global``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class _AllToAllRows(torch.autograd.Function):
    """Rows of ``x`` (dim 0) are sent in consecutive blocks of ``send[j]`` rows to rank j;
    the result holds ``recv[i]`` rows from rank i, in rank order. Backward runs it in reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _a2a(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _a2a(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _a2a(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
    inner = x.shape[1:]
    width = 1
    for s in inner:
        width *= int(s)
    out = x.new_empty((sum(recv), *inner))
    if width == 0:  # same on every rank; a rank with nothing to send or receive must still take part
        return out
    dist.all_to_all_single(out.view(-1), x.contiguous().view(-1), [r * width for r in recv],
                           [s * width for s in send], group=group)
    return out


def all_to_all_rows(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all along dim 0 (see :class:`_AllToAllRows`)."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAllRows.apply(x, list(map(int, send)), list(map(int, recv)), group)


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate equal-sized ``x`` of every rank along dim 0 (rank order). Not differentiable."""
    n = dist.get_world_size(group)
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's block of ``len(x)/world`` rows. Not differentiable."""
    n = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class RingExchange:
    """Send a tensor to the next rank of a ring and receive the previous rank's, asynchronously
    (compute on the current tensor while the next one is in flight)."""

    def __init__(self, group, global_ranks: Sequence[int], rank: int, tag: int = 0):
        self.group, self.tag = group, tag
        n = len(global_ranks)
        self.next_rank = global_ranks[(rank + 1) % n]
        self.prev_rank = global_ranks[(rank - 1) % n]
        self._reqs: list = []

    def start(self, tensor: torch.Tensor) -> torch.Tensor:
        buf = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor.contiguous(), self.next_rank, self.group, self.tag),
               dist.P2POp(dist.irecv, buf, self.prev_rank, self.group, self.tag)]
        self._reqs = dist.batch_isend_irecv(ops)
        return buf

    def wait(self) -> None:
        for r in self._reqs:
            r.wait()
        self._reqs = []


class _AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward keeps this rank's block of the incoming gradient
    (every rank computes the same function of the gathered tensor)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.n = group, x.shape[0]
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r = dist.get_rank(ctx.group)
        return grad[r * ctx.n:(r + 1) * ctx.n].contiguous(), None


def gather_rows_replicated(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGatherRows.apply(x, group)


class _ReduceLoss(torch.autograd.Function):
    """Value: Σ over the CP group; gradient: 1 to this rank's own term (identity backward).

    With megatron's schedule (loss × cp) and DDP (grads ÷ dp·cp summed over DP×CP) the
    parameter gradients then equal those of the un-split pack, and the reported loss is
    the whole pack's loss on every CP rank."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, group) -> torch.Tensor:
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def reduce_loss(loss: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return loss
    return _ReduceLoss.apply(loss, group)
