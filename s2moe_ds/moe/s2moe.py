"""S2MoE: one SMoE applied to the input and to a Gaussian-noise-augmented copy, mixed by a learned gate.

Shape suffixes: T tokens, D model width, M sampled negatives.

Training forward (and evaluation with ``s2moe.inference='both'``):
  1. ``x_hat = N1 * x + N2`` with N1 ~ Normal(1, sigma1^2), N2 ~ Normal(0, sigma2^2) per element;
  2. clean and noisy tokens are concatenated and routed + dispatched **once** (so a distributed backend
     pays one all-to-all), each pathway with the layer's k (top-1 by default: the expert FLOPs of top-2);
  3. ``y = g(x) * f(x) + (1 - g(x)) * f(x_hat)`` with ``g = sigmoid(Linear(D, 1))`` per token
     (``gate: fixed`` uses a constant instead, for the ablation);
  4. losses: the router's (balance ...) over both pathways, plus ``uncertainty_coef`` x L_u.
Evaluation (default): noise is off, ``x_hat = x`` in expectation, so only the clean pathway runs, with
``moe.eval_k`` experts (top-1 by default; ``set_inference`` changes both on the layer): ``y = f(x)``.

**The top-1 combine weight.** The router's default ``weights: auto`` gives a top-1-trained pathway its
expert's probability under the softmax over all experts (Switch's rule), not the weight 1 that the
authors' fastmoe gates give at k=1 (a softmax over one selected score): with weight 1 the router would
get no gradient from the task loss, only from the balance loss. Evaluation keeps that rule at any k
(``moe.eval_weights: train``): top-1 uses the probability it was trained with, and top-2 uses both
experts' probabilities, not renormalised.

**The uncertainty loss L_u.** InfoNCE between clean and noisy representations: token i's clean vector
must be closer (cosine / tau) to its own noisy copy than to other tokens' noisy copies. Taken on the
pathway inputs (default) it acts on the backbone (the representation must stay identifiable under the
noise); on the outputs (``uncertainty_on: outputs``) on the experts and router (their outputs must be
robust to it). With fixed sigmas (default) L_u has no handle on the noise itself. With
``noise: learnable`` it does: the per-feature sigmas are trained by L_u, which is InfoNCE plus a
noise-level term ``noise_target_coef * (log(1 - mean cos(x, x_hat)) - log(1 - target_similarity))^2``.
InfoNCE alone would shrink the noise to nothing (an unperturbed copy is the easiest to identify); the
level term holds its overall size at a target similarity, and InfoNCE decides where it goes: more noise
on the features that identify a token least. The ablations in docs/results.md measure both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import MoEConfig, MoELayer, MoEOutput


class _InfoNCE(torch.autograd.Function):
    """InfoNCE's forward as ``info_nce`` describes it, with the gradient written out: autograd's chain
    through the norms, products and mask took ~15 elementwise passes over ``[T, D]``, this takes ~6
    (S2MoE's overhead, docs/benchmarks.md). ``tests/test_s2moe_layer.py`` checks it with gradcheck."""

    @staticmethod
    def forward(ctx, a_TD: Tensor, p_TD: Tensor, idx_M: Tensor, temperature: float):
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
        ctx.save_for_backward(a_TD, p_TD, idx_M, inv_a_T, inv_p_T, q_MD, logits)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad):
        a_TD, p_TD, idx_M, inv_a_T, inv_p_T, q_MD, logits = ctx.saved_tensors
        T = len(a_TD)
        g_TL = logits.softmax(-1).mul_(grad / T)  # d loss / d logits: (softmax - onehot(0)) / T
        g_TL[:, 0] -= grad / T
        g_pos_T, g_neg_TM = g_TL[:, 0], g_TL[:, 1:]
        # d/da of pos = (a.p) |a|^-1 |p|^-1 / tau and neg = (a.q_m) |a|^-1, with d|a|^-1/da = -a |a|^-3
        # (the clamp at 1e-8 never binds on real tokens)
        s_T = g_pos_T * logits[:, 0] + torch.where(torch.isinf(logits[:, 1:]), 0.0, g_neg_TM * logits[:, 1:]).sum(-1)
        c_T = g_pos_T * inv_p_T / ctx.temperature
        ga = torch.addcmul(g_neg_TM @ q_MD, p_TD, c_T.unsqueeze(-1)).mul_(inv_a_T.unsqueeze(-1))
        ga.sub_(a_TD * (inv_a_T.square() * s_T).unsqueeze(-1))
        # d/dp: p_t through pos_t; the sampled rows through q_m = p_j |p_j|^-1 / tau
        gp = a_TD * (c_T * inv_a_T).unsqueeze(-1)
        gp.sub_(p_TD * (inv_p_T.square() * g_pos_T * logits[:, 0]).unsqueeze(-1))
        gq_MD = (g_neg_TM * inv_a_T.unsqueeze(-1)).t() @ a_TD
        p_MD, inv_p_M = p_TD[idx_M], inv_p_T[idx_M]
        dot_M = (p_MD * gq_MD).sum(-1) * inv_p_M.square()
        gp_MD = (gq_MD - p_MD * dot_M.unsqueeze(-1)) * (inv_p_M / ctx.temperature).unsqueeze(-1)
        return ga, gp.index_add_(0, idx_M, gp_MD), None, None


