"""``s2moe reshard``: a checkpoint rewritten into another parallel layout, ahead of time."""

from __future__ import annotations

import argparse

from .argtypes import arg_int

HELP = "write a checkpoint into a new run directory in another parallel layout"
DESCRIPTION = (
    "Write a checkpoint (model and optimizer state) into a new run directory in another parallel layout: "
    "world size, expert-parallel size, backend or ZeRO stage. (train.resume=auto does this by itself when "
    "a run is resumed under another layout; this writes the converted checkpoint ahead of time.)"
)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("src", help="run directory, checkpoints/ folder or checkpoint tag folder")
    ap.add_argument("dst", help="new run directory")
    ap.add_argument(
        "--nproc", type=arg_int(1), default=1, help="processes of the new layout (>1: the deepspeed launcher)"
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        help="the new layout, e.g. model.moe.ep_size=1 model.moe.backend=local "
        "train.grad_accum=2 (keep the global batch)",
    )


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.reshard import reshard_run

    reshard_run(args.src, args.dst, args.nproc, args.overrides)
    return 0
