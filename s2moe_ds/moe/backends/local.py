"""Local dropless expert computation: every routed slot is computed, none dropped.

Implementations (all numerically the same; ``benchmarks/bench_expert_impls.py`` measures them):
- ``reference``: each expert on every token, masked by the routing; the plain definition tests compare to.
- ``loop``: sort slots by expert, one matmul pair per non-empty expert (fastest on these CPUs).
- ``grouped_mm``: sorted slots through ``torch._grouped_mm`` (one kernel per matrix on CUDA).
- ``padded_bmm``: sorted slots scattered into an ``[E, C_max, D]`` buffer and batched matmul.
``auto`` picks ``loop`` on CPU and ``grouped_mm`` on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...configtools import check_choice
from .base import ExpertBackend, ExpertSpec

IMPLS = ("auto", "reference", "loop", "grouped_mm", "padded_bmm")


class Sorted:
    """Routed slots grouped by expert: the permutation, source token of each slot, per-expert counts."""

    def __init__(self, ids_TK: Tensor, num_experts: int):
        flat = ids_TK.reshape(-1)
        self.order = flat.argsort(stable=True)
        self.token = self.order // ids_TK.shape[1]
        self.counts = torch.bincount(flat, minlength=num_experts)


class LocalDroplessBackend(ExpertBackend):
    def __init__(self, spec: ExpertSpec, impl: str = "auto"):
        super().__init__(spec)
        check_choice("moe.backend_impl", impl, IMPLS)
        self.impl = impl

    def resolved_impl(self, device: torch.device) -> str:
        if self.impl != "auto":
            return self.impl
        return "grouped_mm" if device.type == "cuda" else "loop"

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        impl = self.resolved_impl(x_TD.device)
        weights_TK = weights_TK.to(x_TD.dtype)
        if impl == "reference":
            return self._reference(x_TD, ids_TK, weights_TK)
        s = Sorted(ids_TK, self.spec.num_experts)
        xs_ND = x_TD[s.token]
        ys_ND = getattr(self, f"_{impl}")(xs_ND, s.counts)
        ys_ND = ys_ND * weights_TK.reshape(-1)[s.order].unsqueeze(-1)
        return torch.zeros_like(x_TD).index_add(0, s.token, ys_ND)

    def _reference(self, x_TD, ids_TK, weights_TK):
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.spec.num_experts):
            gate_T = (weights_TK * (ids_TK == e)).sum(-1)
            y_TD = y_TD + gate_T.unsqueeze(-1) * self.expert(x_TD, e)
        return y_TD

    def _loop(self, xs_ND, counts_E):
        chunks = xs_ND.split(counts_E.tolist())
        return torch.cat([self.expert(c, e) for e, c in enumerate(chunks) if c.shape[0] > 0])

    def _grouped_mm(self, xs_ND, counts_E):
        offs = counts_E.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs_ND, self.w1, offs=offs)
        if self.w3 is None:
            h = F.gelu(h)
        else:
            h = F.silu(h) * torch._grouped_mm(xs_ND, self.w3, offs=offs)
        return torch._grouped_mm(h, self.w2, offs=offs)

    def _padded_bmm(self, xs_ND, counts_E):
        E, cap = self.spec.num_experts, int(counts_E.max())
        starts = counts_E.cumsum(0) - counts_E
        expert_N = torch.repeat_interleave(torch.arange(E, device=xs_ND.device), counts_E)
        slot_N = expert_N * cap + torch.arange(xs_ND.shape[0], device=xs_ND.device) - starts[expert_N]
        buf = xs_ND.new_zeros(E * cap, xs_ND.shape[1]).index_copy(0, slot_N, xs_ND).view(E, cap, -1)
        h = torch.bmm(buf, self.w1)
        if self.w3 is None:
            h = F.gelu(h)
        else:
            h = F.silu(h) * torch.bmm(buf, self.w3)
        return torch.bmm(h, self.w2).view(E * cap, -1)[slot_N]
