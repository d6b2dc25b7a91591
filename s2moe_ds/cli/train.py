"""``s2moe train``, ``python -m s2moe_ds.train`` and ``deepspeed --module s2moe_ds.train``: one command
line, one behaviour (the launcher adds ``--local_rank=N``)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import shlex
import textwrap

from .errors import run_command

HELP = "train a model (one process; the deepspeed launcher for more)"
DESCRIPTION = """Train an MoE language model under the DeepSpeed engine.

    # 2 CPU processes (gloo) or 2 GPUs (nccl), ZeRO from the config's ds_config
    deepspeed --num_gpus 2 --module s2moe_ds.train --config tiny train.steps=200
    # one plain process
    s2moe train --config tiny                  # = python -m s2moe_ds.train --config tiny
    # resume the latest checkpoint of a run
    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml train.resume=auto
"""
OS_NOTE = " (while writing logs or checkpoints; published checkpoints are intact)"


def config_sections() -> list[tuple[str, type]]:
    """(dotted section, dataclass) of the config tree, walked from ``Config``'s defaults."""
    from ..config import Config

    def walk(prefix: str, obj) -> list[tuple[str, type]]:
        found = [(prefix, type(obj))] if prefix else []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                found += walk(f"{prefix}.{f.name}".lstrip("."), value)
        return found

    return walk("", Config())


def field_type(f) -> str:
    """A field's type as written in its dataclass (``from __future__ import annotations`` keeps it a string)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def sections_help() -> str:
    """The epilog of ``--help``: every config section, its fields, and where they are documented."""
    lines = ["config sections (override any field as SECTION.FIELD=VALUE; each shown as field=default (type)):"]
    for name, cls in config_sections():
        source = inspect.getsourcefile(cls) or cls.__module__
        where = source[source.rfind("s2moe_ds") :] if "s2moe_ds" in source else source
        lines.append(f"  {name:<16} {cls.__name__} in {where}")
        defaults = cls()
        fields = [
            f"{f.name}={getattr(defaults, f.name)!r} ({field_type(f)})"
            for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(getattr(defaults, f.name))
        ]
        lines += textwrap.wrap("; ".join(fields), 100, initial_indent=" " * 19, subsequent_indent=" " * 19)
    lines.append("  model.moe.router_args: the chosen router's config (s2moe_ds/moe/routers/*.py)")
    lines += [
        "",
        "Every field is documented in docs/training.md and in the docstring under it in the dataclass named",
        "above. --config takes a path or the name of a shipped config (tiny, shakespeare_s2moe, ...).",
    ]
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.epilog = sections_help()
    ap.add_argument(
        "--config", help="a YAML/JSON config file, or a shipped config by name (tiny); built-in defaults if omitted"
    )
    ap.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (the file, the overrides and the defaults: what config.yaml will hold) and exit",
    )
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.moe.router=xmoe")


def run(args: argparse.Namespace, hooks=()) -> int:
    """Load the config and fit; ``hooks`` are extra ``Hook`` objects for the loop (the tests' faults)."""
    from ..config import load_config
    from ..train.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    check_prepared(cfg.data.data_dir, args)
    train(cfg, hooks=hooks)
    return 0


def check_prepared(data_dir: str, args: argparse.Namespace) -> None:
    """A missing data folder, in one line naming the ``s2moe prepare`` command for this very command line."""
    from pathlib import Path

    from ..configtools import ConfigError

    if not (Path(data_dir) / "meta.json").exists():
        command = ["s2moe", "prepare", *(["--config", args.config] if args.config else [])]
        command += [o for o in args.overrides if o.startswith("data.")]
        raise ConfigError(f"no prepared data at {data_dir} (missing meta.json): run `{shlex.join(command)}` first")


def prog() -> str:
    return f"s2moe train [rank {os.environ.get('RANK', '0')}]"


def main(argv=None, hooks=()) -> int:
    """``python -m s2moe_ds.train``: the ``s2moe train`` command (same parser, same exit codes)."""
    from . import command_parser

    args = command_parser("train").parse_intermixed_args(argv)
    return run_command(prog(), lambda: run(args, hooks), OS_NOTE)
