"""CompeteSMoE: route by competition on scheduled steps, train the router to predict the winners.

Shape suffixes: T tokens, D model width, E experts, K routed slots per token, L MoE layers.

Default (``variant: v2025``) follows Fsoft-AIC/CompeteSMoE (arXiv 2505.13380), the released
``moe_model/model/moe/competesmoe.py`` and ``moe.py``:
  - ordinary step (and always at inference): linear router without bias, top-k, weights = softmax over
    the selected logits (at every k); balance loss ``E * sum_e f_e P_e`` on the **top-1** choice only, plus a router
    z-loss (0.001);
  - competition step: every expert runs on every token; response ``a = mean_D softplus(expert output)``;
    winners = top-k by response, weighted by their normalised responses ``a_i / sum_winners a_j``; the
    winners' already-computed outputs are the layer output (theirs re-runs the winners: same numbers);
  - competition losses: router loss ``MSE(softmax(logits), sg(softmax(a)))`` (mean over T x E),
    diversity ``sum_{i != j} cos(o_i, o_j) / K^2`` over the winners' outputs (mean over tokens), and the
    balance loss on the top-1 winner with ``P = softmax(a)`` (not detached); no router balance or z-loss;
  - schedule: nothing for the first ``warmup_fraction`` of training, then each layer competes on a step
    with probability ``compete_prob``; at most ``max_compete_layers`` layers per step: a layer's draw that
    lands on a full step moves to the nearest step with room (left first, then right), layers taken in
    order, as their schedule builder does. The schedule is a pure function of the run seed (theirs is
    drawn on rank 0 and broadcast), so every rank and a resumed run agree without saved state.
  Differences: their balance losses are per sequence (mean over the batch of per-sequence f and P); ours
  pools the micro-batch's tokens (the router does not see sequence boundaries). Their SFT used 4
  upcycled experts, top-2; the coefficients here are their defaults (0.01; z-loss 0.001). The router keeps
  PyTorch's default Linear init, as theirs (``init_weights``).

``variant: v2024`` follows giangdip2410/CompeteSMoE (arXiv 2402.02526; ``custom_layers_opt.py``): the
response is the L2 norm of the expert output; winners are weighted by a softmax over their norms; the
router target is that softmax placed at the winners' positions (0 elsewhere) and is **not** detached (so
the loss also trains the experts), scaled by ``router_loss_coef`` (0.05: their ``alpha * load_balance`` =
5 x 0.01 in the scripts). Their competition balance term (``--opt_blance``: ``E * sum_e f_e P_e`` over all K
winners with ``P = softmax(norms)``, ``f`` and ``P`` both divided by T*K, added to the router loss before
the scaling) is off in their text8/enwik8 scripts, so off by default here: ``competition_balance_coef``
equal to ``router_loss_coef`` (0.05) reproduces ``--opt_blance``. No warm-up, no per-step cap, no
diversity loss; competition on every training step (``compete_prob`` 1.0, as their scripts), otherwise an
independent draw per (seed, layer, step). Differences: on ordinary steps (only
with ``compete_prob`` < 1) ours adds the balance loss every router here trains with (``balance_coef``), where
theirs has none; their unsorted top-k that may permute the router distribution in the loss, and a stale
competition loss carried into a following ordinary step, are not reproduced.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...configtools import check_choice, check_positive, check_range
from .base import Router, RouterConfig, RouterOutput, router_z_loss, softmax_last, switch_balance_loss, with_balance

VARIANTS = ("v2025", "v2024")


# the released defaults of each variant, for every field left unset (None)
VARIANT_DEFAULTS = {
    "v2025": {
        "compete_prob": 0.05,
        "warmup_fraction": 0.05,
        "max_compete_layers": 3,
        "router_loss_coef": 0.01,
        "competition_balance_coef": 0.01,
    },
    "v2024": {
        "compete_prob": 1.0,
        "warmup_fraction": 0.0,
        "max_compete_layers": 0,
        "router_loss_coef": 0.05,
        "competition_balance_coef": 0.0,
    },
}


@dataclass
class CompeteSMoEConfig(RouterConfig):
    weights: str = "renorm"
    """Ordinary steps as both releases: softmax over the selected logits at every k (1 at k=1)."""
    variant: str = "v2025"
    """'v2025' (Fsoft-AIC/CompeteSMoE, default) or 'v2024' (giangdip2410/CompeteSMoE)."""
    compete_prob: float | None = None
    """Probability that a layer competes on a training step (unset: v2025 0.05; v2024 1.0, as its scripts)."""
    warmup_fraction: float | None = None
    """No competition in this fraction of training (of ``train.steps``) (unset: v2025 0.05; v2024 0)."""
    max_compete_layers: int | None = None
    """At most this many layers compete on one step, 0 = no cap (unset: v2025 3; v2024 0)."""
    router_loss_coef: float | None = None
    """Weight of the router loss (unset: v2025 0.01; v2024 alpha x load_balance = 5 x 0.01 = 0.05, which
    also scales its competition balance)."""
    diversity_coef: float = 0.01
    """'v2025': weight of the diversity loss on the winners' outputs (0 disables)."""
    competition_balance_coef: float | None = None
    """Weight of the balance loss on competition steps (unset: v2025 0.01, on the top-1 winner with
    P = softmax(responses); v2024 0, as its scripts without ``--opt_blance``: over all K winners with
    P = softmax(norms), and 0.05 = ``router_loss_coef`` reproduces that flag)."""
    z_loss_coef: float = 0.001
    """'v2025': router z-loss on ordinary steps."""

    def __post_init__(self) -> None:
        """Fill the unset fields with the variant's released defaults (an unknown variant is left for
        ``validate`` to name)."""
        for name, value in VARIANT_DEFAULTS.get(self.variant, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_choice(f"{prefix}.variant", self.variant, VARIANTS)
        check_range(f"{prefix}.compete_prob", self.compete_prob, 0.0, 1.0)
        check_range(f"{prefix}.warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        check_positive(f"{prefix}.max_compete_layers", self.max_compete_layers, allow_zero=True)
        for name in ("router_loss_coef", "diversity_coef", "competition_balance_coef", "z_loss_coef"):
            check_positive(f"{prefix}.{name}", getattr(self, name), allow_zero=True)


def diversity_loss(out_TKD: Tensor) -> Tensor:
    """``sum_{i != j} cos(o_i, o_j) / K^2`` per token, mean over tokens (0 for K = 1)."""
    k = out_TKD.shape[1]
    u = F.normalize(out_TKD.float(), dim=-1)
    sim_TKK = u @ u.transpose(1, 2)
    off_diag_T = sim_TKK.sum((1, 2)) - sim_TKK.diagonal(dim1=1, dim2=2).sum(-1)
    return (off_diag_T / (k * k)).mean()


def capped_schedule(hits_LN: Tensor, cap: int) -> list[bytearray]:
    """Place each layer's Bernoulli hits (``hits_LN[l, i]``: layer l drew a competition at step i) so that
    at most ``cap`` layers compete on a step (0: no cap). Layers in order; a hit on a full step moves to
    the nearest step to the left with room that this layer has not taken, else to the right; else it is
    dropped. A hit on a step this layer already holds merges with it."""
    L, n = hits_LN.shape
    used = [0] * n
    marks = [bytearray(n) for _ in range(L)]
    for layer in range(L):
        mark = marks[layer]
        for i in hits_LN[layer].nonzero().flatten().tolist():
            j = i
            if cap and used[i] >= cap:
                side = itertools.chain(range(i - 1, -1, -1), range(i + 1, n))
                j = next((c for c in side if used[c] < cap and not mark[c]), None)
            if j is not None and not mark[j]:
                mark[j] = 1
                used[j] += 1
    return marks


class CompetitionSchedule:
    """Which MoE layer competes on which step: nothing in the first ``warmup_fraction`` of training, then
    Bernoulli(prob) per layer and step, placed by ``capped_schedule``; drawn from the run seed."""

    def __init__(self, seed: int, num_layers: int, total_steps: int, prob: float, warmup_fraction: float, cap: int):
        self.warmup = int(warmup_fraction * total_steps)
        n = max(total_steps - self.warmup, 0)
        g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        self.marks = capped_schedule(torch.rand(num_layers, n, generator=g) < prob, cap)

    def competes(self, layer: int, step: int) -> bool:
        i = step - self.warmup
        return 0 <= i < len(self.marks[layer]) and bool(self.marks[layer][i])


class CompeteSMoERouter(Router):
    config_cls = CompeteSMoEConfig

    def __init__(self, cfg: CompeteSMoEConfig, d_model: int, num_experts: int, **kw):
        super().__init__(cfg, d_model, num_experts, **kw)
        self.proj = nn.Linear(d_model, num_experts, bias=cfg.variant == "v2024")
        self.schedule: CompetitionSchedule | None = None
        self.schedule_index = 0
        """This layer's position among the model's CompeteSMoE layers (set with the schedule)."""

    def init_weights(self) -> None:
        """Both releases keep PyTorch's default Linear init for the router (v2025 only re-initialises it with
        ``init_weight``, off by default): kaiming-uniform weights (and bias, v2024)."""
        self.proj.reset_parameters()

    @classmethod
    def expected_slots(cls, cfg, k, num_experts, training):
        # on a competition step every expert runs (the winners' outputs are reused, not recomputed)
        return cfg.compete_prob * num_experts + (1 - cfg.compete_prob) * k if training else k

    def competes(self) -> bool:
        if not self.training or self.cfg.compete_prob == 0:
            return False
        if self.schedule is not None:
            return self.schedule.competes(self.schedule_index, self.step)
        # no schedule (a router outside a trained model): an independent draw per (seed, layer, step)
        draw = random.Random(f"compete/{self.seed}/{self.layer_id}/{self.step}").random()
        return draw < self.cfg.compete_prob

    def route(self, x_TD, k, experts=None) -> RouterOutput:
        logits_TE = self.proj(x_TD)
        probs_TE = softmax_last(logits_TE.float())
        if not self.competes():
            weights_TK, ids_TK = self.select(logits_TE, k)
            losses: dict = {}
            if self.cfg.variant == "v2025":
                if self.cfg.balance_coef > 0:
                    losses["balance"] = self.cfg.balance_coef * switch_balance_loss(
                        probs_TE, ids_TK[:, :1], self.num_experts
                    )
                if self.cfg.z_loss_coef > 0:
                    losses["z"] = self.cfg.z_loss_coef * router_z_loss(logits_TE)
            else:
                losses = with_balance(self.cfg, probs_TE, ids_TK, self.num_experts, losses)
            return RouterOutput(weights_TK, ids_TK, probs_TE, losses)
        if experts is None:
            raise RuntimeError("CompeteSMoE competition needs the experts: call the router through an MoE layer")
        out_TED = experts.forward_all(x_TD)
        out = (
            self._compete_2025(out_TED, probs_TE, k)
            if self.cfg.variant == "v2025"
            else self._compete_2024(out_TED, probs_TE, k)
        )
        out.metrics["competed"] = torch.ones(())
        return out

    @staticmethod
    def _winners(out_TED: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> tuple[Tensor, Tensor]:
        winners_TKD = out_TED.gather(1, ids_TK.unsqueeze(-1).expand(-1, -1, out_TED.shape[-1]))
        return winners_TKD, (weights_TK.unsqueeze(-1).to(winners_TKD.dtype) * winners_TKD).sum(1)

    def _compete_2025(self, out_TED: Tensor, probs_TE: Tensor, k: int) -> RouterOutput:
        resp_TE = F.softplus(out_TED).mean(-1)
        top_TK, ids_TK = resp_TE.topk(k, dim=-1)
        weights_TK = top_TK / top_TK.sum(-1, keepdim=True)
        winners_TKD, output_TD = self._winners(out_TED, ids_TK, weights_TK)
        affinity_TE = softmax_last(resp_TE.float())
        c, losses = self.cfg, {}
        if c.router_loss_coef > 0:
            losses["compete_router"] = c.router_loss_coef * F.mse_loss(probs_TE, affinity_TE.detach())
        if c.diversity_coef > 0 and k > 1:
            losses["diversity"] = c.diversity_coef * diversity_loss(winners_TKD)
        if c.competition_balance_coef > 0:
            losses["balance"] = c.competition_balance_coef * switch_balance_loss(
                affinity_TE, ids_TK[:, :1], self.num_experts
            )
        return RouterOutput(weights_TK, ids_TK, probs_TE, losses, precomputed_TD=output_TD)

    def _compete_2024(self, out_TED: Tensor, probs_TE: Tensor, k: int) -> RouterOutput:
        norms_TE = out_TED.float().norm(dim=-1)
        top_TK, ids_TK = norms_TE.topk(k, dim=-1)
        weights_TK = softmax_last(top_TK)
        _, output_TD = self._winners(out_TED, ids_TK, weights_TK)
        target_TE = torch.zeros_like(norms_TE).scatter(-1, ids_TK, weights_TK)  # not detached, as theirs
        losses = {"compete_router": self.cfg.router_loss_coef * F.mse_loss(probs_TE, target_TE)}
        if self.cfg.competition_balance_coef > 0:  # --opt_blance
            # E * sum_e f_e P_e with f and P both over T*K (theirs): switch_balance_loss / K
            balance = switch_balance_loss(softmax_last(norms_TE), ids_TK, self.num_experts) / k
            losses["balance"] = self.cfg.competition_balance_coef * balance
        return RouterOutput(weights_TK.to(out_TED.dtype), ids_TK, probs_TE, losses, precomputed_TD=output_TD)
