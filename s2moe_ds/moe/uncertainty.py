"""S2MoE's noisy copy and uncertainty loss: the math, with the gradients written out where autograd's
chain of elementwise passes over ``[T, D]`` was what S2MoE cost beyond SMoE (docs/benchmarks.md).

Shape suffixes: T tokens, D model width, M sampled negatives.

- ``info_nce``: InfoNCE between anchors and positives over sampled negatives (``_nce_forward`` /
  ``_nce_backward``, shared by the two autograd functions below);
- ``GaussianNoise``: ``x_hat = N1 * x + N2``, fixed or learnable sigmas;
- ``NoisyPair``: the training default's fast path (fixed sigmas): ``[x; x_hat]`` written straight into
  the ``[2T, D]`` buffer both pathways are routed from, InfoNCE on (x, x_hat) and the mean cosine between
  them, in one function whose backward sums every gradient into ``x`` in two passes. The same numbers as
  ``GaussianNoise`` + ``torch.cat`` + ``info_nce`` (``tests/test_s2moe_layer.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _nce_forward(a_TD: Tensor, p_TD: Tensor, idx_M: Tensor, temperature: float) -> tuple[Tensor, tuple]:
    """InfoNCE's loss as ``info_nce`` describes it, and what its backward needs."""
    inv_a_T = a_TD.norm(dim=-1).clamp_min(1e-8).reciprocal()
    inv_p_T = p_TD.norm(dim=-1).clamp_min(1e-8).reciprocal()
    pos_T = (a_TD * p_TD).sum(-1) * inv_a_T * inv_p_T / temperature
    q_MD = p_TD[idx_M] * (inv_p_T[idx_M] / temperature).unsqueeze(-1)
    neg_TM = (a_TD @ q_MD.t()) * inv_a_T.unsqueeze(-1)
    # each sampled row m is anchor idx_M[m]'s own positive: mask those M entries only
    mask = (idx_M, torch.arange(len(idx_M), device=a_TD.device))
    neg_TM = neg_TM.index_put(mask, neg_TM.new_tensor(float("-inf")))
    logits = torch.cat([pos_T.unsqueeze(1), neg_TM], dim=1)
    loss = F.cross_entropy(logits, torch.zeros(len(a_TD), dtype=torch.long, device=a_TD.device))
    return loss, (a_TD, p_TD, idx_M, inv_a_T, inv_p_T, q_MD, logits)


def _nce_backward(saved: tuple, temperature: float, grad: Tensor) -> tuple[Tensor, Tensor]:
    """``d loss / d anchor`` and ``d loss / d positive``, written out (see ``_InfoNCE``)."""
    a_TD, p_TD, idx_M, inv_a_T, inv_p_T, q_MD, logits = saved
    T = len(a_TD)
    g_TL = logits.softmax(-1).mul_(grad / T)  # d loss / d logits: (softmax - onehot(0)) / T
    g_TL[:, 0] -= grad / T
    g_pos_T, g_neg_TM = g_TL[:, 0], g_TL[:, 1:]
    # d/da of pos = (a.p) |a|^-1 |p|^-1 / tau and neg = (a.q_m) |a|^-1, with d|a|^-1/da = -a |a|^-3
    # (the clamp at 1e-8 never binds on real tokens)
    s_T = g_pos_T * logits[:, 0] + torch.where(torch.isinf(logits[:, 1:]), 0.0, g_neg_TM * logits[:, 1:]).sum(-1)
    c_T = g_pos_T * inv_p_T / temperature
    # the row scalings go into [T, M] or [T] factors, so each [T, D] term costs one fused pass
    g_neg_TM = g_neg_TM * inv_a_T.unsqueeze(-1)
    ga = (g_neg_TM @ q_MD).addcmul_(p_TD, (c_T * inv_a_T).unsqueeze(-1))
    ga.addcmul_(a_TD, (inv_a_T.square() * s_T).neg_().unsqueeze(-1))
    # d/dp: p_t through pos_t; the sampled rows through q_m = p_j |p_j|^-1 / tau
    gp = a_TD * (c_T * inv_a_T).unsqueeze(-1)
    gp.addcmul_(p_TD, (inv_p_T.square() * g_pos_T * logits[:, 0]).neg_().unsqueeze(-1))
    gq_MD = g_neg_TM.t() @ a_TD
    p_MD, inv_p_M = p_TD[idx_M], inv_p_T[idx_M]
    dot_M = (p_MD * gq_MD).sum(-1) * inv_p_M.square()
    gp_MD = (gq_MD - p_MD * dot_M.unsqueeze(-1)) * (inv_p_M / temperature).unsqueeze(-1)
    return ga, gp.index_add_(0, idx_M, gp_MD)


