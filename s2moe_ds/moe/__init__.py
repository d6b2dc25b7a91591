"""Mixture-of-experts building blocks: routers, expert backends, the MoE layer and S2MoE."""

from .backends import BACKENDS, ExpertSpec, build_backend
from .layer import MoEConfig, MoELayer, MoEOutput, S2MoEConfig
from .routers import ROUTERS, RouterOutput, build_router
from .s2moe import S2MoELayer, build_moe_layer
from .uncertainty import GaussianNoise, info_nce

__all__ = [
    "BACKENDS",
    "ExpertSpec",
    "build_backend",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "S2MoEConfig",
    "ROUTERS",
    "RouterOutput",
    "build_router",
    "GaussianNoise",
    "S2MoELayer",
    "build_moe_layer",
    "info_nce",
]
