"""The expert FFN body, written once, and the kernels that run it over expert-sorted rows.

Shape suffixes: N rows sorted by expert (``counts_E[e]`` rows for expert e, in expert order), D model
width, F expert hidden width, E experts held by the caller.

Every kernel computes ``ffn(rows of expert e, w1[e], w2[e], w3[e])`` for each expert and returns the rows
in the same order; they differ only in the matrix product they hand ``ffn`` (numerically the same; timings
in docs/benchmarks.md, ``benchmarks/bench_moe_layer.py``):
- ``loop``: one matmul pair per non-empty expert (the CPU default);
- ``grouped_mm``: ``torch._grouped_mm`` (one kernel per matrix; the CUDA default);
- ``padded_bmm``: rows scattered into an ``[E, C_max, D]`` buffer, batched matmul;
- ``gmm``: MegaBlocks' grouped GEMM (``grouped_gemm.ops.gmm``, CUDA only: the ``megablocks`` backend).
Weights are stacked ``[E, in, out]`` tensors or, for ``loop``, any per-expert sequences of ``[in, out]``
matrices (``stacked`` builds the former from the latter). ``auto`` is ``grouped_mm`` on CUDA; on CPU ``grouped_mm`` for small expert groups and ``loop`` for large
(``GROUPED_MM_MAX_ROWS``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("loop", "grouped_mm", "padded_bmm", "gmm")


def ffn(x: Tensor, w1, w2, w3=None, mm: Callable = torch.matmul) -> Tensor:
    """The expert body: ``gelu(x w1) w2``, or SwiGLU ``(silu(x w1) * x w3) w2``, with the product ``mm``."""
    h = mm(x, w1)
    h = F.gelu(h) if w3 is None else F.silu(h) * mm(x, w3)
    return mm(h, w2)


GROUPED_MM_MAX_ROWS = 512
"""``auto`` on CPU: ``grouped_mm`` while the experts average at most this many rows, ``loop`` above. Both
give the same numbers; grouped_mm saves the per-expert autograd nodes and the stacking of gradients (15%
faster at 192 rows of width 128, the experiment scale), loop's MKL products win at large groups (20% faster
at 1024 rows of width 256; ``benchmarks/bench_moe_layer.py``, docs/benchmarks.md)."""


def resolve(kernel: str, device: torch.device, rows_per_expert: float = 0.0) -> str:
    """The kernel ``auto`` stands for: ``grouped_mm`` on CUDA; on CPU by the rows per expert."""
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        return "grouped_mm"
    return "grouped_mm" if 0 < rows_per_expert <= GROUPED_MM_MAX_ROWS else "loop"


def stacked(w: Sequence[Tensor] | Tensor | None) -> Tensor | None:
    """``[E, in, out]`` from per-expert matrices (one copy; gradients flow back to each)."""
    return w if w is None or isinstance(w, Tensor) else torch.stack(list(w))


def loop(xs_ND: Tensor, counts_E: Tensor, w1, w2, w3=None) -> Tensor:
    """One matmul pair per non-empty expert. Experts that receive no rows still join the graph with a
    zero term, so every expert parameter gets a (zero) gradient: DeepSpeed's per-expert parameters must
    all have one on every rank. Stacked weights are unbound once: indexing ``w[e]`` per expert would make
    autograd build (and sum) a full-size zero gradient per expert (~20% of a CPU training step)."""
    w1, w2 = (w.unbind(0) if isinstance(w, Tensor) else w for w in (w1, w2))
    w3 = w3.unbind(0) if isinstance(w3, Tensor) else w3
    outs, unused = [], []
    for e, c in enumerate(xs_ND.split(counts_E.tolist())):
        if c.shape[0] == 0:
            unused.append(e)
            continue
        outs.append(ffn(c, w1[e], w2[e], None if w3 is None else w3[e]))
    y = torch.cat(outs) if outs else xs_ND.new_zeros(0, w2[0].shape[1])
    if unused and torch.is_grad_enabled():
        mats = (w1, w2) if w3 is None else (w1, w2, w3)
        y = y + 0.0 * sum(m[e].sum() for e in unused for m in mats)
    return y


def grouped_mm(xs_ND: Tensor, counts_E: Tensor, w1, w2, w3=None) -> Tensor:
    offs = counts_E.cumsum(0).to(torch.int32)
    return ffn(xs_ND, stacked(w1), stacked(w2), stacked(w3), mm=partial(torch._grouped_mm, offs=offs))


def padded_bmm(xs_ND: Tensor, counts_E: Tensor, w1, w2, w3=None) -> Tensor:
    E, cap = len(counts_E), int(counts_E.max())
    starts = counts_E.cumsum(0) - counts_E
    expert_N = torch.repeat_interleave(torch.arange(E, device=xs_ND.device), counts_E)
    slot_N = expert_N * cap + torch.arange(xs_ND.shape[0], device=xs_ND.device) - starts[expert_N]
    buf = xs_ND.new_zeros(E * cap, xs_ND.shape[1]).index_copy(0, slot_N, xs_ND).view(E, cap, -1)
    return ffn(buf, stacked(w1), stacked(w2), stacked(w3), mm=torch.bmm).view(E * cap, -1)[slot_N]


def gmm(xs_ND: Tensor, counts_E: Tensor, w1, w2, w3=None) -> Tensor:
    """The grouped GEMM MegaBlocks' dropless MLP runs with ``mlp_impl='grouped'`` (CUDA, bf16)."""
    from grouped_gemm import ops as gg

    sizes = counts_E.to("cpu", torch.int64)
    return ffn(xs_ND, stacked(w1), stacked(w2), stacked(w3), mm=lambda a, w: gg.gmm(a, w, sizes))


