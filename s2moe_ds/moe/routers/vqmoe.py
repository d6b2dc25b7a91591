"""VQMoE: a vector-quantisation codebook picks one expert per token, mixed with an SMoE branch.

Shape suffixes: T tokens, D model width, E experts, K routed slots per token, C codes.

Follows the released code (giangdip2410/VQMoE ``vqmoe.py``: ``VQMoE``, ``VectorQuantizer``; run by
``script/table1/.../vqmoe`` with ``--moe-top-k 1 --beta_vq 0.08 --contrib_rate 0.05`` and the StableMoE
gate for the sparse branch):
  1. sparse branch: the authors' StableMoE gate (token times unit-normalised expert embeddings ``[E, D]``,
     orthogonal gain 0.32, no temperature), top-k (k=1 in their scripts), weights = softmax over the
     selected scores (``weights: renorm``: 1 at k=1, so this gate gets no task gradient, as theirs);
  2. discrete branch: the nearest code (squared L2) of a codebook ``[C, D]`` (C = E; N(0, 0.02) as their
     training script re-initialises it); the code index modulo E is the expert; the expert's input is
     ``LN(x * (1 - c) + sg(q - x) * c)`` (value ``(1 - 2c) x + c q``, gradient ``(1 - c)`` to x; c =
     ``contrib_rate`` 0.05) and its output goes through the same LayerNorm again;
  3. ``y = m_0 * sparse + m_1 * discrete`` with ``m = softmax(Linear(D, 2)(x))`` per token;
  4. losses: ``beta_vq * (mse(q, sg(x)) + commitment * mse(sg(q), x))`` (0.08, 0.25) and the sparse
     branch's balance loss on ``softmax(scores / 0.3)``.
Both branches run in training and at inference, so VQMoE at top-k evaluates k + 1 experts per token
(top-1: the expert FLOPs of a top-2 SMoE). The discrete branch is a second dispatch of the experts on
its own inputs; its output reaches the layer as ``RouterOutput.extra_value_TD`` (weight ``m_1``).
Differences: their LayerNorm is shared with the block's post-residual norm (our blocks are pre-LN, so the
branch has its own); their experts are ReLU with biases (ours: the model's expert FFN); their balance loss
is never enabled in their scripts (we keep ``balance_coef`` 0.01 as for every router) and divides P by N*k
(ours = k x theirs; equal at the scripts' k = 1). ``vq_only`` routes
by the codebook alone (the paper revision's second stage): ``y`` = the discrete branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...configtools import check_positive, check_range, fail
from .base import Router, RouterConfig, RouterOutput, softmax_last, switch_balance_loss
from .cosine import EMBED_GAIN, embedding_scores, orthogonal_embeddings


@dataclass
class VQMoEConfig(RouterConfig):
    weights: str = "renorm"
    """As the authors' sparse branch: softmax over the selected scores at every k (weight 1 at k=1)."""
    codebook_size: int = 0
    """Number of codes C; 0 means one code per expert (the released scripts)."""
    beta_vq: float = 0.08
    """Weight of the VQ loss (codebook + commitment), 0.08 in the released scripts."""
    commitment: float = 0.25
    """Commitment-loss weight inside the VQ loss (VQ-VAE's 0.25)."""
    contrib_rate: float = 0.05
    """c: the discrete branch's expert input is ``x (1 - c) + sg(q - x) c`` (released scripts: 0.05)."""
    balance_temperature: float = 0.3
    """The sparse branch's balance loss uses softmax(scores / this), as the authors' StableMoE gate."""
    vq_only: bool = False
    """Route by the codebook alone (the discrete branch is the layer output)."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.codebook_size < 0:
            fail(f"{prefix}.codebook_size", f"must be 0 (one per expert) or positive, got {self.codebook_size}")
        check_positive(f"{prefix}.beta_vq", self.beta_vq, allow_zero=True)
        check_positive(f"{prefix}.commitment", self.commitment, allow_zero=True)
        check_range(f"{prefix}.contrib_rate", self.contrib_rate, 0.0, 1.0)
        check_positive(f"{prefix}.balance_temperature", self.balance_temperature)


def vq_losses(x_TD, code_TD, commitment: float):
    """VQ-VAE losses: codebook ||sg(x) - e||^2 and commitment ||x - sg(e)||^2 (means over elements)."""
    codebook = F.mse_loss(code_TD, x_TD.detach())
    commit = F.mse_loss(x_TD, code_TD.detach())
    return codebook + commitment * commit


class VQMoERouter(Router):
    config_cls = VQMoEConfig

    def __init__(self, cfg: VQMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, **kw)
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size or num_experts, d_model) * 0.02)
        self.embeddings = nn.Parameter(orthogonal_embeddings(num_experts, d_model, EMBED_GAIN))
        self.mix = nn.Linear(d_model, 2)
        self.norm = nn.LayerNorm(d_model)

    @classmethod
    def flops_per_token(cls, cfg, d_model, num_experts):
        codes = cfg.codebook_size or num_experts
        return 2 * d_model * codes + 2 * d_model * num_experts + 2 * d_model * 2  # codebook, sparse gate, mix

    @classmethod
    def expected_slots(cls, cfg, k, num_experts, training):
        return 1 if cfg.vq_only else k + 1

    def nearest_code(self, x_TD: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cdist(x_TD.float(), self.codebook.float()).argmin(-1)

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        if experts is None:
            raise RuntimeError("VQMoE's discrete branch runs the experts itself: call the router through an MoE layer")
        c = self.cfg
        code_idx_T = self.nearest_code(x_TD)
        q_TD = self.codebook[code_idx_T]
        vq_ids_T1 = (code_idx_T % self.num_experts).unsqueeze(-1)
        u_TD = self.norm(x_TD * (1 - c.contrib_rate) + (q_TD - x_TD).detach() * c.contrib_rate)
        discrete_TD = self.norm(experts(u_TD, vq_ids_T1, torch.ones_like(vq_ids_T1, dtype=u_TD.dtype)))
        scores_TE = embedding_scores(x_TD, self.embeddings)
        probs_TE = softmax_last(scores_TE.float() / c.balance_temperature)
        losses = {}
        if c.beta_vq > 0:
            losses["vq"] = c.beta_vq * vq_losses(x_TD, q_TD, c.commitment)
        if c.vq_only:
            empty_T0 = vq_ids_T1[:, :0]
            return RouterOutput(
                empty_T0.to(x_TD.dtype), empty_T0, probs_TE, losses, extra_value_TD=discrete_TD, extra_ids_TK=vq_ids_T1
            )
        sparse_w_TK, sparse_ids_TK = self.select(scores_TE, k)
        mix_T2 = softmax_last(self.mix(x_TD))
        if c.balance_coef > 0:
            losses["balance"] = c.balance_coef * switch_balance_loss(probs_TE, sparse_ids_TK, self.num_experts)
        out = RouterOutput(
            mix_T2[:, :1] * sparse_w_TK,
            sparse_ids_TK,
            probs_TE,
            losses,
            extra_value_TD=discrete_TD,
            extra_weight_T1=mix_T2[:, 1:],
            extra_ids_TK=vq_ids_T1,
        )
        out.metrics["vq_mix_weight"] = mix_T2[:, 1].detach().mean()
        return out

    def input_space_vectors(self) -> Tensor:
        """The codebook: the vectors that decide the discrete branch's expert (in the input space)."""
        return self.codebook.detach().float()
