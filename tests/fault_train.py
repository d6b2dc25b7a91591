"""The training entry point with the reliability tests' fault hooks installed; the production loop
(``python -m s2moe_ds.train``) carries none. Started like it, as the deepspeed launcher's script or a
plain ``python tests/fault_train.py --config ...``; the faults come from the environment:

    S2MOE_INJECT_NONFINITE_AT=3,4          the loss of those 0-based steps becomes NaN on every rank
    S2MOE_INJECT_FAULT=raise@R:S|hang@R:S  rank R raises / stops answering at step S
"""

from __future__ import annotations

import os
import sys
import time

import torch

from s2moe_ds.cli.train import main
from s2moe_ds.train import Hook


class NonFiniteLossAt(Hook):
    def __init__(self, steps: set[int]):
        self.steps = steps

    def on_loss(self, trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.steps else loss


class RankFault(Hook):
    def __init__(self, kind: str, rank: int, step: int):
        if kind not in ("raise", "hang"):
            raise ValueError(f"S2MOE_INJECT_FAULT kind {kind!r}: use raise@RANK:STEP or hang@RANK:STEP")
        self.kind, self.rank, self.step = kind, rank, step

    def on_loss(self, trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        if (trainer.rank, step) == (self.rank, self.step):
            if self.kind == "raise":
                raise RuntimeError(f"injected fault on rank {self.rank} at step {step}")
            time.sleep(10**6)
        return loss


def hooks_from_env() -> list[Hook]:
    hooks: list[Hook] = []
    steps = {int(v) for v in os.environ.get("S2MOE_INJECT_NONFINITE_AT", "").split(",") if v.strip()}
    if steps:
        hooks.append(NonFiniteLossAt(steps))
    spec = os.environ.get("S2MOE_INJECT_FAULT")
    if spec:
        kind, where = spec.split("@")
        rank, step = (int(v) for v in where.split(":"))
        hooks.append(RankFault(kind, rank, step))
    return hooks


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], hooks=hooks_from_env()))
