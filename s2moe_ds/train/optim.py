"""The optimizer and its learning-rate schedule: AdamW with decoupled weight decay on matrices only,
the groups split again for expert parallelism (ZeRO needs expert parameters in groups of their own), and
``LambdaLR`` over ``s2moe_ds.schedule.lr_at`` (a pure function of the step, so resumes continue it)."""

from __future__ import annotations

import torch

from ..config import Config
from ..schedule import lr_at


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices (>= 2 dims), none on vectors; expert-parallel parameters in groups of their own."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_optimizer(model: torch.nn.Module, cfg: Config):
    """(AdamW, a scheduler factory for ``deepspeed.initialize``). AdamW runs the kernel of
    ``train.optimizer_impl`` (fused by default: on CPU one pass per tensor instead of ~8)."""
    t = cfg.train
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[t.optimizer_impl]
    groups = parameter_groups(model, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), **impl)
    return optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, t) / t.lr)


def apply_schedule(scheduler, lr: float) -> None:
    """Set every group's learning rate from the config's ``lr`` and the schedule's position. A restored
    ``LambdaLR`` keeps the ``base_lrs`` of the run that saved it, so a resume with a new ``train.lr``
    would apply the new schedule times the old lr; the schedule itself (warm-up, min_lr) is ours, a pure
    function of the step, and is never restored."""
    scheduler.base_lrs = [lr for _ in scheduler.optimizer.param_groups]
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, value in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = value
    scheduler._last_lr = lrs
