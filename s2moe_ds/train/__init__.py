"""Training under the DeepSpeed engine.

- ``trainer.py``: ``Trainer`` (``build(cfg)``, ``train_step()``, ``evaluate()``, ``fit()``) and ``train(cfg)``;
- ``checkpointer.py``: ``Checkpointer``, which checkpoint to resume, loading/resharding it, saving;
- ``hooks.py``: the non-finite-step policy, stop signals, and the ``Hook`` interface (tests add faults);
- ``main``: ``python -m s2moe_ds.train`` / ``deepspeed --module s2moe_ds.train``, the ``s2moe train``
  command (its parser and exit codes live in ``s2moe_ds/cli``).

    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml train.steps=200
    python -m s2moe_ds.train --config tiny
"""

from .checkpointer import Checkpointer, describe_os_error, global_batch_change
from .hooks import Hook, NonFiniteLoss, Stopped
from .trainer import StepResult, Trainer, train


def main(argv=None, hooks=()) -> int:
    """``s2moe train`` with the same arguments and exit codes; ``hooks``: extra ``Hook`` objects for the loop
    (the tests' fault injection)."""
    from ..cli.train import main as train_main

    return train_main(argv, hooks=hooks)


__all__ = [
    "Checkpointer",
    "Hook",
    "NonFiniteLoss",
    "StepResult",
    "Stopped",
    "Trainer",
    "describe_os_error",
    "global_batch_change",
    "main",
    "train",
]
