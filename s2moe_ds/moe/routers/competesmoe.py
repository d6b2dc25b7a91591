"""CompeteSMoE: route by competition on scheduled steps, train the router to predict the winners.

On a competition step every expert processes every token; each expert's *neural response* to the token
ranks it, the top-k by response are the winners, weighted by their (normalised or softmaxed) responses,
and the layer output is built from those already-computed outputs. The router is trained with an MSE
towards the stop-gradient response distribution. On all other steps, and always at inference, routing
is ordinary linear top-k.

Whether a step competes is a pure function of (seed, layer, step), so every rank agrees and a resumed
run makes the same choices without saved random state.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configtools import check_choice, check_positive, check_range, fail
from .base import Router, RouterConfig, RouterOutput, switch_balance_loss, topk_softmax, with_balance

RESPONSES = ("softplus_mean", "l2norm")
WEIGHTINGS = ("normalize", "softmax")


@dataclass
class CompeteSMoEConfig(RouterConfig):
    compete_prob: float = 0.05
    """Probability that a layer competes on a training step (2025 default 0.05)."""
    warmup_steps: int = 0
    """No competition before this step (the 2025 recipe waits 5% of training; set it per run)."""
    response: str = "softplus_mean"
    """Neural response: 'softplus_mean' (mean of softplus(output), 2025) or 'l2norm' (2024)."""
    weighting: str = "normalize"
    """Winners' combine weights: 'normalize' responses (2025) or 'softmax' over them (2024)."""
    router_loss_coef: float = 0.01
    """Weight of the MSE between softmax(router logits) and the response distribution (2025 SFT: 0.01)."""
    diversity_coef: float = 0.0
    """Weight of the 2025 diversity loss (mean pairwise cosine of the winners' outputs); 0 disables."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_range(f"{prefix}.compete_prob", self.compete_prob, 0.0, 1.0)
        if self.warmup_steps < 0:
            fail(f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check_choice(f"{prefix}.response", self.response, RESPONSES)
        check_choice(f"{prefix}.weighting", self.weighting, WEIGHTINGS)
        check_positive(f"{prefix}.router_loss_coef", self.router_loss_coef, allow_zero=True)
        check_positive(f"{prefix}.diversity_coef", self.diversity_coef, allow_zero=True)


def neural_response(out_TED, kind: str):
    if kind == "softplus_mean":
        return F.softplus(out_TED).mean(-1)
    return out_TED.norm(dim=-1)


def response_distribution(resp_TE, weighting: str):
    if weighting == "softmax":
        return resp_TE.softmax(-1)
    return resp_TE / resp_TE.sum(-1, keepdim=True).clamp_min(1e-9)


def mean_pairwise_cosine(out_TKD):
    k = out_TKD.shape[1]
    if k < 2:
        return out_TKD.new_zeros(())
    u = F.normalize(out_TKD, dim=-1)
    sim_TKK = u @ u.transpose(1, 2)
    off_diag = sim_TKK.sum((1, 2)) - sim_TKK.diagonal(dim1=1, dim2=2).sum(-1)
    return (off_diag / (k * (k - 1))).mean()


class CompeteSMoERouter(Router):
    config_cls = CompeteSMoEConfig

    def __init__(self, cfg: CompeteSMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, **kw)
        self.proj = nn.Linear(d_model, num_experts, bias=False)

    @classmethod
    def expected_slots(cls, cfg, k, num_experts, training):
        # on a competition step every expert runs (the winners' outputs are reused, not recomputed)
        return cfg.compete_prob * num_experts + (1 - cfg.compete_prob) * k if training else k

    def competes(self) -> bool:
        if not self.training or self.step < self.cfg.warmup_steps or self.cfg.compete_prob == 0:
            return False
        draw = random.Random(f"compete/{self.seed}/{self.layer_id}/{self.step}").random()
        return draw < self.cfg.compete_prob

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        logits_TE = self.proj(x_TD)
        probs_TE = logits_TE.softmax(-1)
        if not self.competes():
            weights_TK, ids_TK = topk_softmax(logits_TE, k)
            return RouterOutput(weights_TK, ids_TK, probs_TE, with_balance(self.cfg, probs_TE, ids_TK, self.num_experts, {}))
        if experts is None:
            raise RuntimeError("CompeteSMoE competition needs the experts: call the router through an MoE layer")
        out_TED = experts.forward_all(x_TD)
        resp_TE = neural_response(out_TED, self.cfg.response)
        top_resp_TK, ids_TK = resp_TE.topk(k, dim=-1)
        weights_TK = response_distribution(top_resp_TK, self.cfg.weighting)
        idx = ids_TK.unsqueeze(-1).expand(-1, -1, out_TED.shape[-1])
        winners_TKD = out_TED.gather(1, idx)
        output_TD = (weights_TK.unsqueeze(-1).to(winners_TKD.dtype) * winners_TKD).sum(1)
        target_TE = response_distribution(resp_TE, self.cfg.weighting).detach()
        losses = {}
        if self.cfg.balance_coef > 0:
            losses["balance"] = self.cfg.balance_coef * switch_balance_loss(probs_TE, ids_TK, self.num_experts)
        if self.cfg.router_loss_coef > 0:
            losses["compete_router"] = self.cfg.router_loss_coef * F.mse_loss(probs_TE, target_TE)
        if self.cfg.diversity_coef > 0:
            losses["diversity"] = self.cfg.diversity_coef * mean_pairwise_cosine(winners_TKD)
        out = RouterOutput(weights_TK, ids_TK, probs_TE, losses, precomputed_TD=output_TD)
        out.metrics["competed"] = torch.ones(())
        return out