def info_nce(anchor_TD: Tensor, positive_TD: Tensor, temperature: float, num_negatives: int = 0) -> Tensor:
    """InfoNCE: token i's anchor should be closer (cosine / tau) to its positive than to other positives.

    Negatives are the positives of ``num_negatives`` tokens sampled without replacement from the batch
    (shared by all anchors; an anchor's own positive is masked out of them); 0 uses every other token.
    Cost is O(T * M * D) instead of O(T^2 * D): with T=4096 and M=256 that is 16x cheaper than all pairs.
    Cosines are formed from dot products and norms, so only the M sampled rows are ever normalised.
    """
    a_TD, p_TD = anchor_TD.float(), positive_TD.float()
    T = a_TD.shape[0]
    if num_negatives == 0 or num_negatives >= T:
        idx_M = torch.arange(T, device=a_TD.device)
    else:
        idx_M = torch.randperm(T, device=a_TD.device)[:num_negatives]
    return _InfoNCE.apply(a_TD, p_TD, idx_M, temperature)


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

    def sigmas(self) -> tuple[Tensor, Tensor]:
        return self.log_sigma1.exp(), self.log_sigma2.exp()

    def forward(self, x_TD: Tensor) -> Tensor:
        """Sample ``N1 * x + N2``. Given x, each element is Normal(x, sigma1^2 x^2 + sigma2^2), so one
        standard-normal draw ``x + sqrt(sigma1^2 x^2 + sigma2^2) * eps`` has exactly that distribution
        at half the random numbers (the draw cost 5% of a CPU training step); still reparameterised."""
        s1, s2 = (s.to(x_TD.dtype) for s in self.sigmas())  # buffers may stay fp32 under bf16 engines
        var = torch.addcmul(s2.square(), x_TD.square(), s1.square())
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


def merge_metrics(a: dict, b: dict) -> dict:
    """Routing metrics of two separately routed pathways as one: counts added, the rest averaged,
    imbalance recomputed from the summed counts."""
    out = {}
    for name in a.keys() & b.keys():
        out[name] = a[name] + b[name] if name == "tokens_per_expert" else (a[name] + b[name]) / 2
    if "tokens_per_expert" in out:
        c = out["tokens_per_expert"].float()
        out["load_imbalance"] = c.max() / c.mean().clamp_min(1e-12)
    return out


