"""``s2moe experiment``: a suite of runs, resumably, into one table."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..configtools import ConfigError
from ..experiments import runner
from .argtypes import arg_int

HELP = "train and evaluate a suite of runs into one table (resumable)"
DESCRIPTION = runner.__doc__


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("suite", help="a suite name from experiments/ or a suite .yaml path")
    ap.add_argument("--out", default=None, help="results folder (default: results/<suite>)")
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, replacing the suite's list (and filtering a variant's own list)",
    )
    ap.add_argument("--steps", type=arg_int(1), default=None, help="train.steps for every run (a shorter budget)")
    ap.add_argument("--only", default=None, help="comma-separated variant names to run")
    ap.add_argument("--nproc", type=arg_int(1), default=None, help="processes per run (>1 uses the deepspeed launcher)")
    ap.add_argument(
        "--data-source",
        default="",
        help="the corpus file to prepare the suite's data from (data.source), when data.data_dir does not hold "
        "it yet; not part of any run's spec (docs/data.md says where to get each corpus)",
    )
    ap.add_argument(
        "--shard",
        default=None,
        help="I/N: run every N-th run of the list from the I-th (N workers sharing one --out, e.g. 0/2 and 1/2)",
    )


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/2 and 1/2 for two workers), got {text!r}")
    return i, n


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..experiments.suite import find_suite, load_suite
    from ..experiments.tuning import resolve_tuned

    shard = parse_shard(args.shard)
    suite = resolve_tuned(load_suite(find_suite(args.suite)))
    if args.seeds is not None:
        suite.seeds, suite.seeds_given = parse_seeds(args.seeds), True
    if args.only is not None and not [v for v in args.only.split(",") if v.strip()]:
        raise ConfigError(f"--only must name at least one variant, e.g. --only smoe-top2,s2moe-top1; got {args.only!r}")
    if args.nproc:
        suite.nproc = args.nproc
    # configs and ds_configs named in the suite are found from any directory (package data); data.data_dir
    # and the other relative paths start here, in the training subprocesses too
    out = Path(args.out or Path("results") / suite.name).resolve()
    command = "s2moe experiment " + shlex.join(args.argv)
    # the same command without --seeds/--only: what reruns (or, resumed, completes) the whole table
    full = (
        [args.suite] + (["--out", args.out] if args.out else []) + (["--steps", str(args.steps)] if args.steps else [])
    )
    full += ["--nproc", str(args.nproc)] if args.nproc else []
    only = args.only.split(",") if args.only else None
    runner.run_suite(
        suite, out, args.steps, only, command, "s2moe experiment " + shlex.join(full), shard, args.data_source
    )
    return 0
