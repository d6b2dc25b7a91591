"""Ragged expert parallelism: no capacity, no padding, variable-size all-to-all.

Shape suffixes: T tokens, D model width, E experts (global), L experts on this rank, P expert-parallel
ranks, N routed slots sent by this rank, R slots received by it.

The scheme MegaBlocks uses for its dropless expert parallelism, here over DeepSpeed's process groups and
with DeepSpeed owning the expert weights:

1. sort this rank's routed slots by global expert; experts ``p*L .. p*L+L-1`` live on rank ``p``, so the
   sorted rows are already grouped by destination rank;
2. exchange the per-expert slot counts (one small all-to-all), then the rows themselves with one
   all-to-all whose split sizes are those counts: every rank sends exactly its routed rows;
3. regroup the received rows (ordered by source rank, then local expert) by local expert; the local
   experts run on them (``kernels.py``);
4. ``combine`` undoes 3 and 2 (the reverse all-to-all), weights each slot and sums it into its token's row.

Nothing is dropped whatever the load, and ranks with different token counts (or none) simply send and
receive different amounts. Autograd runs the same exchanges backwards. The price against DeepSpeed's
padded ``dropless`` mode is the count exchange, a host synchronisation before the row exchange.
With one rank (no group) it is the local dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .local import LocalDispatcher, Sorted


def _comm():
    """DeepSpeed's comm when it is initialised (its comms logger then sees these exchanges), else torch's."""
    try:
        import deepspeed.comm as dcomm

        if dcomm.is_initialized():
            return dcomm
    except ImportError:
        pass
    return dist


class AllToAllV(torch.autograd.Function):
    """Rows of ``x`` split by ``send`` go to each rank; ``recv`` rows come back from each. Backward swaps."""

    @staticmethod
    def forward(ctx, x: Tensor, recv: list, send: list, group) -> Tensor:
        ctx.splits = (recv, send, group)
        out = x.new_empty(sum(recv), *x.shape[1:])
        _comm().all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        recv, send, group = ctx.splits
        return AllToAllV.apply(grad.contiguous(), send, recv, group), None, None, None


def exchange_counts(counts_E: Tensor, group, ep_size: int) -> Tensor:
    """``received[p, j]``: slots rank ``p`` sends to this rank's local expert ``j``."""
    received = torch.empty_like(counts_E)
    _comm().all_to_all_single(received, counts_E.contiguous(), group=group)
    return received.view(ep_size, -1)


@dataclass
class Exchange:
    """What ``combine`` needs to send the rows back: the local sort and the all-to-all bookkeeping."""

    local: Sorted
    send: list
    recv: list
    by_expert: Tensor
    back: Tensor


class RaggedDispatcher(LocalDispatcher):
    def __init__(self, num_experts: int, group=None):
        super().__init__(num_experts)
        self.group = group
        self.ep_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1

    def dispatch(self, x_TD: Tensor, ids_TK: Tensor):
        xs_ND, counts_E, s = super().dispatch(x_TD, ids_TK)
        if self.ep_size == 1:
            return xs_ND, counts_E, s
        P = self.ep_size
        with torch.no_grad():
            recv_PL = exchange_counts(counts_E, self.group, P)
            send = counts_E.view(P, -1).sum(1).tolist()
            recv = recv_PL.sum(1).tolist()
            L = recv_PL.shape[1]
            local_R = torch.arange(L, device=x_TD.device).repeat(P).repeat_interleave(recv_PL.reshape(-1))
            by_expert = local_R.argsort(stable=True)  # received rows regrouped by local expert
            back = torch.empty_like(by_expert)
            back[by_expert] = torch.arange(len(by_expert), device=x_TD.device)
        xr_RD = AllToAllV.apply(xs_ND, recv, send, self.group)
        return xr_RD[by_expert], recv_PL.sum(0), Exchange(s, send, recv, by_expert, back)

    def combine(self, ys_ND: Tensor, weights_TK: Tensor, plan, num_out: int) -> Tensor:
        if isinstance(plan, Exchange):
            ys_ND = AllToAllV.apply(ys_ND[plan.back], plan.send, plan.recv, self.group)
            plan = plan.local
        return super().combine(ys_ND, weights_TK, plan, num_out)
