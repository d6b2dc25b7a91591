"""``s2moe report``: the Markdown report (and plots) of an experiment folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments import report

HELP = "write the Markdown report and plots of an experiment folder"
DESCRIPTION = report.__doc__


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("folder", help="an experiment results folder (s2moe experiment --out)")
    ap.add_argument(
        "--out",
        default=None,
        help="Markdown file to write (default: docs/results.md); plots go to a folder of the same name without .md",
    )
    ap.add_argument("--command", default="", help="the experiment command to quote at the top of the report")
    ap.add_argument(
        "--notes",
        default=None,
        help="a Markdown file inserted after the computed statements "
        "(e.g. what changed since an earlier run of the suite)",
    )


def run(args: argparse.Namespace) -> int:
    from ..configtools import ConfigError

    folder = Path(args.folder)
    if not (folder / "results.json").exists():
        raise ConfigError(
            f"{folder} is not an experiment folder (no results.json); pass the --out folder "
            f"of `s2moe experiment`, e.g. results/cpu-shakespeare"
        )
    out = report.write_report(folder, Path(args.out or "docs/results.md"), args.command, args.notes or "")
    print(f"[s2moe report] wrote {out}")
    return 0
