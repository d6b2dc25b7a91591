"""What the training loop does around a step that is not the step itself: the non-finite-step policy,
stop signals, and the hook interface tests use to inject faults (the production loop carries none).

A hook sees every micro-batch loss before its backward pass (``on_loss``) and every finished optimizer
step (``after_step``); ``stop_requested`` is asked once per step on every rank (a collective may run).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .trainer import StepResult, Trainer


class NonFiniteLoss(RuntimeError):
    """The run diverged: a loss, gradient or weight is not finite (exit code 3)."""


class Stopped(Exception):
    """Training stopped on SIGTERM/SIGINT after every rank saved a checkpoint (exit code 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Hook:
    """No-op defaults; subclasses override what they need."""

    def on_loss(self, trainer: Trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def stop_requested(self) -> bool:
        """True ends the run after this step (every rank must answer alike): the step is checkpointed and
        ``fit()`` returns; a stop signal raises ``Stopped`` instead."""
        return False


class NonFinitePolicy(Hook):
    """ZeRO 1/2 skips a step whose loss or gradient is not finite (DeepSpeed discards it, parameters
    unchanged) and counts it; more than ``train.max_skipped_steps`` in a row saves the last good state
    and stops. ZeRO 0 cannot skip: a non-finite loss stops the run at once."""

    def __init__(self):
        self.skipped = self.consecutive = 0

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        t = trainer.cfg.train
        if not result.finite and not trainer.can_skip:
            raise NonFiniteLoss(
                f"step {result.step}: training loss is {result.loss} (aux {result.aux}); the weights are diverging. "
                f"Lower train.lr, keep train.grad_clip > 0, or train in fp32; the last good checkpoint is in "
                f"{trainer.out_dir / 'checkpoints'} (resume with train.resume=auto)"
            )
        if not result.skipped:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        trainer.monitor.scalars(result.done, {"train/skipped_steps": self.skipped}, record="skip")
        trainer.say(
            f"[s2moe] step {result.done}: non-finite loss/gradient, step skipped ({self.consecutive} in a row, "
            f"{self.skipped} in total)"
        )
        if self.consecutive > t.max_skipped_steps:
            trainer.save(result.done)
            raise NonFiniteLoss(
                f"{self.consecutive} steps in a row had a non-finite loss or gradient (limit "
                f"train.max_skipped_steps={t.max_skipped_steps}); saved the last good state as checkpoint "
                f"step{result.done:07d}. Lower train.lr or check the data, then resume with train.resume=auto"
            )


class StopOnSignal(Hook):
    """SIGTERM / SIGINT (what SLURM sends before pre-emption, or Ctrl-C) only set a flag; at the end of
    the step every rank learns whether any rank was signalled, so all save together and exit cleanly.
    The handlers are installed when the hook is made (just before the loop)."""

    def __init__(self):
        self.name = None
        self.signum = 0
        self.agreed = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        self.signum = int(signum)

    def stop_requested(self) -> bool:
        """Whether any rank has had a signal, agreed by all ranks (``agreed`` keeps the answer: a signal
        arriving after this collective is acted on at the next step, never by one rank alone)."""
        flag = torch.tensor([float(self.signum)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.name:
            self.name = "a stop signal (on another rank)"
            self.signum = int(flag.item())
        self.agreed = bool(flag.item())
        return self.agreed

    def stopped(self, step: int) -> Stopped:
        return Stopped(
            f"{self.name} received: saved checkpoint step{step:07d} and stopped; continue with train.resume=auto",
            self.signum,
        )
