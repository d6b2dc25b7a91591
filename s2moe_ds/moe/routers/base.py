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
from typing import Protocol

import torch
from torch import Tensor, nn

from ...configtools import check_choice, check_positive

WEIGHT_RULES = ("auto", "renorm", "prob", "per_k")
EVAL_WEIGHTS = ("train", "per_k")


@dataclass
class RouterConfig:
    """Fields every router has."""

    balance_coef: float = 0.01
    """Weight of the Switch/GShard balance loss ``E * sum_i f_i * P_i`` (0 disables it)."""
    weights: str = "auto"
    """Combine weights of the selected experts, one rule for training and inference whatever the k:
    'renorm' = softmax over the selected scores (the S2MoE/VQMoE/CompeteSMoE authors' fastmoe gates, at
    every k: weight 1 at k=1); 'prob' = each selected expert's probability under the softmax over all
    experts, not renormalised (Switch's top-1); 'auto' = 'renorm' when the *training* k is >= 2, 'prob'
    when it is 1 (a weight of 1 would give the router no gradient from the task loss); 'per_k' = the old
    convention that switches with the current k ('prob' at k=1, 'renorm' at k >= 2), so a top-2-trained
    model evaluated at top-1 scales its one expert by its probability (kept to reproduce old numbers)."""

    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the top-k
    *selection only* (the weights use the unbiased scores), moved after every optimizer step by this much
    towards balance: ``b_e += rate * sign(mean load - load_e)`` from the step's global token counts. 0
    disables it (DeepSeek-V3: 0.001); usually with ``balance_coef: 0``. The bias is a buffer, kept in
    checkpoints."""

    def validate(self, prefix: str) -> None:
        check_positive(f"{prefix}.balance_coef", self.balance_coef, allow_zero=True)
        check_choice(f"{prefix}.weights", self.weights, WEIGHT_RULES)
        check_positive(f"{prefix}.bias_update_rate", self.bias_update_rate, allow_zero=True)


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
    precomputed_TD: Tensor | None = None
    """Set when the router already ran the experts (CompeteSMoE competition): the layer output."""
    extra_value_TD: Tensor | None = None
    """An output the router computed itself with the experts on other inputs (VQMoE's discrete branch);
    ``extra_weight_T1 * extra_value_TD`` is added to the routed slots' output."""
    extra_weight_T1: Tensor | None = None
    """The weight of ``extra_value_TD`` (None: 1)."""
    extra_ids_TK: Tensor | None = None
    """The experts ``extra_value_TD`` used (counted in the routing metrics)."""

    @property
    def extra_TD(self) -> Tensor | None:
        if self.extra_value_TD is None or self.extra_weight_T1 is None:
            return self.extra_value_TD
        return self.extra_weight_T1.to(self.extra_value_TD.dtype) * self.extra_value_TD

    def all_ids(self) -> Tensor:
        """Every expert evaluation of this routing: the slots and the extra term's."""
        if self.extra_ids_TK is None:
            return self.expert_ids_TK
        return torch.cat([self.expert_ids_TK, self.extra_ids_TK], dim=-1)


class AllExperts(Protocol):
    """What a router that needs every expert's output (CompeteSMoE) is handed by the layer."""

    def forward_all(self, x_TD: Tensor) -> Tensor:  # returns out_TED
        ...


class Router(nn.Module):
    """Base class: subclasses set ``config_cls`` and implement ``route``."""

    config_cls: type = RouterConfig

    def __init__(
        self,
        cfg: RouterConfig,
        d_model: int,
        num_experts: int,
        layer_id: int = 0,
        seed: int = 0,
        train_k: int | None = None,
        eval_weights: str = "train",
        vocab_size: int = 0,
    ):
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts
        self.layer_id = layer_id
        self.seed = seed
        self.step = 0
        self.train_k = train_k
        """The layer's training k: what 'auto' weights are decided by (None: the k of each call)."""
        self.eval_weights = eval_weights
        """'train' (evaluation uses the training rule) or 'per_k' (the old convention, at evaluation only)."""
        self.vocab_size = vocab_size
        self.token_ids_T: Tensor | None = None
        """The input token ids of the current forward, set by the language model (routers that route by
        token id read them: StableMoE 'two_stage')."""
        # aux-loss-free balancing's per-expert selection bias (only when on: other checkpoints keep their keys)
        self.register_buffer("selection_bias_E", torch.zeros(num_experts) if cfg.bias_update_rate > 0 else None)

    def init_weights(self) -> None:
        """Re-initialise what the released code initialises differently from the language model's
        blanket init (N(0, 0.02) for every Linear and Embedding); called by the model after that init."""

    def after_optimizer_step(self, master) -> None:
        """Adjust parameters after an optimizer step through ``master`` (``get(p)`` / ``set(p, value)`` of
        the optimizer's own fp32 copy: under ZeRO that copy, not the module parameter, is what persists)."""

    @torch.no_grad()
    def update_selection_bias(self, counts_E: Tensor) -> None:
        """Aux-loss-free balancing: move the selection bias towards balance from the step's global load."""
        rate = self.cfg.bias_update_rate
        if rate > 0:
            counts_E = counts_E.to(self.selection_bias_E)
            self.selection_bias_E += rate * torch.sign(counts_E.mean() - counts_E)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def forward(self, x_TD: Tensor, k: int, experts: AllExperts | None = None) -> RouterOutput:
        out = self.route(x_TD, k, experts)
        out.metrics.update(routing_metrics(out.probs_TE, out.all_ids(), self.num_experts))
        return out

    def route(self, x_TD: Tensor, k: int, experts: AllExperts | None) -> RouterOutput:
        raise NotImplementedError

    def input_space_vectors(self) -> Tensor | None:
        """One vector per expert (or code) in the d_model input space, the direction the router scores a
        token along (collapse diagnostics): a linear router's rows, or expert embeddings of width D."""
        proj = getattr(self, "proj", None)
        if isinstance(proj, nn.Linear) and proj.out_features == self.num_experts:
            return proj.weight.detach().float()
        embed = getattr(self, "embeddings", None)
        if isinstance(embed, nn.Parameter) and embed.shape[-1] == self.d_model:
            return embed.detach().float()
        return None

    def weight_rule(self, k: int) -> str:
        """The concrete rule ('renorm' or 'prob') for the selected experts' weights at this call's k."""
        rule = self.cfg.weights
        if rule == "per_k" or (not self.training and self.eval_weights == "per_k"):
            return "prob" if k == 1 else "renorm"
        if rule == "auto":
            return "renorm" if (self.train_k or k) >= 2 else "prob"
        return rule

    def select(self, scores_TE: Tensor, k: int, probs_TE: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Top-k experts by score (plus the selection bias, when aux-loss-free balancing is on) and their
        combine weights under ``weight_rule(k)`` from the unbiased scores. ``probs_TE``: the scores'
        softmax when the caller has it (the 'prob' rule reads it instead of computing it again)."""
        if self.cfg.bias_update_rate <= 0:
            return topk_weights(scores_TE, k, self.weight_rule(k), probs_TE)
        ids_TK = (scores_TE.detach().float() + self.selection_bias_E).topk(k, dim=-1).indices
        if self.weight_rule(k) == "renorm":
            return softmax_last(scores_TE.gather(-1, ids_TK)), ids_TK
        return (softmax_last(scores_TE) if probs_TE is None else probs_TE).gather(-1, ids_TK), ids_TK

    @classmethod
    def flops_per_token(cls, cfg: RouterConfig, d_model: int, num_experts: int) -> float:
        """Forward FLOPs of routing one token (multiply-add = 2); a linear router by default."""
        return 2 * d_model * num_experts

    @classmethod
    def expected_slots(cls, cfg: RouterConfig, k: int, num_experts: int, training: bool) -> float:
        """Expected expert evaluations per token (what the expert FLOPs scale with)."""
        return k


def softmax_last(x: Tensor) -> Tensor:
    """``x.softmax(-1)`` for the short last dimensions of routing (experts, selected slots). torch's CPU
    kernel is slow on a short last dimension (8 experts x 1536 tokens: 4x slower forward and backward than
    along the first dimension), so on CPU the softmax runs along dim 0 of the transpose: the same function,
    equal up to rounding (summation order)."""
    if x.dim() == 2 and x.device.type == "cpu" and x.shape[-1] <= 64:
        return x.t().softmax(0).t()
    return x.softmax(-1)


def topk_weights(scores_TE: Tensor, k: int, rule: str, probs_TE: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k experts by score; combine weights by ``rule``.

    'renorm': softmax over the k selected scores (sums to 1; constantly 1 at k = 1, so the router then
    gets no gradient from the task loss). 'prob': each selected expert's probability under the softmax
    over *all* scores (Switch's top-1 rule; sums to less than 1); ``probs_TE`` is that softmax when the
    caller has it.
    """
    top_TK, ids_TK = scores_TE.topk(k, dim=-1)
    if rule == "renorm":
        return softmax_last(top_TK), ids_TK
    if rule == "prob":
        return (softmax_last(scores_TE) if probs_TE is None else probs_TE).gather(-1, ids_TK), ids_TK
    raise ValueError(f"unknown combine-weight rule {rule!r}; valid: 'renorm', 'prob'")


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
