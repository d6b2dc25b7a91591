"""The report's tuning sections: a sweep's grid with each method's selected point, and the settings the
``tuned`` variants of a final suite took from it (``tuning.py`` holds the rule)."""

from __future__ import annotations

from .results import finished_runs
from .suite import Suite
from .tuning import selections, sweep_steps, tuning_source


def sweep_section(suite: Suite, folder) -> list[str]:
    """For a suite with grids: each method's points, their scores over the finished seeds, the pick."""
    chosen = selections(suite, folder)
    if not chosen:
        return []
    lines = [
        "## The tuning sweep",
        "",
        f"Each method's grid points on {suite.eval.split}, mean ± std over the seeds finished so far (of the "
        "seeds listed). The selection rule (`s2moe_ds/experiments/tuning.py`): the lowest mean at the training "
        "top-k, once every point of the method has all its seeds; **selected** marks it.",
        "",
        "| method | point | its overrides | mean ± std | seeds | |",
        "|---|---|---|---|---|---|",
    ]
    for method, sel in chosen.items():
        best = sel.best
        for p in sel.points:
            score = f"{p.mean:.4f} ± {p.std:.4f}" if len(p.scores) > 1 else f"{p.mean:.4f}" if p.scores else "–"
            mark = "**selected**" if best is not None and p.variant == best.variant else ""
            lines.append(
                f"| {method} | {p.variant} | `{' '.join(p.overrides)}` | {score} | {len(p.scores)}/{p.seeds} | {mark} |"
            )
    return [*lines, ""]


def tuned_section(suite: Suite, resolved: Suite) -> list[str]:
    """For a suite of ``tuned`` variants: the point each took, and the sweep's code."""
    tuned = [v for v in resolved.variants if v.tuned]
    if not tuned:
        return []
    sweep, folder = tuning_source(suite)
    commits = sorted({r.commit or "unrecorded" for r in finished_runs(folder, sweep, sweep_steps(folder), quiet=True)})
    lines = [
        "## Each method's setting",
        "",
        f"Every variant below runs at the grid point that the sweep `{sweep.name}` (runs in `{folder}`, made by "
        f"code {', '.join(commits)}) selected for its method on {sweep.eval.split}; the selection is repeated "
        "from those runs whenever this report or the suite runs. Its sweep table: the sweep's own report.",
        "",
        "| variant | tuned as | selected point | overrides taken |",
        "|---|---|---|---|",
    ]
    for v in tuned:
        point = sweep.variant(v.tuned_point)
        lines.append(f"| {v.name} | {v.tuned} | {v.tuned_point} | `{' '.join(point.point)}` |")
    return [*lines, ""]
