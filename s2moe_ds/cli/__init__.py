"""The `s2moe` command: prepare data, train (one process; use the `deepspeed` launcher for more),
evaluate, sample, export, reshard, run experiment suites and write their report.

    s2moe prepare --config tiny
    s2moe train --config tiny train.steps=50                 # single process; --help lists the config
    deepspeed --num_gpus 2 --module s2moe_ds.train --config tiny
    s2moe eval runs/tiny
    s2moe sample runs/tiny --prompt "def "
    s2moe export runs/tiny --out tiny-export                 # consolidated, any expert-parallel layout
    s2moe reshard runs/ep2 runs/ep1 --nproc 1 model.moe.ep_size=1 train.grad_accum=2   # another layout
    s2moe experiment cpu-shakespeare                         # a suite of runs -> results/cpu-shakespeare
    s2moe report results/cpu-shakespeare                     # -> docs/results.md with plots

One thin module per command (``cli/<command>.py``: its arguments, then library calls); ``cli/errors.py``
turns how a command ended into its exit code (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from . import errors, experiment, export, prepare, report, reshard, sample, train
from . import eval as eval_cmd

COMMANDS: dict[str, ModuleType] = {
    "prepare": prepare,
    "train": train,
    "eval": eval_cmd,
    "sample": sample,
    "export": export,
    "reshard": reshard,
    "experiment": experiment,
    "report": report,
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `s2moe` parser and its subparsers, one per command, each filled by its module."""
    ap = argparse.ArgumentParser(
        prog="s2moe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subs = ap.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    parsers = {}
    for name, module in COMMANDS.items():
        parsers[name] = subs.add_parser(
            name,
            help=module.HELP,
            description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parsers[name])
    return ap, parsers


def command_parser(name: str) -> argparse.ArgumentParser:
    return build_parser()[1][name]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap, parsers = build_parser()
    if not argv:
        ap.print_help()
        return 0
    if argv[0] not in COMMANDS:
        ap.parse_args(argv)  # -h / --help: the help; an unknown command: argparse's error, exit 2
        return 2
    name, module = argv[0], COMMANDS[argv[0]]
    # intermixed: dotted overrides may come before or after the options
    args = parsers[name].parse_intermixed_args(argv[1:])
    args.argv = argv[1:]  # the words as given (experiment records its command line)
    prog = module.prog() if hasattr(module, "prog") else f"s2moe {name}"  # train names its rank
    return errors.run_command(prog, lambda: module.run(args), getattr(module, "OS_NOTE", ""))
