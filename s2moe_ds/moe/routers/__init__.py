"""Router registry: name -> router class (its ``config_cls`` is the config dataclass).

Adding a router is one new module and one line here.
"""

from __future__ import annotations

from ...configtools import ConfigError, from_dict
from .base import Router, RouterConfig, RouterOutput
from .competesmoe import CompeteSMoERouter
from .cosine import StableMoERouter, XMoERouter
from .smoe import SMoERouter
from .vqmoe import VQMoERouter

ROUTERS: dict[str, type[Router]] = {
    "smoe": SMoERouter,
    "xmoe": XMoERouter,
    "stablemoe": StableMoERouter,
    "competesmoe": CompeteSMoERouter,
    "vqmoe": VQMoERouter,
}


def router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise ConfigError(f"config field 'moe.router': unknown router {name!r}; valid values: {', '.join(ROUTERS)}")
    return ROUTERS[name]


def parse_router_config(name: str, args: dict | None, prefix: str = "moe.router_args") -> RouterConfig:
    """The config dataclass of router ``name`` from a dict of its fields (unknown fields and wrong types
    refused; its rules are ``validate``'s, applied once at load)."""
    return from_dict(router_class(name).config_cls, args or {}, prefix=prefix)


def router_config(name: str, args: dict | None, prefix: str = "moe.router_args") -> RouterConfig:
    """Build and validate the config dataclass of router ``name`` from a dict of its fields."""
    cfg = parse_router_config(name, args, prefix)
    cfg.validate(prefix)
    return cfg


def build_router(
    name: str, args: dict | RouterConfig | None, d_model: int, num_experts: int, **router_options
) -> Router:
    """``args``: a typed config already checked at load (``MoEConfig.router_config()``), or a dict of the
    router's fields, checked here. ``router_options``: the ``Router`` constructor's keywords (layer_id,
    seed, train_k, eval_weights, vocab_size)."""
    cfg = args if isinstance(args, RouterConfig) else router_config(name, args)
    return router_class(name)(cfg, d_model, num_experts, **router_options)


__all__ = [
    "ROUTERS",
    "Router",
    "RouterConfig",
    "RouterOutput",
    "build_router",
    "parse_router_config",
    "router_class",
    "router_config",
]
