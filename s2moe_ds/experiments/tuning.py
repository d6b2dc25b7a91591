"""Per-method tuning: a sweep suite's grid points, the rule that picks one per method, and the suites whose
variants take the picked point (``tuned: <method>``).

The rule, fixed before any run (docs/experiments.md): among a method's grid points, the one with the
lowest mean of the suite's metric (bits per character) at its training top-k, over the sweep's seeds, on
the sweep's split (validation); ties go to the point listed first. Every point must have all its seeds
finished: a partial sweep selects nothing.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..configtools import ConfigError
from .results import Result, finished_runs, read_json
from .suite import Suite, find_suite, load_suite


@dataclass
class Point:
    """One grid point of a sweep: its variant, overrides and the scores of its finished seeds."""

    variant: str
    overrides: list[str]
    scores: list[float]
    seeds: int  # how many seeds the sweep runs it with

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0

    @property
    def complete(self) -> bool:
        return len(self.scores) == self.seeds


@dataclass
class Selection:
    """A method's points in grid order and the one the rule picks (None while any point is unfinished)."""

    method: str
    points: list[Point] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.points)

    @property
    def best(self) -> Point | None:
        if not self.complete:
            return None
        return min(self.points, key=lambda p: p.mean)  # min keeps the first of equal means


def train_k_score(run: Result) -> tuple[str, float]:
    """(metric name, value) of a run at its training top-k."""
    row = next(r for r in run.rows if r["inference"] == "train_k")
    return row["metric"], row[row["metric"]]


def sweep_steps(folder: Path) -> int | None:
    """The ``--steps`` the sweep folder's runs were made with (suite.json; None: the suite's own)."""
    meta = folder / "suite.json"
    return read_json(meta).get("steps") if meta.exists() else None


def selections(sweep: Suite, folder: Path) -> dict[str, Selection]:
    """Every gridded method of ``sweep`` with its points' scores from ``folder``'s finished runs."""
    runs = finished_runs(folder, sweep, sweep_steps(folder), quiet=True) if (folder / "runs").exists() else []
    out: dict[str, Selection] = {}
    for v in sweep.variants:
        if not v.method:
            continue
        scores = [train_k_score(r)[1] for r in runs if r.variant == v.name]
        point = Point(v.name, list(v.point), scores, len(sweep.variant_seeds(v)))
        out.setdefault(v.method, Selection(v.method)).points.append(point)
    return out


def tuning_source(suite: Suite) -> tuple[Suite, Path]:
    """The sweep suite a suite's ``tuning`` names, and its results folder."""
    sweep = load_suite(find_suite(suite.tuning.suite))
    return sweep, Path(suite.tuning.folder or Path("results") / sweep.name)


def resolve_tuned(suite: Suite) -> Suite:
    """A copy of ``suite`` whose ``tuned`` variants carry their method's selected grid point (its overrides
    before the variant's own). Refuses, naming what is missing, while the sweep is incomplete."""
    if not any(v.tuned for v in suite.variants):
        return suite
    sweep, folder = tuning_source(suite)
    chosen = selections(sweep, folder)
    resolved = copy.deepcopy(suite)
    for v in resolved.variants:
        if not v.tuned:
            continue
        sel = chosen.get(v.tuned)
        if sel is None:
            raise ConfigError(
                f"suite {suite.path}: variant {v.name!r} is tuned as {v.tuned!r}, which sweep {sweep.name!r} "
                f"does not grid; its gridded methods: {', '.join(chosen) or 'none'}"
            )
        best = sel.best
        if best is None:
            done = sum(len(p.scores) for p in sel.points)
            todo = sum(p.seeds for p in sel.points)
            raise ConfigError(
                f"suite {suite.path}: variant {v.name!r} takes {v.tuned!r}'s tuned point, but the sweep in "
                f"{folder} has {done} of its {todo} runs finished; finish it first (`s2moe experiment "
                f"{sweep.name}" + (f" --out {folder}" if suite.tuning.folder else "") + "`)"
            )
        v.overrides = [*best.overrides, *v.overrides]
        v.tuned_point = best.variant
    return resolved