class _InfoNCE(torch.autograd.Function):
    """InfoNCE with the gradient written out: autograd's chain through the norms, products and mask took
    ~15 elementwise passes over ``[T, D]``, this takes ~6 (S2MoE's overhead, docs/benchmarks.md).
    ``tests/test_s2moe_layer.py`` checks it with gradcheck."""

    @staticmethod
    def forward(ctx, a_TD: Tensor, p_TD: Tensor, idx_M: Tensor, temperature: float):
        loss, saved = _nce_forward(a_TD, p_TD, idx_M, temperature)
        ctx.save_for_backward(*saved)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad):
        return (*_nce_backward(ctx.saved_tensors, ctx.temperature, grad), None, None)


def sample_negatives(num_tokens: int, num_negatives: int, device) -> Tensor:
    """Indices of InfoNCE's negatives: ``num_negatives`` tokens without replacement; 0 (or more than
    there are) means every token."""
    if num_negatives == 0 or num_negatives >= num_tokens:
        return torch.arange(num_tokens, device=device)
    return torch.randperm(num_tokens, device=device)[:num_negatives]


def info_nce(anchor_TD: Tensor, positive_TD: Tensor, temperature: float, num_negatives: int = 0) -> Tensor:
    """InfoNCE: token i's anchor should be closer (cosine / tau) to its positive than to other positives.

    Negatives are the positives of ``num_negatives`` tokens sampled without replacement from the batch
    (shared by all anchors; an anchor's own positive is masked out of them); 0 uses every other token.
    Cost is O(T * M * D) instead of O(T^2 * D): with T=4096 and M=256 that is 16x cheaper than all pairs.
    Cosines are formed from dot products and norms, so only the M sampled rows are ever normalised.
    """
    a_TD, p_TD = anchor_TD.float(), positive_TD.float()
    return _InfoNCE.apply(a_TD, p_TD, sample_negatives(len(a_TD), num_negatives, a_TD.device), temperature)


