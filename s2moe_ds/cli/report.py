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
        help="Markdown file to write (default: FOLDER/report.md); plots go to a folder of the same name without .md. "
        "A file there that is not an s2moe report is never replaced (see --force)",
    )
    ap.add_argument("--force", action="store_true", help="replace --out even when it is not an earlier s2moe report")
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
    out = Path(args.out) if args.out else folder / "report.md"
    if out.exists() and not args.force and not is_report(out):
        raise ConfigError(
            f"--out {out} exists and is not a report this command wrote (no '# Results:' title and "
            f"'s2moe report' line): it is left as it is; choose another --out, or pass --force to replace it"
        )
    out = report.write_report(folder, out, args.command, args.notes or "")
    print(f"[s2moe report] wrote {out}")
    return 0


def is_report(path: Path) -> bool:
    """Whether ``path`` is a report ``s2moe report`` wrote (its title and its reproducing command)."""
    try:
        text = path.read_text(errors="replace")
    except (OSError, IsADirectoryError):
        return False
    return text.startswith("# Results: ") and "\ns2moe report " in text
