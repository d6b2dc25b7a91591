"""Paired comparisons over seeds: mean, spread and the Student-t 95% interval (scipy), and their verdicts."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (nan, nan with fewer than 2)."""
    from scipy import stats  # here, not at the top: only the report needs scipy (the GPU image lacks it)

    if len(values) < 2:
        return math.nan, math.nan
    m, sd = mean_std(values)
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return m - half, m + half


@dataclass
class Paired:
    """Per-seed differences of two settings over their shared seeds, with their mean, sd and 95% interval."""

    seeds: list[int]
    diffs: list[float]
    mean: float
    sd: float
    lo: float
    hi: float

    @classmethod
    def of(cls, seeds: list[int], diffs: list[float]) -> Paired:
        return cls(seeds, diffs, *mean_std(diffs), *t_interval(diffs))

    def text(self, unit: str = "%", digits: int = 2) -> str:
        spread = "" if math.isnan(self.sd) else f" ± {self.sd:.{digits}f}"
        ci = "" if math.isnan(self.hi) else f", 95% interval [{self.lo:+.{digits}f}{unit}, {self.hi:+.{digits}f}{unit}]"
        n = len(self.seeds)
        return f"{self.mean:+.{digits}f}{unit}{spread}{ci} over {n} paired seed{'s' if n > 1 else ''}"


def paired_gap(rows: list[dict], a: tuple[str, str], b: tuple[str, str], metric: str) -> Paired | None:
    """Per-seed relative gap ``100 (a / b - 1)`` of two (variant, inference) settings over their shared
    seeds. None when they share no seed."""
    by_seed = {(r["variant"], r["inference"], r["seed"]): r[metric] for r in rows}
    seeds = sorted({s for (v, i, s) in by_seed if (v, i) == a} & {s for (v, i, s) in by_seed if (v, i) == b})
    if not seeds:
        return None
    return Paired.of(seeds, [100 * (by_seed[(*a, s)] / by_seed[(*b, s)] - 1) for s in seeds])


def parity_verdict(g: Paired, rival: str, margin: float = 1.0) -> str:
    """'Within margin %' verdict on a paired gap (positive = worse), from its 95% interval."""
    within, outside = f"within {margin:g}%", f"outside {margin:g}%"
    if math.isnan(g.hi):
        return (f"{within} on the mean" if g.mean <= margin else outside) + " (one seed: no interval)"
    if g.hi < 0.0:
        return f"better than {rival}, the whole 95% interval too"
    if g.hi <= margin:
        return f"{within}, the whole 95% interval too"
    if g.lo > margin:
        return f"{outside}, the whole 95% interval too"
    if g.mean <= margin:
        return f"{within} on the mean, not established: the 95% interval reaches past {margin:g}%"
    return f"{outside} on the mean, not established: the 95% interval reaches below {margin:g}%"


def sign_verdict(g: Paired, lower: str, higher: str) -> str:
    """Which side of zero a paired difference's 95% interval lies on, in words."""
    if math.isnan(g.hi):
        return "one seed: no interval"
    if g.hi < 0:
        return lower
    if g.lo > 0:
        return higher
    return "not detected (the 95% interval contains 0)"
