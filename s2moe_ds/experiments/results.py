"""What a suite folder holds and who may share a table: each run's ``result.json`` (``Result``), the code
fingerprint, the tables rewritten after every run, and ``suite.json`` (the commands that made them).

Several ``--shard`` workers share one folder: every file here is written atomically (a reader never
sees half a file), and suite.json's read-modify-write holds a lock on ``.suite.lock`` in the folder.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..config import CONFIG_DIR, DS_CONFIG_DIR, PACKAGE_DIR
from ..configtools import ConfigError
from .suite import RunSpec, Suite, run_spec
from .tables import summary_markdown

PACKAGE = PACKAGE_DIR
ROOT = PACKAGE_DIR.parent
# a source checkout (not an installed package): its top-level configs are hashed too, and git asked
CHECKOUT = (ROOT / "setup.py").is_file()
# package files that cannot change a run's numbers (they read finished runs): editing them keeps old runs
# in the current code's table
NOT_NUMERIC = {
    "experiments/tables.py",
    "experiments/stats.py",
    "experiments/claims.py",
    "experiments/plots.py",
    "experiments/report.py",
    "experiments/tuning_report.py",
}


def code_version() -> dict:
    """The code a run is made with: a fingerprint of the package sources (all but ``NOT_NUMERIC``) and
    of the shipped configs and DeepSpeed configs (package data, plus the top-level user-facing copies in a
    source checkout), and the git commit (``-dirty`` when those files differ from it)."""
    files = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in NOT_NUMERIC]
    copies = (ROOT / "configs", ROOT / "ds_configs") if CHECKOUT else ()
    for folder in (CONFIG_DIR, DS_CONFIG_DIR, *copies):
        files += [p for p in folder.glob("*") if p.suffix in (".yaml", ".json")]
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return {"fingerprint": h.hexdigest()[:16], "commit": git_commit(dirty=True)}


def git_commit(dirty: bool = False) -> str:
    """HEAD's short hash (``-dirty`` when the package, configs or ds_configs differ from it), or 'unknown'
    (an installed package: no checkout to ask)."""
    if not CHECKOUT:
        return "unknown"
    run = lambda *args: subprocess.run(  # noqa: E731
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
    ).stdout.strip()
    try:
        commit = run("rev-parse", "--short", "HEAD") or "unknown"
        changed = dirty and run("status", "--porcelain", "--", "s2moe_ds", "configs", "ds_configs")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if changed else "")


def read_json(path: Path):
    """``json.loads`` of a file whose errors name the file (a run or table cut short, or edited by hand)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); it was cut short or "
            f"edited by hand: restore it, or move its run away to redo it"
        ) from None


