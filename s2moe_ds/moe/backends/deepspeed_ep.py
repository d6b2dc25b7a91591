"""Expert parallelism on DeepSpeed's native MoE: our routing, DeepSpeed's all-to-all and bookkeeping.

Shape suffixes: T tokens, D model width, E experts, K routed slots per token, C capacity per expert.

The backend *is* a ``deepspeed.moe.layer.MoE`` (the only thing the engine recognises): so the engine
creates the ``ep_size_{N}`` groups, reduces expert gradients over the expert-data-parallel group, puts
expert parameters in their own ZeRO groups, and writes one checkpoint file per global expert. What we
change is the gate: DeepSpeed's ``MOELayer`` calls ``gate(tokens, used_token, sparse_routes, use_tutel)``
and expects the 0.19.4+ 7-tuple ``(l_aux, C, E, indices[K,T], locations[K,T], gates[K,T], exp_counts[E])``.
``RoutedGate`` builds that tuple from the decision our router already made (any router, S2MoE's
concatenated pathways included), so the layer pays exactly one dispatch and one combine all-to-all.

Capacity is agreed across the expert-parallel group before the all-to-all (an all-reduce of the max),
so ranks that see different token counts exchange equal-sized buffers instead of hanging:
- ``dropless`` (default): C = the largest per-expert slot count on any rank; nothing is dropped
  (buffers are padded to C, DeepSpeed's layout);
- ``capacity``: C = max(min_capacity, ceil(capacity_factor * K * T_max / E)) with T_max the largest
  token count in the group; slots beyond C are dropped (their combine weight becomes 0), first choices
  before second choices;
- ``ragged``: no capacity and no padding: the rows themselves travel in a variable-size all-to-all and
  the local experts run on exactly the rows they receive (``ragged.py``, the scheme MegaBlocks uses);
  DeepSpeed's ``MOELayer`` is bypassed, its groups, gradient reduction and checkpoint files are not.
  ``kernel`` picks the local expert computation: ``loop`` (CPU default), ``grouped_mm`` (CUDA default,
  ``torch._grouped_mm``) or ``megablocks`` (MegaBlocks' grouped GEMM, the ``megablocks`` backend).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ExpertSpec, draw_base_seed, init_expert
from .local import ffn_grouped_mm, ffn_loop, fold_rows
from .ragged import ffn_megablocks_gmm, ragged_moe


class ExpertFFN(nn.Module):
    """One expert: 2-layer FFN (GELU) or SwiGLU. DeepSpeed deep-copies it once per local expert."""

    def __init__(self, spec: ExpertSpec):
        super().__init__()
        D, Fh = spec.d_model, spec.d_ff
        # values come from init_expert (per global expert); allocate without touching the global RNG
        self.w1 = nn.Parameter(torch.empty(D, Fh))
        self.w2 = nn.Parameter(torch.empty(Fh, D))
        self.w3 = nn.Parameter(torch.empty(D, Fh)) if spec.activation == "swiglu" else None

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.w1
        h = F.gelu(h) if self.w3 is None else F.silu(h) * (x @ self.w3)
        return h @ self.w2


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


def _moe_base():
    from deepspeed.moe.layer import MoE

    return MoE


class DeepSpeedEPBackend(_moe_base()):
    """A ``deepspeed.moe.layer.MoE`` whose gate is driven by our router (see the module docstring)."""

    def __init__(
        self,
        spec: ExpertSpec,
        ep_size: int = 1,
        mode: str = "dropless",
        capacity_factor: float = 1.25,
        min_capacity: int = 4,
        kernel: str = "auto",
    ):
        """``mode`` and ``kernel``: see the module docstring; the options are checked with the config
        (``backends/config.py``), not here."""
        base = draw_base_seed()
        rng = torch.get_rng_state()  # DeepSpeed builds a TopKGate we replace: keep the global stream as local's
        super().__init__(
            hidden_size=spec.d_model,
            expert=ExpertFFN(spec),
            num_experts=spec.num_experts,
            ep_size=ep_size,
            k=1,
            drop_tokens=mode == "capacity",
        )
        torch.set_rng_state(rng)
        self.spec = spec
        self.mode = mode
        self.kernel = kernel
        self.deepspeed_moe.gate = RoutedGate(spec.num_experts, mode, capacity_factor, min_capacity)
        # DeepSpeed deep-copies one expert: give each global expert its own initial weights instead.
        # DeepSpeed's expert-parallel rank is rank % ep_size (checked in set_deepspeed_parallelism).
        self._assumed_ep_rank = dist.get_rank() % ep_size if dist.is_initialized() else 0
        for j, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            init = init_expert(spec, base, self._assumed_ep_rank * self.num_local_experts + j)
            with torch.no_grad():
                for name, value in init.items():
                    getattr(expert, name).copy_(value)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        actual = dist.get_rank(self.deepspeed_moe.ep_group) if dist.is_initialized() else 0
        if actual != self._assumed_ep_rank:
            raise RuntimeError(
                f"expert-parallel rank {actual} differs from the {self._assumed_ep_rank} assumed when "
                f"initialising the experts (use_data_before_expert_parallel is not supported)"
            )

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, num_out: int | None = None) -> Tensor:
        if self.ep_size > 1 and self.deepspeed_moe.ep_group is None:
            raise RuntimeError(
                "expert-parallel groups are not set up: wrap the model with deepspeed.initialize "
                "(or call set_deepspeed_parallelism()) before the first forward"
            )
        if self.mode == "ragged":
            group = self.deepspeed_moe.ep_group if self.ep_size > 1 else None
            return ragged_moe(
                x_TD, ids_TK, weights_TK, num_out or x_TD.shape[0], self.num_experts, group, self.local_experts_compute
            )
        self.deepspeed_moe.gate.set_routing(ids_TK, weights_TK, num_out)
        y_TD = self.deepspeed_moe(x_TD, None)
        return fold_rows(y_TD, num_out or x_TD.shape[0])

    def resolved_kernel(self, device: torch.device) -> str:
        if self.kernel != "auto":
            return self.kernel
        return "grouped_mm" if device.type == "cuda" else "loop"

    def local_experts_compute(self, xs_ND: Tensor, counts_L: Tensor) -> Tensor:
        """This rank's experts on rows sorted by local expert (``counts_L`` rows each)."""
        experts = self.deepspeed_moe.experts.deepspeed_experts
        w1 = [e.w1 for e in experts]
        w2 = [e.w2 for e in experts]
        w3 = [e.w3 for e in experts] if self.spec.activation == "swiglu" else None
        kernel = self.resolved_kernel(xs_ND.device)
        if kernel == "loop":
            return ffn_loop(xs_ND, counts_L, w1, w2, w3)
        # the grouped kernels take stacked [L, in, out] weights: one copy per call, gradients flow back
        stacked = [torch.stack(w) if w is not None else None for w in (w1, w2, w3)]
        if kernel == "grouped_mm":
            return ffn_grouped_mm(xs_ND, counts_L, *stacked)
        return ffn_megablocks_gmm(xs_ND, counts_L, *stacked)

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token in one dispatch: token t is replicated once per expert."""
        T, E = x_TD.shape[0], self.num_experts
        x_rep = x_TD.repeat(E, 1)
        ids = torch.arange(E, device=x_TD.device).repeat_interleave(T).unsqueeze(-1)
        y = self.forward(x_rep, ids, torch.ones_like(ids, dtype=x_TD.dtype))
        return y.view(E, T, x_TD.shape[1]).transpose(0, 1)

    def params_per_expert(self) -> int:
        return sum(p.numel() for p in self.deepspeed_moe.experts.deepspeed_experts[0].parameters())

    def dropped_slots(self) -> int | None:
        """Routed slots the last dispatch dropped (capacity mode, this rank); None in dropless modes."""
        return self.deepspeed_moe.gate.dropped if self.mode == "capacity" else None

    def local_expert_ids(self) -> range:
        rank = dist.get_rank(self.deepspeed_moe.ep_group) if self.deepspeed_moe.ep_group is not None else 0
        n = self.num_local_experts
        return range(rank * n, (rank + 1) * n)