class S2MoELayer(MoELayer):
    def __init__(
        self,
        cfg: MoEConfig,
        d_model: int,
        layer_id: int = 0,
        seed: int = 0,
        out_init_std: float = 0.02,
        vocab_size: int = 0,
    ):
        super().__init__(cfg, d_model, layer_id=layer_id, seed=seed, out_init_std=out_init_std, vocab_size=vocab_size)
        s = cfg.s2moe
        self.noise = GaussianNoise(s.sigma1, s.sigma2, d_model, learnable=s.noise == "learnable")
        self.gate = nn.Linear(d_model, 1) if s.gate == "learned" else None
        self.fused_dispatch = s.fused_dispatch

    def gate_values(self, x_TD: Tensor) -> Tensor:
        if self.gate is None:
            return x_TD.new_full((x_TD.shape[0], 1), self.cfg.s2moe.gate_value)
        return torch.sigmoid(self.gate(x_TD))

    def pathways(self, x_TD: Tensor, x_hat_TD: Tensor) -> tuple[Tensor, Tensor, dict, dict]:
        """``f(x)`` and ``f(x_hat)`` through one routing + dispatch (or two, for comparison)."""
        if self.fused_dispatch:
            xx = torch.cat([x_TD, x_hat_TD])
            route = self.route(xx)
            yy = self.dispatch(xx, route)
            return yy[: len(x_TD)], yy[len(x_TD) :], dict(route.aux_losses), route.metrics
        r1, r2 = self.route(x_TD), self.route(x_hat_TD)
        losses = {n: (r1.aux_losses[n] + r2.aux_losses[n]) / 2 for n in r1.aux_losses}
        return self.dispatch(x_TD, r1), self.dispatch(x_hat_TD, r2), losses, merge_metrics(r1.metrics, r2.metrics)

    def gated_fused(self, x_TD: Tensor, x_hat_TD: Tensor, g_T1: Tensor) -> tuple[Tensor, dict, dict] | None:
        """The mixed output in one dispatch with the gate folded into the combine weights.

        Returns None when the pathway outputs are needed separately (InfoNCE on outputs) or the
        router computed the output itself (CompeteSMoE competition); ``pathways`` handles those.
        """
        if not self.fused_dispatch or self.cfg.s2moe.uncertainty_on == "outputs":
            return None
        xx = torch.cat([x_TD, x_hat_TD])
        route = self.route(xx)
        if route.precomputed_TD is not None or route.expert_ids_TK.shape[1] == 0:
            yy = self.dispatch(xx, route)
            y_clean, y_noisy = yy[: len(x_TD)], yy[len(x_TD) :]
            return g_T1 * y_clean + (1 - g_T1) * y_noisy, dict(route.aux_losses), route.metrics
        gate_2T = torch.cat([g_T1, 1 - g_T1]).to(route.weights_TK.dtype)
        y_TD = self.experts(xx, route.expert_ids_TK, route.weights_TK * gate_2T, num_out=len(x_TD))
        if route.extra_TD is not None:  # the router's own term (VQMoE's discrete branch), gated alike
            e = route.extra_TD
            y_TD = y_TD + g_T1.to(e.dtype) * e[: len(x_TD)] + (1 - g_T1.to(e.dtype)) * e[len(x_TD) :]
        return y_TD, dict(route.aux_losses), route.metrics

    def forward(self, x: Tensor) -> MoEOutput:
        s = self.cfg.s2moe
        if not self.training and self.inference_pathways == "clean":
            return super().forward(x)
        x_TD = x.reshape(-1, x.shape[-1])
        x_hat_TD = self.noise(x_TD)
        g_T1 = self.gate_values(x_TD)
        fused = self.gated_fused(x_TD, x_hat_TD, g_T1)
        if fused is not None:
            y_TD, losses, metrics = fused
        else:
            y_clean, y_noisy, losses, metrics = self.pathways(x_TD, x_hat_TD)
            y_TD = g_T1 * y_clean + (1 - g_T1) * y_noisy
        level_loss = self.training and s.uncertainty_coef > 0 and s.noise == "learnable" and s.noise_target_coef > 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and level_loss):  # else only the metric is needed
            level, cos = noise_level_loss(x_TD, x_hat_TD, s.target_similarity)
        if self.training and s.uncertainty_coef > 0:
            a, p = (x_TD, x_hat_TD) if s.uncertainty_on == "inputs" else (y_clean, y_noisy)
            l_u = info_nce(a, p, s.temperature, s.num_negatives)
            if level_loss:
                l_u = l_u + s.noise_target_coef * level
            losses["uncertainty"] = s.uncertainty_coef * l_u
        s1, s2 = self.noise.sigmas()
        metrics = dict(
            metrics,
            gate_mean=g_T1.detach().mean(),
            sigma1=s1.detach().mean(),
            sigma2=s2.detach().mean(),
            noise_cos=cos,
            **self.backend_metrics(),
        )
        return MoEOutput(y_TD.view_as(x), losses, metrics)


def build_moe_layer(
    cfg: MoEConfig, d_model: int, layer_id: int = 0, seed: int = 0, out_init_std: float = 0.02, vocab_size: int = 0
) -> MoELayer:
    cls = S2MoELayer if cfg.s2moe.enabled else MoELayer
    return cls(cfg, d_model, layer_id=layer_id, seed=seed, out_init_std=out_init_std, vocab_size=vocab_size)
