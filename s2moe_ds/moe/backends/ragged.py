"""Ragged expert parallelism: no capacity, no padding, variable-size all-to-all.

Shape suffixes: T tokens, D model width, E experts (global), L experts on this rank, P expert-parallel
ranks, N routed slots sent by this rank, R slots received by it.

The scheme MegaBlocks uses for its dropless expert parallelism, here over DeepSpeed's process groups and
with DeepSpeed owning the expert weights:

1. sort this rank's routed slots by global expert; experts ``p*L .. p*L+L-1`` live on rank ``p``, so the
   sorted rows are already grouped by destination rank;
2. exchange the per-expert slot counts (one small all-to-all), then the rows themselves with one
   all-to-all whose split sizes are those counts: every rank sends exactly its routed rows;
3. regroup the received rows (ordered by source rank, then local expert) by local expert and run the
   local experts (``compute(rows, counts_L)``: a loop, ``torch._grouped_mm`` or MegaBlocks' grouped GEMM);
4. undo 3 and 2 (the reverse all-to-all), weight each slot and sum into its token's row.

Nothing is dropped whatever the load, and ranks with different token counts (or none) simply send and
receive different amounts. Autograd runs the same exchanges backwards. The price against DeepSpeed's
padded ``dropless`` mode is the count exchange, a host synchronisation before the row exchange.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .local import Sorted


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


def ragged_moe(
    x_TD: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    num_out: int,
    num_experts: int,
    group,
    compute: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """``sum_k weights[t, k] * expert[ids[t, k]](x[t])``, folded into ``num_out`` rows (see
    ``ExpertBackend.forward``), with the experts sharded over ``group`` (None: all local)."""
    P = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    s = Sorted(ids_TK, num_experts)
    xs_ND = x_TD[s.token]
    if P == 1:
        ys_ND = compute(xs_ND, s.counts)
    else:
        with torch.no_grad():
            recv_PL = exchange_counts(s.counts, group, P)
            send = s.counts.view(P, -1).sum(1).tolist()
            recv = recv_PL.sum(1).tolist()
            L = recv_PL.shape[1]
            local_R = torch.arange(L, device=x_TD.device).repeat(P).repeat_interleave(recv_PL.reshape(-1))
            by_expert = local_R.argsort(stable=True)  # received rows regrouped by local expert
            back = torch.empty_like(by_expert)
            back[by_expert] = torch.arange(len(by_expert), device=x_TD.device)
        xr_RD = AllToAllV.apply(xs_ND, recv, send, group)
        yr_RD = compute(xr_RD[by_expert], recv_PL.sum(0))[back]
        ys_ND = AllToAllV.apply(yr_RD, send, recv, group)
    ys_ND = ys_ND * weights_TK.reshape(-1)[s.order].to(ys_ND.dtype).unsqueeze(-1)
    dest_N = s.token % num_out if num_out != x_TD.shape[0] else s.token
    return x_TD.new_zeros(num_out, x_TD.shape[1]).index_add(0, dest_N, ys_ND)


def ffn_megablocks_gmm(xs_ND: Tensor, counts_E: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None = None) -> Tensor:
    """Expert FFNs on expert-sorted rows with ``grouped_gemm.ops.gmm``, the grouped GEMM MegaBlocks'
    dropless MLP runs in ``mlp_impl='grouped'`` (CUDA, bf16). Stacked ``[E, in, out]`` weights."""
    from grouped_gemm import ops as gg

    sizes = counts_E.to("cpu", torch.int64)
    h = gg.gmm(xs_ND, w1, sizes)
    h = torch.nn.functional.gelu(h) if w3 is None else torch.nn.functional.silu(h) * gg.gmm(xs_ND, w3, sizes)
    return gg.gmm(h, w2, sizes)
