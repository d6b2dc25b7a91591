"""Local dropless expert computation: every routed slot is computed, none dropped.

Implementations (all numerically the same; ``benchmarks/bench_moe_layer.py`` measures them, results in
docs/benchmarks.md):
- ``reference``: each expert on every token, masked by the routing; the plain definition tests compare to.
- ``loop``: sort slots by expert, one matmul pair per non-empty expert (the CPU default).
- ``grouped_mm``: sorted slots through ``torch._grouped_mm`` (one kernel per matrix on CUDA).
- ``padded_bmm``: sorted slots scattered into an ``[E, C_max, D]`` buffer and batched matmul.
``auto`` picks ``loop`` on CPU and ``grouped_mm`` on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ExpertBackend, ExpertSpec

IMPLS = ("auto", "reference", "loop", "grouped_mm", "padded_bmm")


def fold_rows(y_ND: Tensor, num_out: int) -> Tensor:
    """Sum rows ``n`` and ``n + num_out`` (and ``n + 2 num_out`` ...) into row ``n``."""
    if num_out == y_ND.shape[0]:
        return y_ND
    return y_ND.view(-1, num_out, y_ND.shape[-1]).sum(0)


def ffn_loop(xs_ND: Tensor, counts_E: Tensor, w1, w2, w3=None) -> Tensor:
    """Expert FFNs on expert-sorted rows, one matmul pair per non-empty expert.
    ``w1``/``w2``/``w3``: per-expert ``[in, out]`` matrices (a stacked tensor's ``unbind(0)`` or a list).
    Experts that receive no rows still join the graph with a zero term, so every expert parameter gets
    a (zero) gradient: DeepSpeed's per-expert parameters must all have one on every rank."""
    outs, unused = [], []
    for e, c in enumerate(xs_ND.split(counts_E.tolist())):
        if c.shape[0] == 0:
            unused.append(e)
            continue
        h = c @ w1[e]
        h = F.gelu(h) if w3 is None else F.silu(h) * (c @ w3[e])
        outs.append(h @ w2[e])
    y = torch.cat(outs) if outs else xs_ND.new_zeros(0, w2[0].shape[1])
    if unused and torch.is_grad_enabled():
        mats = (w1, w2) if w3 is None else (w1, w2, w3)
        y = y + 0.0 * sum(m[e].sum() for e in unused for m in mats)
    return y


def ffn_grouped_mm(xs_ND: Tensor, counts_E: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None = None) -> Tensor:
    """Expert FFNs on expert-sorted rows through ``torch._grouped_mm`` (stacked ``[E, in, out]`` weights)."""
    offs = counts_E.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(xs_ND, w1, offs=offs)
    h = F.gelu(h) if w3 is None else F.silu(h) * torch._grouped_mm(xs_ND, w3, offs=offs)
    return torch._grouped_mm(h, w2, offs=offs)


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
        self.impl = impl

    def resolved_impl(self, device: torch.device) -> str:
        if self.impl != "auto":
            return self.impl
        return "grouped_mm" if device.type == "cuda" else "loop"

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, num_out: int | None = None) -> Tensor:
        impl = self.resolved_impl(x_TD.device)
        weights_TK = weights_TK.to(x_TD.dtype)
        num_out = num_out or x_TD.shape[0]
        if impl == "reference":
            return fold_rows(self._reference(x_TD, ids_TK, weights_TK), num_out)
        s = Sorted(ids_TK, self.spec.num_experts)
        xs_ND = x_TD[s.token]
        w_N1 = weights_TK.reshape(-1)[s.order].unsqueeze(-1)
        dest_N = s.token % num_out if num_out != x_TD.shape[0] else s.token
        if impl == "loop" and not torch.is_grad_enabled():
            return self._loop_inference(xs_ND, s.counts, w_N1, dest_N, num_out, one_slot=ids_TK.shape[1] == 1)
        ys_ND = getattr(self, f"_{impl}")(xs_ND, s.counts) * w_N1
        return x_TD.new_zeros(num_out, x_TD.shape[1]).index_add(0, dest_N, ys_ND)

    def _reference(self, x_TD, ids_TK, weights_TK):
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.spec.num_experts):
            gate_T = (weights_TK * (ids_TK == e)).sum(-1)
            y_TD = y_TD + gate_T.unsqueeze(-1) * self.expert(x_TD, e)
        return y_TD

    def _loop(self, xs_ND, counts_E):
        # unbind once: indexing w[e] per expert would make autograd build (and sum) a full-size
        # zero gradient per expert, which cost ~20% of a training step on CPU.
        w3 = self.w3.unbind(0) if self.w3 is not None else None
        return ffn_loop(xs_ND, counts_E, self.w1.unbind(0), self.w2.unbind(0), w3)

    @torch.no_grad()
    def _loop_inference(self, xs_ND, counts_E, w_N1, dest_N, num_out, one_slot):
        """The loop without autograd: matmuls write into preallocated buffers (no per-expert
        allocation, no concatenation), activation and weighting in place, and with one slot per
        token the combine is a permutation (index_copy) instead of a zero-fill plus index_add."""
        ys_ND = torch.empty_like(xs_ND)
        hidden = xs_ND.new_empty(int(counts_E.max()) if len(xs_ND) else 0, self.spec.d_ff)
        gate = xs_ND.new_empty(hidden.shape) if self.w3 is not None else None
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            c, h = xs_ND[start : start + n], hidden[:n]
            torch.mm(c, self.w1[e], out=h)
            if gate is None:
                torch.ops.aten.gelu_(h)
            else:
                torch.mm(c, self.w3[e], out=gate[:n])
                F.silu(h, inplace=True).mul_(gate[:n])
            torch.mm(h, self.w2[e], out=ys_ND[start : start + n])
            start += n
        ys_ND.mul_(w_N1)
        if one_slot and num_out == len(xs_ND):
            return torch.empty_like(ys_ND).index_copy_(0, dest_N, ys_ND)
        return ys_ND.new_zeros(num_out, ys_ND.shape[1]).index_add_(0, dest_N, ys_ND)

    def _grouped_mm(self, xs_ND, counts_E):
        return ffn_grouped_mm(xs_ND, counts_E, self.w1, self.w2, self.w3)

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
