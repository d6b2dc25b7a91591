"""Expert backend registry: name -> factory(spec, options).

``deepspeed`` and ``megablocks`` are both ``deepspeed.moe.layer.MoE`` instances with the same parameter
names (``DS_LAYOUT_BACKENDS``): their checkpoints are interchangeable.

Every backend implements ``forward(x_TD, ids_TK, weights_TK, num_out=None)``, ``forward_all(x_TD)`` and
``params_per_expert()``. Distributed backends import their frameworks lazily, so choosing ``local``
never imports DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...configtools import ConfigError
from .base import ExpertBackend, ExpertSpec
from .local import LocalDroplessBackend


def _local(spec: ExpertSpec, impl: str = "auto", **_) -> nn.Module:
    return LocalDroplessBackend(spec, impl=impl)


def _deepspeed(
    spec: ExpertSpec,
    ep_size: int = 1,
    ep_mode: str = "dropless",
    capacity_factor: float = 1.25,
    min_capacity: int = 4,
    impl: str = "auto",
    **_,
) -> nn.Module:
    from .deepspeed_ep import DeepSpeedEPBackend

    return DeepSpeedEPBackend(
        spec,
        ep_size=ep_size,
        mode=ep_mode,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        kernel=impl if ep_mode == "ragged" else "auto",
    )


def _megablocks(spec: ExpertSpec, ep_size: int = 1, **_) -> nn.Module:
    from .megablocks_dmoe import MegaBlocksBackend

    return MegaBlocksBackend(spec, ep_size=ep_size)


DS_LAYOUT_BACKENDS = ("deepspeed", "megablocks")

BACKENDS: dict[str, Callable[..., nn.Module]] = {
    "local": _local,
    "deepspeed": _deepspeed,
    "megablocks": _megablocks,
}


def build_backend(name: str, spec: ExpertSpec, **options) -> nn.Module:
    if name not in BACKENDS:
        raise ConfigError(f"config field 'moe.backend': unknown backend {name!r}; valid values: {', '.join(BACKENDS)}")
    return BACKENDS[name](spec, **options)


__all__ = ["BACKENDS", "DS_LAYOUT_BACKENDS", "ExpertBackend", "ExpertSpec", "build_backend"]
