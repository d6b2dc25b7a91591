"""Expert backend registry: name -> (typed config class, factory(spec, config)).

A backend is grouped experts (``experts.py``, kernels in ``kernels.py``) behind a dispatcher
(``dispatch/``): ``local`` keeps every expert here; ``deepspeed`` and ``megablocks`` are the thin DeepSpeed
``MoE`` adapter (``deepspeed_adapter.py``) with DeepSpeed's padded/capacity or the ragged dispatch.

``deepspeed`` and ``megablocks`` are both ``deepspeed.moe.layer.MoE`` instances with the same parameter
names (``DS_LAYOUT_BACKENDS``): their checkpoints are interchangeable.

Every backend implements ``forward(x_TD, ids_TK, weights_TK, num_out=None)``, ``forward_all(x_TD)``,
``params_per_expert()`` and ``global_names()``: its expert parameters under one canonical name per global
expert (``w1#5``; ``global_names.py``), whence ``global_state_dict()`` / ``load_global_state_dict()``. Distributed backends import their frameworks lazily, so choosing ``local``
never imports DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from ...configtools import ConfigError, from_dict
from ..experts import ExpertSpec
from .config import BackendConfig, DeepSpeedConfig, LocalConfig, MegaBlocksConfig
from .local import LocalDroplessBackend


def _local(spec: ExpertSpec, cfg: LocalConfig) -> nn.Module:
    return LocalDroplessBackend(spec, kernel=cfg.impl)


def _deepspeed(spec: ExpertSpec, cfg: DeepSpeedConfig) -> nn.Module:
    from ..deepspeed_adapter import DeepSpeedEPBackend

    return DeepSpeedEPBackend(
        spec,
        ep_size=cfg.ep_size,
        mode=cfg.ep_mode,
        capacity_factor=cfg.capacity_factor,
        min_capacity=cfg.min_capacity,
        kernel=cfg.impl if cfg.ep_mode == "ragged" else "auto",
    )


def _megablocks(spec: ExpertSpec, cfg: MegaBlocksConfig) -> nn.Module:
    from .megablocks_dmoe import MegaBlocksBackend

    return MegaBlocksBackend(spec, ep_size=cfg.ep_size)


class Backend(NamedTuple):
    config_cls: type[BackendConfig]
    build: Callable[[ExpertSpec, BackendConfig], nn.Module]


DS_LAYOUT_BACKENDS = ("deepspeed", "megablocks")

BACKENDS: dict[str, Backend] = {
    "local": Backend(LocalConfig, _local),
    "deepspeed": Backend(DeepSpeedConfig, _deepspeed),
    "megablocks": Backend(MegaBlocksConfig, _megablocks),
}


def backend_entry(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"config field 'moe.backend': unknown backend {name!r}; valid values: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def build_backend(name: str, spec: ExpertSpec, config: BackendConfig | None = None, **options) -> nn.Module:
    """Backend ``name`` for experts ``spec``, from ``config`` (a typed config already checked at load:
    ``MoEConfig.backend_config()``) or from keyword ``options`` (checked here: a misspelt option is an
    error naming the valid ones)."""
    entry = backend_entry(name)
    if config is None:
        config = from_dict(entry.config_cls, options, prefix="moe")
        config.validate("moe", spec.num_experts)
        spec.validate()
    elif options:
        raise TypeError(f"build_backend takes a config or keyword options, not both (got {', '.join(options)})")
    return entry.build(spec, config)


__all__ = [
    "BACKENDS",
    "DS_LAYOUT_BACKENDS",
    "BackendConfig",
    "ExpertSpec",
    "backend_entry",
    "build_backend",
]
