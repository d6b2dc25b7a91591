"""Training under the DeepSpeed engine.

- ``trainer.py``: ``Trainer`` (``build(cfg)``, ``train_step()``, ``evaluate()``, ``fit()``) and ``train(cfg)``;
- ``checkpointer.py``: ``Checkpointer``, which checkpoint to resume, loading/resharding it, saving;
- ``hooks.py``: the non-finite-step policy, stop signals, and the ``Hook`` interface (tests add faults);
- ``__main__.py``: ``python -m s2moe_ds.train`` / ``deepspeed --module s2moe_ds.train``, an entry point
  to the ``s2moe train`` command (``s2moe_ds/cli/train.py``: its parser and exit codes); the library
  itself never imports the command line.

    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml train.steps=200
    python -m s2moe_ds.train --config tiny
"""

from .checkpointer import Checkpointer, describe_os_error, global_batch_change
from .hooks import Hook, NonFiniteLoss, Stopped
from .trainer import StepResult, Trainer, train

__all__ = [
    "Checkpointer",
    "Hook",
    "NonFiniteLoss",
    "StepResult",
    "Stopped",
    "Trainer",
    "describe_os_error",
    "global_batch_change",
    "train",
]
