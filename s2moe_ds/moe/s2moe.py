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

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .layer import MoEConfig, MoELayer, MoEOutput
from .uncertainty import GaussianNoise, NoisyPair, info_nce, noise_level_loss


class NoisyInputs(NamedTuple):
    """What ``S2MoELayer.noisy_inputs`` returns."""

    xx: Tensor
    """``[x; x_hat]``: the ``2T`` rows both pathways are routed from."""
    nce: Tensor | None
    """InfoNCE on the inputs (training with ``uncertainty_on: inputs``), else None."""
    level: Tensor | None
    """The noise-level term (learnable sigmas), else None."""
    cos: Tensor
    """Mean cosine between tokens and their noisy copies (a metric)."""


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


@torch.no_grad()
def pathway_disagreement(clean_ids_TK: Tensor, noisy_ids_TK: Tensor) -> dict:
    """``{'pathway_disagreement': share of tokens whose top-1 expert differs between the pathways}`` (how
    much the noise changes routing); empty when a router selects no slots (VQMoE's codebook-only routing)."""
    if clean_ids_TK.shape[1] == 0:
        return {}
    return {"pathway_disagreement": (clean_ids_TK[:, 0] != noisy_ids_TK[:, 0]).float().mean()}


class S2MoELayer(MoELayer):
    def __init__(self, cfg: MoEConfig, d_model: int, **layer_options):
        """``layer_options``: ``MoELayer``'s (layer_id, seed, out_init_std, vocab_size)."""
        super().__init__(cfg, d_model, **layer_options)
        s = cfg.s2moe
        self.noise = GaussianNoise(s.sigma1, s.sigma2, d_model, learnable=s.noise == "learnable")
        self.gate = nn.Linear(d_model, 1) if s.gate == "learned" else None
        self.fused_dispatch = s.fused_dispatch

    def gate_values(self, x_TD: Tensor) -> Tensor:
        if self.gate is None:
            return x_TD.new_full((x_TD.shape[0], 1), self.cfg.s2moe.gate_value)
        return torch.sigmoid(self.gate(x_TD))

    def noisy_inputs(self, x_TD: Tensor) -> NoisyInputs:
        """``[x; x_hat]`` and the terms of L_u that need only the inputs.

        Fixed sigmas with sigma2 > 0 (the default) take ``NoisyPair``: the noisy copy written into the
        routed rows, InfoNCE on the inputs and the cosine metric in one pass with one backward. Otherwise
        (learnable sigmas, a zero sigma2) the same terms are computed one by one."""
        s = self.cfg.s2moe
        nce_on_inputs = self.training and s.uncertainty_coef > 0 and s.uncertainty_on == "inputs"
        if self.noise.floor_free:
            num_negatives = s.num_negatives if nce_on_inputs else None
            var1, var2 = self.noise.variances(x_TD.dtype)
            xx, nce, cos = NoisyPair.apply(x_TD, var1, var2, self.noise.scales_x, num_negatives, s.temperature)
            return NoisyInputs(xx, nce if nce_on_inputs else None, None, cos)
        x_hat_TD = self.noise(x_TD)
        level_loss = self.training and s.uncertainty_coef > 0 and s.noise == "learnable" and s.noise_target_coef > 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and level_loss):  # else only the metric is needed
            level, cos = noise_level_loss(x_TD, x_hat_TD, s.target_similarity)
        nce = info_nce(x_TD, x_hat_TD, s.temperature, s.num_negatives) if nce_on_inputs else None
        return NoisyInputs(torch.cat([x_TD, x_hat_TD]), nce, level if level_loss else None, cos)

    def pathways(self, xx: Tensor) -> tuple[Tensor, Tensor, dict, dict]:
        """``f(x)`` and ``f(x_hat)`` from ``xx = [x; x_hat]`` through one routing + dispatch (or two, for
        comparison)."""
        T = len(xx) // 2
        if self.fused_dispatch:
            route = self.route(xx)
            yy = self.dispatch(xx, route)
            ids = route.expert_ids_TK
            return yy[:T], yy[T:], dict(route.aux_losses), {**route.metrics, **pathway_disagreement(ids[:T], ids[T:])}
        r1, r2 = self.route(xx[:T]), self.route(xx[T:])
        losses = {n: (r1.aux_losses[n] + r2.aux_losses[n]) / 2 for n in r1.aux_losses}
        metrics = {**merge_metrics(r1.metrics, r2.metrics), **pathway_disagreement(r1.expert_ids_TK, r2.expert_ids_TK)}
        return self.dispatch(xx[:T], r1), self.dispatch(xx[T:], r2), losses, metrics

    def gated_fused(self, xx: Tensor, g_T1: Tensor) -> tuple[Tensor, dict, dict] | None:
        """The mixed output of ``xx = [x; x_hat]`` in one dispatch with the gate folded into the combine
        weights.

        Returns None when the pathway outputs are needed separately (InfoNCE on outputs) or the
        router computed the output itself (CompeteSMoE competition); ``pathways`` handles those.
        """
        if not self.fused_dispatch or self.cfg.s2moe.uncertainty_on == "outputs":
            return None
        T = len(xx) // 2
        route = self.route(xx)
        metrics = {**route.metrics, **pathway_disagreement(route.expert_ids_TK[:T], route.expert_ids_TK[T:])}
        if route.precomputed_TD is not None or route.expert_ids_TK.shape[1] == 0:
            yy = self.dispatch(xx, route)
            return g_T1 * yy[:T] + (1 - g_T1) * yy[T:], dict(route.aux_losses), metrics
        gate_2T = torch.cat([g_T1, 1 - g_T1]).to(route.weights_TK.dtype)
        y_TD = self.experts(xx, route.expert_ids_TK, route.weights_TK * gate_2T, num_out=T)
        if route.extra_TD is not None:  # the router's own term (VQMoE's discrete branch), gated alike
            e = route.extra_TD
            y_TD = y_TD + g_T1.to(e.dtype) * e[:T] + (1 - g_T1.to(e.dtype)) * e[T:]
        if self.shared is not None:  # the shared experts, on both pathways, gated alike
            s = self.shared(xx)
            y_TD = y_TD + g_T1.to(s.dtype) * s[:T] + (1 - g_T1.to(s.dtype)) * s[T:]
        return y_TD, dict(route.aux_losses), metrics

    def forward(self, x: Tensor) -> MoEOutput:
        s = self.cfg.s2moe
        if not self.training and self.inference_pathways == "clean":
            return super().forward(x)
        x_TD = x.reshape(-1, x.shape[-1])
        inputs = self.noisy_inputs(x_TD)
        g_T1 = self.gate_values(x_TD)
        fused = self.gated_fused(inputs.xx, g_T1)
        if fused is not None:
            y_TD, losses, metrics = fused
        else:
            y_clean, y_noisy, losses, metrics = self.pathways(inputs.xx)
            y_TD = g_T1 * y_clean + (1 - g_T1) * y_noisy
        if self.training and s.uncertainty_coef > 0:
            l_u = inputs.nce if inputs.nce is not None else info_nce(y_clean, y_noisy, s.temperature, s.num_negatives)
            if inputs.level is not None:
                l_u = l_u + s.noise_target_coef * inputs.level
            losses["uncertainty"] = s.uncertainty_coef * l_u
        s1, s2 = self.noise.sigmas()
        metrics = dict(
            metrics,
            gate_mean=g_T1.detach().mean(),
            sigma1=s1.detach().mean(),
            sigma2=s2.detach().mean(),
            noise_cos=inputs.cos,
            **self.backend_metrics(),
        )
        return MoEOutput(y_TD.view_as(x), losses, metrics)


def build_moe_layer(
    cfg: MoEConfig, d_model: int, layer_id: int = 0, seed: int = 0, out_init_std: float = 0.02, vocab_size: int = 0
) -> MoELayer:
    cls = S2MoELayer if cfg.s2moe.enabled else MoELayer
    return cls(cfg, d_model, layer_id=layer_id, seed=seed, out_init_std=out_init_std, vocab_size=vocab_size)
