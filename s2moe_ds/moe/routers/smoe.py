"""SMoE (Switch/GShard style): linear router with a bias, top-k on the logits, weights by ``weights``.

At the suite's top-2 this is the authors' ``CustomNaiveGate_Balance_SMoE`` (giangdip2410/VQMoE
``custom_gate.py``): ``Linear(D, E)`` with a bias (the model initialises both like theirs: N(0, 0.02),
bias 0), weights = softmax over the selected logits, balance loss ``E * sum_i f_i P_i``.
Remaining differences: at a *training* k of 1 the default ('auto') weight is the expert's full-softmax
probability, where the authors' gate gives weight 1 (``weights: renorm`` for theirs); their balance loss
divides P by N*k, not N (ours = k x theirs), and their table-1 scripts never switch it on (``g_balance`` is
not passed), where every router here trains with ``balance_coef`` 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...configtools import check_positive, fail
from .base import Router, RouterConfig, RouterOutput, router_z_loss, softmax_last, with_balance


@dataclass
class SMoEConfig(RouterConfig):
    z_loss_coef: float = 0.0
    """Weight of the ST-MoE router z-loss (0 disables it)."""
    jitter_eps: float = 0.0
    """Training-time multiplicative input jitter: x * U(1 - eps, 1 + eps) before the router (0 disables)."""
    bias: bool = True
    """A learned per-expert bias in the router (the authors' gate has one)."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_positive(f"{prefix}.z_loss_coef", self.z_loss_coef, allow_zero=True)
        if not 0 <= self.jitter_eps < 1:
            fail(f"{prefix}.jitter_eps", f"must be in [0, 1), got {self.jitter_eps!r}")


class SMoERouter(Router):
    config_cls = SMoEConfig

    def __init__(self, cfg: SMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, **kw)
        self.proj = nn.Linear(d_model, num_experts, bias=cfg.bias)

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - eps, 1 + eps)
        logits_TE = self.proj(x_TD)
        probs_TE = softmax_last(logits_TE)
        weights_TK, ids_TK = self.select(logits_TE, k, probs_TE)
        losses = with_balance(self.cfg, probs_TE, ids_TK, self.num_experts, {})
        if self.cfg.z_loss_coef > 0:
            losses["z"] = self.cfg.z_loss_coef * router_z_loss(logits_TE)
        return RouterOutput(weights_TK, ids_TK, probs_TE, losses)
