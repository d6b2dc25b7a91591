"""DeepSpeed's padded/capacity dispatch, fed our routing: the gate ``MOELayer`` calls.

Shape suffixes: T tokens, D model width, E experts, K routed slots per token, C capacity per expert.

DeepSpeed's ``MOELayer`` calls ``gate(tokens, used_token, sparse_routes, use_tutel)`` and expects the 0.19.4+
7-tuple ``(l_aux, C, E, indices[K,T], locations[K,T], gates[K,T], exp_counts[E])``, then dispatches into
``[E, C, D]`` buffers, all-to-alls them and combines with einsums. ``RoutedGate`` builds that tuple from the
decision our router already made (any router, S2MoE's concatenated pathways included), so a layer pays
exactly one dispatch and one combine all-to-all. Capacity is agreed across the expert-parallel group before
the all-to-all (an all-reduce of the max), so ranks that see different token counts exchange equal-sized
buffers instead of hanging:
- ``dropless``: C = the largest per-expert slot count on any rank; nothing is dropped (padded to C);
- ``capacity``: C = max(min_capacity, ceil(capacity_factor * K * T_max / E)) with T_max the largest token
  count in the group; slots beyond C are dropped (combine weight 0), first choices before second choices.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


def slot_locations(ids_KT: Tensor, num_experts: int, num_out: int | None = None) -> tuple[Tensor, Tensor]:
    """Position of each slot in its expert's buffer, filling first choices (k=0) first; and the counts.

    With ``num_out`` < T, rows ``t`` and ``t + num_out`` are pathways of one token (S2MoE's ``[x; x_hat]``):
    within each choice they take buffer places alternately (token 0 clean, token 0 noisy, token 1 clean,
    ...), so an overflowing expert drops both pathways alike instead of the noisy one first."""
    T = ids_KT.shape[1]
    if num_out is not None and num_out < T:
        perm = torch.arange(T, device=ids_KT.device).view(T // num_out, num_out).t().reshape(-1)
        loc_perm, counts_E = slot_locations(ids_KT[:, perm], num_experts)
        loc = torch.empty_like(loc_perm)
        loc[:, perm] = loc_perm
        return loc, counts_E
    flat = ids_KT.reshape(-1)
    order = flat.argsort(stable=True)
    counts_E = torch.bincount(flat, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    loc = torch.empty_like(flat)
    loc[order] = torch.arange(flat.numel(), device=flat.device) - starts_E[flat[order]]
    return loc.view_as(ids_KT), counts_E


class RoutedGate(nn.Module):
    """DeepSpeed gate contract (7-tuple) fed by a routing decision set just before the call."""

    def __init__(self, num_experts: int, mode: str, capacity_factor: float, min_capacity: int):
        super().__init__()
        self.num_experts = num_experts
        self.mode = mode
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.ep_group = None
        self._routing: tuple[Tensor, Tensor, int | None] | None = None
        self.dropped = 0

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def set_routing(self, ids_TK: Tensor, weights_TK: Tensor, num_out: int | None = None) -> None:
        self._routing = (ids_TK, weights_TK, num_out)

    def _group_max(self, value: int, device) -> int:
        if self.ep_group is None or not dist.is_initialized() or dist.get_world_size(self.ep_group) == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ep_group)
        return int(t)

    def forward(self, tokens_TD: Tensor, used_token=None, sparse_routes=True, use_tutel=False):
        if self._routing is None:
            raise RuntimeError("RoutedGate called without a routing decision; call the backend, not its MOELayer")
        ids_TK, weights_TK, num_out = self._routing
        self._routing = None
        T, K = ids_TK.shape
        ids_KT = ids_TK.t().contiguous()
        loc_KT, counts_E = slot_locations(ids_KT, self.num_experts, num_out)
        if self.mode == "dropless":
            capacity = self._group_max(int(counts_E.max()) if T else 0, tokens_TD.device)
        else:
            t_max = self._group_max(T, tokens_TD.device)
            capacity = max(self.min_capacity, math.ceil(self.capacity_factor * K * t_max / self.num_experts))
        capacity = max(capacity, 1)
        keep = loc_KT < capacity
        self.dropped = int((~keep).sum())
        indices = torch.where(keep, ids_KT, torch.full_like(ids_KT, -1)).to(torch.int32)
        gates = weights_TK.t().float() * keep
        l_aux = tokens_TD.new_zeros(())  # our router computes its own losses
        return l_aux, capacity, self.num_experts, indices, loc_KT.to(torch.int32), gates, counts_E
