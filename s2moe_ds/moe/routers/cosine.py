"""Expert-embedding routers: XMoE (low-dimensional) and StableMoE (d_model-sized embeddings).

Shape suffixes: T tokens, D model width, R routing dimension, E experts, K routed slots per token.

Default (``variant: authors``): the gates the S2MoE/VQMoE/CompeteSMoE authors ran as their XMoE and
StableMoE baselines (giangdip2410/VQMoE ``custom_gate.py``, ``CustomNaiveGate_Balance_XMoE`` and
``..._StableMoE``; the same in giangdip2410/CompeteSMoE ``custom_gates.py``), which is what the S2MoE
paper's table compares:
  1. XMoE projects the token to R = 8 dimensions (``Linear(D, 8, bias=False)``); StableMoE uses the token
     itself (R = D);
  2. expert embeddings ``[E, R]`` start orthogonal with gain 0.32; XMoE rescales them, without gradient,
     to norm 1.5 before every training forward;
  3. score = (projected) token, **not** normalised, times the unit-normalised expert embeddings (no
     temperature): ``s = h @ normalize(e).T``;
  4. top-k on the raw scores; combine weights by the router's ``weights`` rule (softmax over the selected
     scores at the suite's top-2, as the authors' gates at every k);
  5. the balance loss uses ``softmax(s / balance_temperature)`` (0.3): the only place a temperature acts.
Remaining differences from the authors' code: their balance loss divides P by N*k, not N (ours = k x
theirs), and it is never switched on in their table-1 scripts (``g_balance`` is not passed: their
baselines trained with no balance loss); we keep ``balance_coef`` 0.01 on every router so the comparison
is like for like (set it to 0 to reproduce theirs). XMoE's unused ``gate`` Linear is not built.

``variant: torchscale`` (XMoE) is X-MoE as released by its authors (microsoft/torchscale
``torchscale/component/xmoe/routing.py``; microsoft/unilm's xmoe folder points there): R = 16, the same
scores; top-1 weight = the softmax probability; top-2 weights = the two probabilities renormalised, and the
second expert is kept only where ``2 * g2 > U(0, 1)`` in training; balance loss ``E * sum_e mean(p)_e *
(fraction of tokens whose top-1 is e)`` on ``softmax(s)``. Not reproduced: expert capacity and dropping
(this project is dropless unless ``ep_mode: capacity``).

``variant: two_stage`` (StableMoE) is StableMoE as released by its authors (Hunter-DDM/stablemoe
``fairseq/modules/moe_layer.py``):
  - stage 1 (steps < ``stage2_step``): scores ``x @ C.T`` (dot product, centroids ``[E, D]`` orthogonal,
    gain 0.1), greedy top-1 (no gradient through the choice); the expert's output is scaled by
    ``sigmoid(x . C_e)`` (their ``alpha E(x) + (1 - alpha) x`` with the expert's own residual is
    ``x + alpha f(x)``: our block adds the residual); balance loss
    ``sum_e (n_e - T/E) / (T/E) * sum_{t -> e} sigmoid(s_te) / T`` (the count factor is a constant), and a
    distillation loss: cross-entropy, per token, between a lightweight router (a 50-dim embedding of the
    *input token id*, no context, times centroids ``[E, 50]``) and the stage-1 choice;
  - stage 2 (steps >= ``stage2_step``): route by the distilled router's argmax (no gradient: frozen in
    effect), still weighted by ``sigmoid(x . C_e)``; no balance or distillation loss;
  - inference always routes by the distilled router, as theirs does once distillation is on.
  Differences: their default assignment is a balanced auction (the released command uses greedy, as we
  do); their capacity factor (2) is not reproduced; their coefficients (0.3 and 0.3) are this variant's
  defaults only when ``balance_coef`` / ``distill_coef`` are left at theirs.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...configtools import check_choice, check_positive, fail
from .base import Router, RouterConfig, RouterOutput, switch_balance_loss

EMBED_GAIN = 0.32      # orthogonal init gain of the authors' (and torchscale's) expert embeddings
EMBED_NORM = 1.5       # XMoE rescales its expert embeddings to this norm before every forward
NORM_EPS = 1e-4        # F.normalize eps in both codes


def unit_rows(e_ER: Tensor) -> Tensor:
    return F.normalize(e_ER.float(), dim=-1, eps=NORM_EPS)


def embedding_scores(h_TR: Tensor, e_ER: Tensor) -> Tensor:
    """``h @ normalize(e).T`` in fp32: the token is not normalised, the expert embeddings are."""
    return (h_TR.float() @ unit_rows(e_ER).t()).to(h_TR.dtype)


def orthogonal_embeddings(num_experts: int, dim: int, gain: float) -> Tensor:
    e = torch.empty(num_experts, dim)
    nn.init.orthogonal_(e, gain=gain)
    return e


def authors_gate(router: Router, scores_TE: Tensor, k: int) -> RouterOutput:
    """Steps 4-5 of the authors' gates: top-k on the raw scores, weights by the router's rule, the balance
    loss on ``softmax(scores / balance_temperature)``."""
    weights_TK, ids_TK = router.select(scores_TE, k)
    probs_TE = (scores_TE.float() / router.cfg.balance_temperature).softmax(-1)
    losses = {}
    if router.cfg.balance_coef > 0:
        losses["balance"] = router.cfg.balance_coef * switch_balance_loss(probs_TE, ids_TK, router.num_experts)
    return RouterOutput(weights_TK, ids_TK, probs_TE, losses)


@dataclass
class XMoEConfig(RouterConfig):
    variant: str = "authors"
    """'authors' (the S2MoE authors' XMoE baseline gate, default) or 'torchscale' (X-MoE's released code)."""
    proj_dim: int = 0
    """Routing dimension the token is projected to; 0 = the variant's (8 authors, 16 torchscale)."""
    balance_temperature: float = 0.3
    """'authors': the balance loss's probabilities are softmax(scores / this)."""
    second_expert_policy: str = "random"
    """'torchscale' top-2: 'random' keeps the second expert where 2 g2 > U(0,1) in training; 'all' always."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_choice(f"{prefix}.variant", self.variant, ("authors", "torchscale"))
        check_positive(f"{prefix}.proj_dim", self.proj_dim, allow_zero=True)
        check_positive(f"{prefix}.balance_temperature", self.balance_temperature)
        check_choice(f"{prefix}.second_expert_policy", self.second_expert_policy, ("random", "all"))

    def routing_dim(self) -> int:
        return self.proj_dim or (8 if self.variant == "authors" else 16)


@dataclass
class StableMoEConfig(RouterConfig):
    variant: str = "authors"
    """'authors' (the S2MoE authors' StableMoE baseline gate: one stage, default) or 'two_stage'
    (StableMoE's released code: distillation, then routing by the frozen distilled router)."""
    balance_temperature: float = 0.3
    """'authors': the balance loss's probabilities are softmax(scores / this)."""
    stage2_step: int = -1
    """'two_stage': the first step of stage 2 (absolute; StableMoE's command: 10% of training); required."""
    distill_coef: float = 0.3
    """'two_stage': weight of the distillation cross-entropy (StableMoE's command: 0.3)."""
    distill_dim: int = 50
    """'two_stage': width of the distilled router's token embedding (StableMoE: 50)."""
    stage1_balance_coef: float = 0.3
    """'two_stage': weight of its stage-1 balance loss (StableMoE's command: 0.3); ``balance_coef`` is
    not used by this variant."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_choice(f"{prefix}.variant", self.variant, ("authors", "two_stage"))
        check_positive(f"{prefix}.balance_temperature", self.balance_temperature)
        if self.variant == "two_stage" and self.stage2_step < 0:
            fail(f"{prefix}.stage2_step", "variant 'two_stage' needs the first step of stage 2 (e.g. 10% of "
                 "train.steps, as StableMoE's released command), got -1")
        check_positive(f"{prefix}.distill_coef", self.distill_coef, allow_zero=True)
        check_positive(f"{prefix}.distill_dim", self.distill_dim)
        check_positive(f"{prefix}.stage1_balance_coef", self.stage1_balance_coef, allow_zero=True)


class XMoERouter(Router):
    config_cls = XMoEConfig

    def __init__(self, cfg: XMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, **kw)
        R = cfg.routing_dim()
        self.proj = nn.Linear(d_model, R, bias=False)
        embed = orthogonal_embeddings(num_experts, R, EMBED_GAIN)
        self.embeddings = nn.Parameter(embed * (EMBED_NORM / embed.norm(dim=-1, keepdim=True)))

    @classmethod
    def flops_per_token(cls, cfg, d_model, num_experts):
        R = cfg.routing_dim()
        return 2 * d_model * R + 2 * R * num_experts

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        if self.training:
            with torch.no_grad():  # both codes: rows back to norm 1.5 before every forward
                self.embeddings.mul_(EMBED_NORM / self.embeddings.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))
        scores_TE = embedding_scores(self.proj(x_TD), self.embeddings)
        if self.cfg.variant == "torchscale":
            return self._torchscale(scores_TE, k)
        return authors_gate(self, scores_TE, k)

    def _torchscale(self, scores_TE: Tensor, k: int) -> RouterOutput:
        probs_TE = scores_TE.float().softmax(-1)
        top_TK, ids_TK = probs_TE.topk(k, dim=-1)
        weights_TK = top_TK if k == 1 else top_TK / top_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(top_TK.dtype).eps)
        if k == 2 and self.training and self.cfg.second_expert_policy == "random":
            keep_T = 2 * weights_TK[:, 1].detach() > torch.rand_like(weights_TK[:, 1])
            weights_TK = torch.stack([weights_TK[:, 0], weights_TK[:, 1] * keep_T], dim=-1)
        losses = {}
        if self.cfg.balance_coef > 0:  # E * sum_e mean(p)_e * (fraction whose top-1 is e)
            losses["balance"] = self.cfg.balance_coef * switch_balance_loss(probs_TE, ids_TK[:, :1], self.num_experts)
        return RouterOutput(weights_TK.to(scores_TE.dtype), ids_TK, probs_TE, losses)

    def input_space_vectors(self) -> Tensor:
        """Expert i scores ``x . (W_proj.T e_i / |e_i|)``: its direction in the d_model input space."""
        return unit_rows(self.embeddings.detach()) @ self.proj.weight.detach().float()


class StableMoERouter(Router):
    config_cls = StableMoEConfig

    def __init__(self, cfg: StableMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, **kw)
        vocab_size = self.vocab_size
        if cfg.variant == "authors":
            self.embeddings = nn.Parameter(orthogonal_embeddings(num_experts, d_model, EMBED_GAIN))
            return
        if vocab_size <= 0:
            raise ValueError("StableMoE 'two_stage' routes by token ids: build it inside the language model "
                             "(it passes the vocabulary size)")
        self.embeddings = nn.Parameter(orthogonal_embeddings(num_experts, d_model, 0.1))  # centroids C
        self.distill_emb = nn.Embedding(vocab_size, cfg.distill_dim)
        self.distill_centroids = nn.Parameter(orthogonal_embeddings(num_experts, cfg.distill_dim, 0.1))

    @classmethod
    def expected_slots(cls, cfg, k, num_experts, training):
        return 1 if cfg.variant == "two_stage" else k

    def stage2(self) -> bool:
        return self.cfg.variant == "two_stage" and self.step >= self.cfg.stage2_step

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        if self.cfg.variant == "two_stage":
            return self._two_stage(x_TD)
        scores_TE = embedding_scores(x_TD, self.embeddings)
        return authors_gate(self, scores_TE, k)

    def distilled_logits(self, T: int) -> Tensor:
        ids_T = self.token_ids_T
        if ids_T is None:
            raise RuntimeError("StableMoE 'two_stage' needs the input token ids: the language model sets them "
                               "(router.token_ids_T) before its forward")
        ids_T = ids_T.reshape(-1)
        if T != ids_T.numel():  # S2MoE routes [x; x_hat]: the same ids twice
            ids_T = ids_T.repeat(T // ids_T.numel())
        return self.distill_emb(ids_T) @ self.distill_centroids.t()

    def _two_stage(self, x_TD: Tensor) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        s_TE = x_TD @ self.embeddings.t()
        distill_TE = self.distilled_logits(T)
        by_distilled = self.stage2() or not self.training
        ids_T1 = (distill_TE if by_distilled else s_TE).detach().argmax(-1, keepdim=True)
        weights_TK = torch.sigmoid(s_TE.gather(-1, ids_T1))
        losses = {}
        if self.training and not self.stage2():
            mean = T / E
            n_E = torch.bincount(ids_T1.reshape(-1), minlength=E).to(s_TE.dtype)
            # per-token sigmoid of the chosen score, times its expert's (constant) relative overload
            losses["balance"] = self.cfg.stage1_balance_coef * (((n_E - mean) / mean)[ids_T1[:, 0]] * weights_TK[:, 0]).sum() / T
            if self.cfg.distill_coef > 0:
                losses["distill"] = self.cfg.distill_coef * F.cross_entropy(distill_TE.float(), ids_T1[:, 0])
        probs_TE = s_TE.detach().float().softmax(-1)
        out = RouterOutput(weights_TK, ids_T1, probs_TE, losses)
        out.metrics["stage2"] = torch.tensor(float(self.stage2()))
        return out
