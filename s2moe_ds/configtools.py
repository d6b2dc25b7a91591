"""Typed configuration helpers: dataclasses from dicts, dotted overrides, errors that name the field.

Every config in the project is a dataclass. ``from_dict`` builds one from a plain dict (YAML/JSON),
rejecting unknown keys and wrong types with a ``ConfigError`` that names the dotted field path and
what would be valid. ``apply_overrides`` applies ``a.b.c=value`` strings from the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what would be right."""


def fail(field: str, message: str) -> None:
    raise ConfigError(f"config field '{field}': {message}")


def check_positive(field: str, value: float, allow_zero: bool = False) -> None:
    if value is None or not (value >= 0 if allow_zero else value > 0):
        fail(field, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_range(field: str, value: float, lo: float, hi: float) -> None:
    if value is None or not (lo <= value <= hi):
        fail(field, f"must be in [{lo}, {hi}], got {value!r}")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        fail(field, f"got {value!r}; valid values: {', '.join(map(repr, choices))}")


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; valid keys: {', '.join(valid)}"


def _coerce(field: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert ints to floats and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(field, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        fail(field, f"value {value!r} matches none of {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail(field, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=field)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            fail(field, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(f"{field}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail(field, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(field, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            fail(field, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(field, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"  # a quoted "false" (JSON configs, shell quoting) means false
        if not isinstance(value, bool):
            fail(field, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            fail(field, f"expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config field '{path}'{_suggest(key, list(fields))}")
        kwargs[key] = _coerce(path, hints[key], value)
    obj = cls(**kwargs)
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently: a
    second ``train:`` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"{self.source}: key {key!r} is given twice, on line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}; keep one (a repeated section replaces the "
                    f"earlier one entirely)"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str = "YAML") -> Any:
    """``yaml.safe_load`` that refuses duplicate keys, naming both lines of ``source``."""
    loader = _UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like 'section.field=value' (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty field name; expected 'section.field=value'")
    return key.split("."), load_yaml(raw, f"override {text!r}") if raw.strip() else ""


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars/lists)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data
