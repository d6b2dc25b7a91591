"""Cosine routers: XMoE (low-dimensional) and StableMoE (d_model-sized expert embeddings).

Both score a token by the cosine similarity between its (projected) representation and unit-normalised
learned expert embeddings, divided by a temperature; top-k, then softmax over the selected scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...configtools import check_positive, fail
from .base import Router, RouterConfig, RouterOutput, cosine_logits, topk_softmax, with_balance


@dataclass
class XMoEConfig(RouterConfig):
    proj_dim: int = 8
    """Routing dimension the token is projected to (X-MoE uses 8, or E/2)."""
    temperature: float = 0.3
    """Divides the cosine scores; smaller is sharper."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_positive(f"{prefix}.proj_dim", self.proj_dim)
        check_positive(f"{prefix}.temperature", self.temperature)


@dataclass
class StableMoEConfig(RouterConfig):
    temperature: float = 0.3
    """Divides the cosine scores; smaller is sharper."""
    freeze_step: int = -1
    """From this training step on the router is frozen (StableMoE's second stage); -1 never freezes."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_positive(f"{prefix}.temperature", self.temperature)
        if self.freeze_step < -1:
            fail(f"{prefix}.freeze_step", "must be -1 (never) or a step >= 0")


class _CosineRouter(Router):
    def __init__(self, cfg, d_model: int, num_experts: int, route_dim: Optional[int], **kw):
        super().__init__(cfg, d_model, num_experts, **kw)
        # XMoE projects to a small routing space; StableMoE (route_dim None) scores x itself.
        self.proj = nn.Linear(d_model, route_dim, bias=False) if route_dim else nn.Identity()
        route_dim = route_dim or d_model
        # Orthogonal rows keep the experts distinguishable at initialisation (X-MoE's choice).
        embed = torch.empty(num_experts, route_dim)
        nn.init.orthogonal_(embed)
        self.embeddings = nn.Parameter(embed)

    def frozen(self) -> bool:
        return False

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen()):
            logits_TE = cosine_logits(self.proj(x_TD), self.embeddings, self.cfg.temperature)
        weights_TK, ids_TK = topk_softmax(logits_TE, k)
        probs_TE = logits_TE.softmax(-1)
        return RouterOutput(weights_TK, ids_TK, probs_TE, with_balance(self.cfg, probs_TE, ids_TK, self.num_experts, {}))


class XMoERouter(_CosineRouter):
    config_cls = XMoEConfig

    @classmethod
    def flops_per_token(cls, cfg, d_model, num_experts):
        return 2 * d_model * cfg.proj_dim + 2 * cfg.proj_dim * num_experts

    def __init__(self, cfg: XMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, route_dim=cfg.proj_dim, **kw)


class StableMoERouter(_CosineRouter):
    config_cls = StableMoEConfig

    def __init__(self, cfg: StableMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, route_dim=None, **kw)

    def frozen(self) -> bool:
        return self.cfg.freeze_step >= 0 and self.training and self.step >= self.cfg.freeze_step
