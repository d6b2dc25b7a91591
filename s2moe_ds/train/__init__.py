"""Training under the DeepSpeed engine.

- ``trainer.py``: ``Trainer`` (``build(cfg)``, ``train_step()``, ``evaluate()``, ``fit()``) and ``train(cfg)``;
- ``checkpointer.py``: ``Checkpointer``, which checkpoint to resume, loading/resharding it, saving;
- ``hooks.py``: the non-finite-step policy, stop signals, and the ``Hook`` interface (tests add faults);
- ``main.py``: ``python -m s2moe_ds.train`` / ``s2moe train``, errors to exit codes.

    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml train.steps=200
    python -m s2moe_ds.train --config configs/tiny.yaml
"""

from .checkpointer import Checkpointer, describe_os_error, global_batch_change
from .hooks import Hook, NonFiniteLoss, Stopped
from .main import main
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
    "main",
    "train",
]
