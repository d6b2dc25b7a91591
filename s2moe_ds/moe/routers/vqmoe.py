"""VQMoE: a vector-quantisation codebook picks the expert, mixed with an SMoE branch.

The discrete branch maps each token to its nearest code (L2); the code index modulo E is its expert.
The codebook is trained with the VQ-VAE codebook loss plus ``commitment`` x commitment loss, both
weighted by ``beta_vq``. As in the released code, a learned per-token 2-way softmax mixes that branch
with an ordinary SMoE branch (cosine gate, top-k): the router emits the SMoE branch's K slots scaled by
the first mix weight plus one slot for the code's expert weighted by the second. ``vq_only`` routes by
the codebook alone (the revision's second stage).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configtools import check_positive, fail
from .base import Router, RouterConfig, RouterOutput, cosine_logits, topk_softmax, with_balance


@dataclass
class VQMoEConfig(RouterConfig):
    codebook_size: int = 0
    """Number of codes K; 0 means one code per expert (the released scripts)."""
    beta_vq: float = 0.08
    """Weight of the VQ loss (codebook + commitment), 0.08 in the released scripts."""
    commitment: float = 0.25
    """Commitment-loss weight inside the VQ loss (VQ-VAE's 0.25)."""
    temperature: float = 0.3
    """Temperature of the SMoE branch's cosine gate."""
    vq_only: bool = False
    """Route by the codebook alone (one slot per token, weight 1)."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.codebook_size < 0:
            fail(f"{prefix}.codebook_size", f"must be 0 (one per expert) or positive, got {self.codebook_size}")
        check_positive(f"{prefix}.beta_vq", self.beta_vq, allow_zero=True)
        check_positive(f"{prefix}.commitment", self.commitment, allow_zero=True)
        check_positive(f"{prefix}.temperature", self.temperature)


def vq_losses(x_TD, code_TD, commitment: float):
    """VQ-VAE losses: codebook ||sg(x) - e||^2 and commitment ||x - sg(e)||^2 (means over elements)."""
    codebook = F.mse_loss(code_TD, x_TD.detach())
    commit = F.mse_loss(x_TD, code_TD.detach())
    return codebook + commitment * commit


class VQMoERouter(Router):
    config_cls = VQMoEConfig

    def __init__(self, cfg: VQMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, **kw)
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size or num_experts, d_model))
        embed = torch.empty(num_experts, d_model)
        nn.init.orthogonal_(embed)
        self.embeddings = nn.Parameter(embed)
        self.mix = nn.Linear(d_model, 2)

    @classmethod
    def flops_per_token(cls, cfg, d_model, num_experts):
        codes = cfg.codebook_size or num_experts
        return 2 * d_model * codes + 2 * d_model * num_experts + 2 * d_model * 2  # codebook, cosine gate, mix

    @classmethod
    def expected_slots(cls, cfg, k, num_experts, training):
        return 1 if cfg.vq_only else k + 1

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        with torch.no_grad():
            code_idx_T = torch.cdist(x_TD.float(), self.codebook.float()).argmin(-1)
        code_TD = self.codebook[code_idx_T]
        vq_ids_T1 = (code_idx_T % self.num_experts).unsqueeze(-1)
        logits_TE = cosine_logits(x_TD, self.embeddings, self.cfg.temperature)
        probs_TE = logits_TE.softmax(-1)
        losses = {}
        if self.cfg.beta_vq > 0:
            losses["vq"] = self.cfg.beta_vq * vq_losses(x_TD, code_TD, self.cfg.commitment)
        if self.cfg.vq_only:
            weights_TK = torch.ones_like(vq_ids_T1, dtype=x_TD.dtype)
            return RouterOutput(weights_TK, vq_ids_T1, probs_TE, with_balance(self.cfg, probs_TE, vq_ids_T1, self.num_experts, losses))
        smoe_w_TK, smoe_ids_TK = topk_softmax(logits_TE, k)
        mix_T2 = self.mix(x_TD).softmax(-1)
        weights_TK = torch.cat([mix_T2[:, :1] * smoe_w_TK, mix_T2[:, 1:]], dim=-1)
        ids_TK = torch.cat([smoe_ids_TK, vq_ids_T1], dim=-1)
        losses = with_balance(self.cfg, probs_TE, smoe_ids_TK, self.num_experts, losses)
        out = RouterOutput(weights_TK, ids_TK, probs_TE, losses)
        out.metrics["vq_mix_weight"] = mix_T2[:, 1].detach().mean()
        return out
