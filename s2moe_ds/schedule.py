"""Learning-rate schedules: a pure function of the step (so a resumed run continues it exactly).

Every schedule warms up linearly over ``train.warmup_steps``, then:
- ``cosine``: cosine decay from ``lr`` to ``min_lr`` at ``train.steps``;
- ``linear``: straight line from ``lr`` to ``min_lr``;
- ``wsd`` (warm-up, stable, decay): ``lr`` until the last ``decay_fraction`` of the steps, then a straight
  line to ``min_lr``; the stable phase lets a run be extended (or branched into a decay) from any of its
  checkpoints, which is why it is used for continued training.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "wsd")


def lr_at(step: int, t) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under train config ``t``."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "wsd":
        decay_start = max(t.warmup_steps, t.steps - int(round(t.decay_fraction * t.steps)))
        if step < decay_start:
            return t.lr
        progress = min(1.0, (step - decay_start) / max(1, t.steps - decay_start))
        return t.lr - progress * (t.lr - t.min_lr)
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    if t.lr_schedule == "linear":
        return t.lr - progress * (t.lr - t.min_lr)
    return t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)
