"""Local dispatch: sort routed slots by expert, gather their rows; weight and scatter-add them back.

Shape suffixes: T tokens, D model width, K routed slots per token, E experts, N routed slots (T*K).

``num_out`` (a divisor of T, default T) folds row ``t`` of the result into row ``t % num_out``: S2MoE
routes ``[x; x_hat]`` once and, with the gate folded into the weights, gets ``g f(x) + (1 - g) f(x_hat)``
straight from the combine, with no 2T-row intermediate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def fold_rows(y_ND: Tensor, num_out: int) -> Tensor:
    """Sum rows ``n`` and ``n + num_out`` (and ``n + 2 num_out`` ...) into row ``n``."""
    if num_out == y_ND.shape[0]:
        return y_ND
    return y_ND.view(-1, num_out, y_ND.shape[-1]).sum(0)


class Sorted:
    """Routed slots grouped by expert: the permutation, source token of each slot, per-expert counts."""

    def __init__(self, ids_TK: Tensor, num_experts: int):
        flat = ids_TK.reshape(-1)
        self.order = flat.argsort(stable=True)
        self.token = self.order // ids_TK.shape[1]
        self.counts = torch.bincount(flat, minlength=num_experts)
        self.num_tokens = ids_TK.shape[0]

    def destinations(self, num_out: int) -> Tensor:
        return self.token % num_out if num_out != self.num_tokens else self.token


class LocalDispatcher:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: Tensor, ids_TK: Tensor) -> tuple[Tensor, Tensor, Sorted]:
        s = Sorted(ids_TK, self.num_experts)
        return x_TD[s.token], s.counts, s

    def combine(self, ys_ND: Tensor, weights_TK: Tensor, plan: Sorted, num_out: int) -> Tensor:
        ys_ND = ys_ND * weights_TK.reshape(-1)[plan.order].to(ys_ND.dtype).unsqueeze(-1)
        return ys_ND.new_zeros(num_out, ys_ND.shape[1]).index_add(0, plan.destinations(num_out), ys_ND)


def routed(
    dispatcher: LocalDispatcher,
    compute: Callable[[Tensor, Tensor], Tensor],
    x_TD: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    num_out: int | None = None,
) -> Tensor:
    """``sum_k weights[t, k] * expert[ids[t, k]](x[t])`` folded into ``num_out`` rows: dispatch, the
    experts' ``compute(rows, counts)``, combine."""
    rows_ND, counts_E, plan = dispatcher.dispatch(x_TD, ids_TK)
    return dispatcher.combine(compute(rows_ND, counts_E), weights_TK, plan, num_out or x_TD.shape[0])
