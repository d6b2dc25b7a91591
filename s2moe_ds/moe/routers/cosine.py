"""Expert-embedding routers: XMoE (low-dimensional) and StableMoE (d_model-sized embeddings).

Shape suffixes: T tokens, D model width, R routing dimension, E experts, K routed slots per token.

Default (``variant: authors``): the gates the S2MoE/VQMoE/CompeteSMoE authors ran as their XMoE and
StableMoE baselines (giangdip2410/VQMoE ``custom_gate.py``, ``CustomNaiveGate_Balance_XMoE`` and
``..._StableMoE``; the same in giangdip2410/CompeteSMoE ``custom_gates.py``), which is what the S2MoE
paper's table compares:
  1. XMoE projects the token to R = 8 dimensions (``Linear(D, 8, bias=False)``); StableMoE uses the token
     itself (R = D);
  2. expert embeddings ``[E, R]`` start orthogonal with gain 0.32; XMoE rescales them, without gradient,
     to norm 1.5 before every forward, and (``after_optimizer_step``) rescales the optimizer's own fp32
     copy after every step: under ZeRO that copy is written back over the module parameter after each
     step, so a rescale of the module parameter alone never persisted (the stored norm then shrank with
     weight decay, ~1.35 after 2000 steps, and the angular learning rate grew);
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
scores, the reduction with PyTorch's default Linear init (``init_weights``); top-1 weight = the softmax
probability; top-2 weights = the two probabilities renormalised, and the second expert is kept only where
``2 * g2 > U(0, 1)``; balance loss ``E * sum_e mean(p)_e * (fraction of tokens whose top-1 is e)`` on
``softmax(s)``. Differences: torchscale also drops second experts at random at evaluation, ours evaluates
deterministically with both; a dropped second expert keeps its slot with weight 0 (still computed, counted
in the load and, in ``ep_mode: capacity``, in the capacity), where torchscale does not dispatch it; expert
capacity and dropping are not reproduced (this project is dropless unless ``ep_mode: capacity``).

``variant: two_stage`` (StableMoE) is StableMoE as released by its authors (Hunter-DDM/stablemoe
``fairseq/modules/moe_layer.py``):
  - stage 1 (steps < ``stage2_step``): scores ``x @ C.T`` (dot product, centroids ``[E, D]`` orthogonal,
    gain 0.1), greedy top-1 (no gradient through the choice); the expert's output is scaled by
    ``sigmoid(x . C_e)`` (their ``alpha E(x) + (1 - alpha) x`` with the expert's own residual is
    ``x + alpha f(x)``: our block adds the residual); balance loss
    ``sum_e (n_e - T/E) / (T/E) * sum_{t -> e} sigmoid(s_te) / T`` (the count factor is a constant), and a
    distillation loss: cross-entropy, per token, between a lightweight router (a 50-dim embedding of the
    *input token id*, no context, times centroids ``[E, 50]``) and the stage-1 choice;
  - stage 2 (steps >= ``stage2_step``): route by the distilled router's argmax, frozen: its parameters
    are copied into buffers at the first stage-2 step and routing reads the copies (an optimizer keeps
    moving parameters that get no gradient, through momentum and weight decay; theirs skips them), still
    weighted by ``sigmoid(x . C_e)``; no balance or distillation loss;
  - inference routes by the distilled router, as theirs does once distillation is on (with
    ``distill_coef: 0`` there is no distillation: greedy ``x . C`` throughout, as theirs);
  - the distilled router's token embedding starts N(0, 1) (theirs: ``nn.Embedding``'s default init;
    ``init_weights`` restores it after the model's N(0, 0.02)).
  Differences: their default assignment is a balanced auction (the released command uses greedy, as we
  do); their capacity factor (2) is not reproduced; their embedding's padding row (pad id 1) is not; their
  layer is an extra decoder layer whose experts hold 3 pre-LN sublayers with zero-initialised output
  projections, routed on the raw hidden state, where ours is the block's FFN on its LayerNorm output;
  their coefficients (0.3 and 0.3) are this variant's ``stage1_balance_coef`` and ``distill_coef``
  defaults (``balance_coef`` is not used by it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...configtools import check_choice, check_positive, fail
from .base import Router, RouterConfig, RouterOutput, softmax_last, switch_balance_loss

EMBED_GAIN = 0.32  # orthogonal init gain of the authors' (and torchscale's) expert embeddings
EMBED_NORM = 1.5  # XMoE rescales its expert embeddings to this norm before every forward
NORM_EPS = 1e-4  # F.normalize eps in both codes


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
    probs_TE = softmax_last(scores_TE.float() / router.cfg.balance_temperature)
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
        if self.variant == "torchscale" and self.bias_update_rate > 0:
            fail(
                f"{prefix}.bias_update_rate",
                "is for the shared top-k selection; variant 'torchscale' has its own "
                "gating: use variant 'authors' or set it to 0",
            )

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
            fail(
                f"{prefix}.stage2_step",
                "variant 'two_stage' needs the first step of stage 2 (e.g. 10% of "
                "train.steps, as StableMoE's released command), got -1",
            )
        check_positive(f"{prefix}.distill_coef", self.distill_coef, allow_zero=True)
        check_positive(f"{prefix}.distill_dim", self.distill_dim)
        check_positive(f"{prefix}.stage1_balance_coef", self.stage1_balance_coef, allow_zero=True)
        if self.variant == "two_stage" and self.bias_update_rate > 0:
            fail(
                f"{prefix}.bias_update_rate",
                "is for the shared top-k selection; variant 'two_stage' routes by its "
                "own greedy assignment: use variant 'authors' or set it to 0",
            )


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

    def init_weights(self) -> None:
        if self.cfg.variant == "torchscale":  # torchscale keeps the reduction's default Linear init
            self.proj.reset_parameters()

    @staticmethod
    def rescaled(e_ER: Tensor) -> Tensor:
        return e_ER * (EMBED_NORM / e_ER.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))

    def after_optimizer_step(self, master) -> None:
        value = master.get(self.embeddings)
        master.set(self.embeddings, self.rescaled(value))

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        with torch.no_grad():  # both codes: rows back to norm 1.5 before every forward
            self.embeddings.copy_(self.rescaled(self.embeddings))
        scores_TE = embedding_scores(self.proj(x_TD), self.embeddings)
        if self.cfg.variant == "torchscale":
            return self._torchscale(scores_TE, k)
        return authors_gate(self, scores_TE, k)

    def _torchscale(self, scores_TE: Tensor, k: int) -> RouterOutput:
        probs_TE = softmax_last(scores_TE.float())
        top_TK, ids_TK = probs_TE.topk(k, dim=-1)
        weights_TK = (
            top_TK if k == 1 else top_TK / top_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(top_TK.dtype).eps)
        )
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
            raise ValueError(
                "StableMoE 'two_stage' routes by token ids: build it inside the language model "
                "(it passes the vocabulary size)"
            )
        self.embeddings = nn.Parameter(orthogonal_embeddings(num_experts, d_model, 0.1))  # centroids C
        self.distill_emb = nn.Embedding(vocab_size, cfg.distill_dim)
        self.distill_centroids = nn.Parameter(orthogonal_embeddings(num_experts, cfg.distill_dim, 0.1))
        # stage 2 routes by a frozen copy of the distilled router, taken at its first step
        self.register_buffer("frozen_emb", torch.zeros(vocab_size, cfg.distill_dim))
        self.register_buffer("frozen_centroids", torch.zeros(num_experts, cfg.distill_dim))
        self.register_buffer("frozen", torch.zeros(()))

    def init_weights(self) -> None:
        if self.cfg.variant == "two_stage":  # nn.Embedding's own N(0, 1), as the release
            nn.init.normal_(self.distill_emb.weight)

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
            raise RuntimeError(
                "StableMoE 'two_stage' needs the input token ids: the language model sets them "
                "(router.token_ids_T) before its forward"
            )
        ids_T = ids_T.reshape(-1)
        if T != ids_T.numel():  # S2MoE routes [x; x_hat]: the same ids twice
            ids_T = ids_T.repeat(T // ids_T.numel())
        if self.stage2():
            if not self.frozen:
                with torch.no_grad():
                    self.frozen_emb.copy_(self.distill_emb.weight)
                    self.frozen_centroids.copy_(self.distill_centroids)
                    self.frozen.fill_(1)
            return self.frozen_emb[ids_T] @ self.frozen_centroids.t()
        return self.distill_emb(ids_T) @ self.distill_centroids.t()

    def _two_stage(self, x_TD: Tensor) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        s_TE = x_TD @ self.embeddings.t()
        distill_TE = self.distilled_logits(T)
        by_distilled = (self.stage2() or not self.training) and self.cfg.distill_coef > 0
        ids_T1 = (distill_TE if by_distilled else s_TE).detach().argmax(-1, keepdim=True)
        weights_TK = torch.sigmoid(s_TE.gather(-1, ids_T1))
        losses = {}
        if self.training and not self.stage2():
            mean = T / E
            n_E = torch.bincount(ids_T1.reshape(-1), minlength=E).to(s_TE.dtype)
            # per-token sigmoid of the chosen score, times its expert's (constant) relative overload
            losses["balance"] = (
                self.cfg.stage1_balance_coef * (((n_E - mean) / mean)[ids_T1[:, 0]] * weights_TK[:, 0]).sum() / T
            )
            if self.cfg.distill_coef > 0:
                losses["distill"] = self.cfg.distill_coef * F.cross_entropy(distill_TE.float(), ids_T1[:, 0])
        probs_TE = softmax_last(s_TE.detach().float())
        out = RouterOutput(weights_TK, ids_T1, probs_TE, losses)
        out.metrics["stage2"] = torch.tensor(float(self.stage2()))
        return out