def run(kernel: str, xs_ND: Tensor, counts_E: Tensor, w1, w2, w3=None) -> Tensor:
    """Kernel ``kernel`` (``auto`` resolved on the rows' device) on expert-sorted rows."""
    fn = {"loop": loop, "grouped_mm": grouped_mm, "padded_bmm": padded_bmm, "gmm": gmm}
    if kernel == "auto" and not isinstance(w1, Tensor) and xs_ND.device.type == "cpu":
        kernel = "loop"  # per-expert weight sequences (DeepSpeed's modules) on CPU: no stacking per call
    return fn[resolve(kernel, xs_ND.device, len(xs_ND) / max(len(counts_E), 1))](xs_ND, counts_E, w1, w2, w3)


def _all_experts_mm(a: Tensor, w_E: Tensor) -> Tensor:
    return torch.einsum("td,edf->tef" if a.dim() == 2 else "tef,efd->ted", a, w_E)


def all_experts(x_TD: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None = None) -> Tensor:
    """Every expert on every token, ``out_TED`` (CompeteSMoE's competition, diagnostics)."""
    return ffn(x_TD, w1, w2, w3, mm=_all_experts_mm)


@torch.no_grad()
def loop_inference(xs_ND: Tensor, counts_E: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None) -> Tensor:
    """``loop`` without autograd: the body in place, matmuls into preallocated buffers (no per-expert
    allocation, no concatenation). Stacked weights."""
    ys_ND = torch.empty_like(xs_ND)
    hidden = xs_ND.new_empty(int(counts_E.max()) if len(xs_ND) else 0, w1.shape[-1])
    gate = xs_ND.new_empty(hidden.shape) if w3 is not None else None
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        c, h = xs_ND[start : start + n], hidden[:n]
        torch.mm(c, w1[e], out=h)
        if gate is None:
            torch.ops.aten.gelu_(h)
        else:
            torch.mm(c, w3[e], out=gate[:n])
            F.silu(h, inplace=True).mul_(gate[:n])
        torch.mm(h, w2[e], out=ys_ND[start : start + n])
        start += n
    return ys_ND