class GaussianNoise(nn.Module):
    """``x_hat = N1 * x + N2``; fixed sigmas, or learnable per-feature log-sigmas (reparameterised)."""

    def __init__(self, sigma1: float, sigma2: float, d_model: int, learnable: bool):
        super().__init__()
        if learnable:
            self.log_sigma1 = nn.Parameter(torch.full((d_model,), math.log(sigma1)))
            self.log_sigma2 = nn.Parameter(torch.full((d_model,), math.log(sigma2)))
        else:
            self.register_buffer("log_sigma1", torch.full((1,), math.log(sigma1) if sigma1 > 0 else -math.inf))
            self.register_buffer("log_sigma2", torch.full((1,), math.log(sigma2) if sigma2 > 0 else -math.inf))
        self.floor_free = not learnable and sigma2 >= 1e-5
        """Fixed sigma2 >= 1e-5: the variance is at least sigma2^2 > 1e-12 everywhere, so the guard below
        is the identity and is skipped (the same numbers, three fewer passes forward and two backward)."""
        self.scales_x = learnable or sigma1 > 0
        """Whether N1 is random (sigma1 > 0): known here, so ``NoisyPair`` never asks the device (a host sync
        per layer on a GPU)."""

    def sigmas(self) -> tuple[Tensor, Tensor]:
        return self.log_sigma1.exp(), self.log_sigma2.exp()

    def variances(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``sigma1^2, sigma2^2`` in ``dtype`` (buffers may stay fp32 under bf16 engines)."""
        s1, s2 = (s.to(dtype) for s in self.sigmas())
        return s1.square(), s2.square()

    def forward(self, x_TD: Tensor) -> Tensor:
        """Sample ``N1 * x + N2``. Given x, each element is Normal(x, sigma1^2 x^2 + sigma2^2), so one
        standard-normal draw ``x + sqrt(sigma1^2 x^2 + sigma2^2) * eps`` has exactly that distribution
        at half the random numbers (the draw cost 5% of a CPU training step); still reparameterised."""
        var1, var2 = self.variances(x_TD.dtype)
        var = torch.addcmul(var2, x_TD.square(), var1)
        if self.floor_free:
            return torch.addcmul(x_TD, var.sqrt(), torch.randn_like(x_TD))
        # sqrt's gradient at 0 is 0/0: with a zero sigma (the no-noise ablation) or sigma2 = 0 at x = 0 it
        # would turn every gradient into NaN. Clamping first changes nothing where var >= 1e-12 (every
        # element with the default sigmas) and gives those elements a zero-noise, zero-gradient draw.
        return torch.addcmul(x_TD, var.clamp_min(1e-12).sqrt() * (var > 1e-12), torch.randn_like(x_TD))


def noise_level_loss(x_TD: Tensor, x_hat_TD: Tensor, target_similarity: float) -> tuple[Tensor, Tensor]:
    """``(log(1 - mean cos) - log(1 - target))^2`` and the mean cosine between tokens and noisy copies.

    In log(1 - cos) the term is scale-free: 1 - cos grows with the squared noise-to-signal ratio, so the
    loss is about 4 (log sigma - log sigma_target)^2 whatever the target."""
    cos = F.cosine_similarity(x_TD.float(), x_hat_TD.float(), dim=-1).mean()
    gap = torch.log1p(-cos.clamp(max=1 - 1e-6)) - math.log(1 - target_similarity)
    return gap.square(), cos.detach()


class NoisyPair(torch.autograd.Function):
    """``([x; x_hat], InfoNCE(x, x_hat), mean cos(x, x_hat))`` for fixed sigmas with sigma2 > 0.

    ``x_hat = x + sqrt(var1 x^2 + var2) * eps`` (``GaussianNoise.forward``'s draw, the same random numbers)
    is written into the second half of the returned ``[2T, D]`` rows, so no concatenation copies it; its
    derivative ``1 + eps var1 x / sqrt(var1 x^2 + var2)`` is kept as one ``[T, D]`` factor (none when
    ``scales_x`` is False: var1 = 0, the derivative is 1). InfoNCE runs
    only with ``num_negatives`` (``info_nce``'s; None: the loss is returned as 0), and its positive
    logits give the mean cosine for free. Backward: ``d/dx = g_clean + dInfoNCE/da + (g_noisy +
    dInfoNCE/dp) * factor``.
    """

    @staticmethod
    def forward(
        ctx, x_TD: Tensor, var1: Tensor, var2: Tensor, scales_x: bool, num_negatives: int | None, temperature: float
    ):
        T = len(x_TD)
        xx = x_TD.new_empty(2 * T, *x_TD.shape[1:])
        xx[:T].copy_(x_TD)
        eps_TD = xx[T:].normal_()
        sd_TD = x_TD.square().mul_(var1).add_(var2).sqrt_()
        factor_TD = torch.mul(x_TD, eps_TD).mul_(var1).div_(sd_TD) if scales_x else None
        x_hat_TD = torch.addcmul(x_TD, sd_TD, eps_TD, out=eps_TD)
        del sd_TD
        wide = torch.promote_types(x_TD.dtype, torch.float32)
        a_TD, p_TD = x_TD.to(wide), x_hat_TD.to(wide)  # the same tensors in fp32, copies under bf16
        nce, idx_M = None, None
        if num_negatives is None:
            loss = x_TD.new_zeros((), dtype=torch.float32)
            cos = F.cosine_similarity(a_TD, p_TD, dim=-1).mean()
        else:
            idx_M = sample_negatives(T, num_negatives, x_TD.device)  # drawn after the noise, as info_nce's
            loss, (_, _, _, *nce) = _nce_forward(a_TD, p_TD, idx_M, temperature)
            cos = nce[-1][:, 0].mean() * temperature  # the positive logits are cos / tau
        # every tensor through save_for_backward (a view of the output kept on ctx would be a cycle);
        # the fp32 anchor and positive are the input and the output's second half, re-sliced in backward
        copies = (a_TD, p_TD) if a_TD is not x_TD else (None, None)
        ctx.save_for_backward(x_TD, xx, factor_TD, idx_M, *copies, *(nce or (None,) * 4))
        ctx.temperature = temperature
        ctx.has_nce = nce is not None
        ctx.mark_non_differentiable(cos)
        return xx, loss, cos

    @staticmethod
    def backward(ctx, g_xx, g_loss, _g_cos):
        x_TD, xx, factor_TD, idx_M, a_copy, p_copy, *nce = ctx.saved_tensors
        T = len(x_TD)
        g_clean_TD, g_noisy_TD = g_xx[:T], g_xx[T:]
        if ctx.has_nce and g_loss is not None:
            a_TD = x_TD if a_copy is None else a_copy
            p_TD = xx[T:] if p_copy is None else p_copy
            ga_TD, gp_TD = _nce_backward((a_TD, p_TD, idx_M, *nce), ctx.temperature, g_loss)
            g_clean_TD = g_clean_TD + ga_TD.to(g_xx.dtype)
            g_noisy_TD = gp_TD.to(g_xx.dtype).add_(g_noisy_TD)
        if factor_TD is None:
            return g_clean_TD + g_noisy_TD, None, None, None, None, None
        return torch.addcmul(g_clean_TD, g_noisy_TD, factor_TD).add_(g_noisy_TD), None, None, None, None, None
