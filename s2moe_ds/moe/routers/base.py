"""Router contract shared by every router, and the math they share.

Shape suffixes: T tokens, D model width, E experts, K routed slots per token.

A router maps tokens ``x_TD`` to a ``RouterOutput``: for each token, K (expert id, combine weight)
slots, the router's probability over all experts (used by balance losses and diagnostics), a dict of
auxiliary losses **already multiplied by their coefficients** (so the layer just sums them), and a dict
of metrics. Routers keep no state between steps except ``step`` (set by the trainer through
``set_step``), which schedules such as CompeteSMoE's competition and StableMoE's freeze read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...configtools import check_positive


@dataclass
class RouterConfig:
    """Fields every router has."""

    balance_coef: float = 0.01
    """Weight of the Switch/GShard balance loss ``E * sum_i f_i * P_i`` (0 disables it)."""

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.balance_coef", self.balance_coef, allow_zero=True)


@dataclass
class RouterOutput:
    weights_TK: Tensor
    """Combine weights of the routed slots (differentiable)."""
    expert_ids_TK: Tensor
    """Expert index of each slot (int64). An expert may appear twice for a token (VQMoE)."""
    probs_TE: Tensor
    """Router probability over all experts."""
    aux_losses: dict = field(default_factory=dict)
    """Named auxiliary losses, each already scaled by its coefficient."""
    metrics: dict = field(default_factory=dict)
    """Named diagnostics (detached tensors)."""
    precomputed_TD: Optional[Tensor] = None
    """Set when the router already ran the experts (CompeteSMoE competition): the layer output."""


class AllExperts(Protocol):
    """What a router that needs every expert's output (CompeteSMoE) is handed by the layer."""

    def forward_all(self, x_TD: Tensor) -> Tensor:  # returns out_TED
        ...


class Router(nn.Module):
    """Base class: subclasses set ``config_cls`` and implement ``route``."""

    config_cls: type = RouterConfig

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int, layer_id: int = 0, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts
        self.layer_id = layer_id
        self.seed = seed
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def forward(self, x_TD: Tensor, k: int, experts: Optional[AllExperts] = None) -> RouterOutput:
        out = self.route(x_TD, k, experts)
        out.metrics.update(routing_metrics(out.probs_TE, out.expert_ids_TK, self.num_experts))
        return out

    def route(self, x_TD: Tensor, k: int, experts: Optional[AllExperts]) -> RouterOutput:
        raise NotImplementedError

    @classmethod
    def flops_per_token(cls, cfg: RouterConfig, d_model: int, num_experts: int) -> float:
        """Forward FLOPs of routing one token (multiply-add = 2); a linear router by default."""
        return 2 * d_model * num_experts

    @classmethod
    def expected_slots(cls, cfg: RouterConfig, k: int, num_experts: int, training: bool) -> float:
        """Expected expert evaluations per token (what the expert FLOPs scale with)."""
        return k


def topk_softmax(logits_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k experts by logit; combine weights = softmax over the selected logits.

    For k = 1 the weight is the expert's probability under the softmax over *all* logits (Switch,
    and fairseq's top1gating that the XMoE/StableMoE/S2MoE code descends from): a softmax over one
    selected logit is constantly 1 and would give the router no gradient from the task loss.
    """
    top_logits_TK, ids_TK = logits_TE.topk(k, dim=-1)
    if k == 1:
        return logits_TE.softmax(dim=-1).gather(-1, ids_TK), ids_TK
    return top_logits_TK.softmax(dim=-1), ids_TK


def expert_counts(ids_TK: Tensor, num_experts: int) -> Tensor:
    return torch.bincount(ids_TK.reshape(-1), minlength=num_experts)


def switch_balance_loss(probs_TE: Tensor, ids_TK: Tensor, num_experts: int) -> Tensor:
    """``E * sum_i f_i * P_i``: f_i fraction of routed slots sent to expert i, P_i mean probability.

    Equals 1 for perfectly uniform routing and probabilities; its minimum over P for fixed f.
    """
    f_E = expert_counts(ids_TK, num_experts).to(probs_TE.dtype) / ids_TK.numel()
    P_E = probs_TE.mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


def cosine_logits(h_TR: Tensor, embed_ER: Tensor, temperature: float) -> Tensor:
    """Cosine similarity between tokens and unit-normalised expert embeddings, over a temperature."""
    return F.normalize(h_TR, dim=-1) @ F.normalize(embed_ER, dim=-1).t() / temperature


@torch.no_grad()
def routing_metrics(probs_TE: Tensor, ids_TK: Tensor, num_experts: int) -> dict:
    counts_E = expert_counts(ids_TK, num_experts).float()
    p = probs_TE.detach().float().clamp_min(1e-12)
    return {
        "tokens_per_expert": counts_E,
        "load_imbalance": counts_E.max() / counts_E.mean().clamp_min(1e-12),
        "routing_entropy": -(p * p.log()).sum(-1).mean(),
    }


def with_balance(cfg: RouterConfig, probs_TE: Tensor, ids_TK: Tensor, num_experts: int, losses: dict) -> dict:
    if cfg.balance_coef > 0:
        losses["balance"] = cfg.balance_coef * switch_balance_loss(probs_TE, ids_TK, num_experts)
    return losses
