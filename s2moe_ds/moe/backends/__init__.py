"""Expert backend registry. The distributed backends (DeepSpeed all-to-all, MegaBlocks) register here."""
from __future__ import annotations

from ...configtools import ConfigError
from .base import ExpertBackend, ExpertSpec
from .local import LocalDroplessBackend

BACKENDS: dict[str, type[ExpertBackend]] = {
    "local": LocalDroplessBackend,
}


def build_backend(name: str, spec: ExpertSpec, impl: str = "auto") -> ExpertBackend:
    if name not in BACKENDS:
        raise ConfigError(f"config field 'moe.backend': unknown backend {name!r}; valid values: {', '.join(BACKENDS)}")
    return BACKENDS[name](spec, impl=impl)


__all__ = ["BACKENDS", "ExpertBackend", "ExpertSpec", "build_backend"]