def write_atomic(path: Path, text: str) -> None:
    """Several workers (``--shard``) rewrite the tables: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on the suite folder, for read-modify-writes shared by ``--shard`` workers."""
    with open(folder / ".suite.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Result:
    """A finished run (``runs/<variant>-seed<S>/result.json``). ``rows`` are the evaluation rows, one per
    inference setting, in the results.json format (the metric's value under the metric's name);
    ``analysis`` the per-layer collapse diagnostics (``s2moe_ds.analysis``)."""

    spec: RunSpec
    code: dict  # {"fingerprint", "commit"}; {} for runs made before it was recorded
    train_wall_s: float
    resumed: bool
    rows: list[dict]
    analysis: list[dict]
    dir: Path | None = field(default=None, compare=False)

    variant = property(lambda self: self.spec.variant)
    seed = property(lambda self: self.spec.seed)
    fingerprint = property(lambda self: self.code.get("fingerprint"))
    commit = property(lambda self: self.code.get("commit"))

    @classmethod
    def load(cls, path: Path) -> Result:
        r = read_json(path)
        keys = ("train_wall_s", "resumed", "rows", "analysis")
        return cls(RunSpec.from_record(r), r.get("code") or {}, *(r.get(k) for k in keys), dir=Path(path).parent)

    def to_json(self) -> str:
        d = {**self.spec.to_dict(), "code": self.code, "train_wall_s": self.train_wall_s, "resumed": self.resumed}
        return json.dumps({**d, "rows": self.rows, "analysis": self.analysis}, indent=1)

    def table_rows(self) -> list[dict]:
        """This run's rows as results.json rows."""
        head = {"variant": self.variant, "seed": self.seed, "train_wall_s": self.train_wall_s}
        return [{**head, **row, "code": self.commit or ""} for row in self.rows]


def finished_runs(out: Path, suite: Suite, steps: int | None = None, quiet: bool = False) -> list[Result]:
    """Every finished run in ``out`` that belongs to this suite: all of its variants and every seed found
    on disk (not only the seeds or variants of the command at hand, so a suite completed by several
    partial commands is tabled whole), in variant order then seed order. A run whose spec differs from
    what this suite (at ``steps``) would give that variant and seed is left out with a warning, so runs
    of another budget never share a mean with these. Of the rest, only the runs of one code version are
    kept (``code_version``: the current code's if any run has it, else the version most runs have)."""

    def warn(msg: str) -> None:
        if not quiet:
            print(f"[s2moe experiment] warning: {msg}", file=sys.stderr, flush=True)

    results = []
    for variant in suite.variants:
        found = []
        for f in (out / "runs").glob(f"{variant.name}-seed*/result.json"):
            seed_text = f.parent.name[len(variant.name) + len("-seed") :]
            if not seed_text.isdigit():
                continue  # another variant whose name extends this one
            r = Result.load(f)
            if not r.spec.same_run(run_spec(suite, variant, int(seed_text), steps)):
                warn(
                    f"{f.parent} was run with another spec than this suite's (overrides {r.spec.overrides}); "
                    f"left out of the table"
                )
                continue
            found.append(r)
        results += sorted(found, key=lambda r: r.seed)
    versions = [r.fingerprint for r in results]
    if len(set(versions)) > 1:
        current = code_version()["fingerprint"]
        keep = current if current in versions else max(set(versions), key=versions.count)
        for r in results:
            if r.fingerprint != keep:
                warn(
                    f"{r.variant}-seed{r.seed} was made by other code (commit {r.commit or 'unrecorded'}) "
                    f"than the table's; left out of it"
                )
        results = [r for r in results if r.fingerprint == keep]
    return results


def aggregate(out: Path, suite: Suite, steps: int | None = None) -> list[dict]:
    """Collect every finished run's rows and rewrite results.json / results.csv / results.md."""
    rows = [row for r in finished_runs(out, suite, steps) for row in r.table_rows()]
    write_atomic(out / "results.json", json.dumps(rows, indent=1))
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        tmp = out / f".results.csv.{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, out / "results.csv")
    write_atomic(out / "results.md", summary_markdown(rows))
    return rows


def record_command(out: Path, suite: Suite, steps: int | None, command: str, full_command: str = "") -> None:
    """suite.json: the suite (name and file), the one command that reproduces the whole table, and every
    command that has contributed runs to this folder (a time-boxed suite is often completed by partial
    commands). Safe against shard workers starting together: locked, and replaced atomically."""
    f = out / "suite.json"
    with folder_lock(out):
        old = read_json(f) if f.exists() else {}
        history = old.get("commands") or ([old["command"]] if old.get("command") else [])
        if command and command not in history:
            history.append(command)
        full = full_command or f"s2moe experiment {suite.name}" + (f" --steps {steps}" if steps else "")
        meta = {
            "suite": suite.name,
            "file": str(Path(suite.path).resolve()) if suite.path else "",
            "description": suite.description,
            "command": full,
            "commands": history,
            "seeds": suite.seeds,
            "steps": steps,
        }
        write_atomic(f, json.dumps(meta, indent=1))
