"""Typed expert-backend configs: each backend's ``config_cls`` (as each router has one), with its rules.

The options are the flat ``model.moe`` fields of the same names (``impl`` is ``model.moe.backend_impl``).
Every backend takes all of them, so each value is checked whichever backend is chosen (switching backend
by an override never meets an unchecked value); each backend's class adds the rules of its own.
A loaded config's backend config is built and checked once, at load (``s2moe_ds.config.validate``);
``build_backend`` checks options given as keywords instead (tests, benchmarks). No DeepSpeed import here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...configtools import check_choice, check_positive, fail

MODES = ("dropless", "capacity", "ragged")
IMPLS = ("auto", "reference", "loop", "grouped_mm", "padded_bmm")
"""``model.moe.backend_impl`` of backend 'local': ``auto``, ``reference`` or a kernel of ``kernels.py``."""
RAGGED_KERNELS = ("auto", "loop", "grouped_mm")


@dataclass
class BackendConfig:
    """Options every backend is built from; the rules that hold for all of them."""

    impl: str = "auto"
    """``model.moe.backend_impl``: the local expert computation."""
    ep_size: int = 1
    ep_mode: str = "dropless"
    capacity_factor: float = 1.25
    min_capacity: int = 4

    def validate(self, prefix: str, num_experts: int, world_size: int | None = None) -> None:
        """``world_size``: where it is known (the trainer), the rule that needs it too."""
        check_choice(f"{prefix}.backend_impl", self.impl, IMPLS)
        check_positive(f"{prefix}.ep_size", self.ep_size)
        if num_experts % self.ep_size:
            fail(f"{prefix}.ep_size", f"must divide num_experts ({num_experts}), got {self.ep_size}")
        if world_size is not None and world_size % self.ep_size:
            fail(
                f"{prefix}.ep_size",
                f"the world size ({world_size}) must be a multiple of ep_size ({self.ep_size}); "
                f"launch {self.ep_size} x N processes or lower ep_size",
            )
        check_choice(f"{prefix}.ep_mode", self.ep_mode, MODES)
        check_positive(f"{prefix}.capacity_factor", self.capacity_factor)
        check_positive(f"{prefix}.min_capacity", self.min_capacity, allow_zero=True)


@dataclass
class LocalConfig(BackendConfig):
    """Backend 'local': every expert in this process; ``impl`` picks the computation."""

    def validate(self, prefix: str, num_experts: int, world_size: int | None = None) -> None:
        super().validate(prefix, num_experts, world_size)
        if self.ep_size > 1:
            fail(
                f"{prefix}.ep_size",
                f"is {self.ep_size} but backend 'local' keeps every expert in one process; "
                f"use backend 'deepspeed' (or 'megablocks' on CUDA) for expert parallelism",
            )


@dataclass
class DeepSpeedConfig(BackendConfig):
    """Backend 'deepspeed': experts sharded over ``ep_size`` ranks; ``ep_mode`` picks how tokens travel."""

    def validate(self, prefix: str, num_experts: int, world_size: int | None = None) -> None:
        super().validate(prefix, num_experts, world_size)
        if self.ep_mode == "ragged" and self.impl not in RAGGED_KERNELS:
            fail(
                f"{prefix}.backend_impl",
                f"is {self.impl!r} but ep_mode 'ragged' computes its experts with auto, loop or grouped_mm",
            )


@dataclass
class MegaBlocksConfig(BackendConfig):
    """Backend 'megablocks': always ragged (dropless), MegaBlocks' grouped GEMM; ``impl`` is not read."""

    def validate(self, prefix: str, num_experts: int, world_size: int | None = None) -> None:
        super().validate(prefix, num_experts, world_size)
        if self.ep_mode == "capacity":
            fail(
                f"{prefix}.ep_mode",
                "is 'capacity' but backend 'megablocks' is dropless (ragged) only; use "
                "backend 'deepspeed' for capacity mode",
            )
