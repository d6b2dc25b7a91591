"""The results table: results.json rows grouped per (variant, inference setting), as Markdown."""

from __future__ import annotations

import math
import statistics

from .stats import mean_std


def fmt(values: list[float], digits: int = 4) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def summary_rows(rows: list[dict]) -> list[dict]:
    """One entry per (variant, inference setting): values over seeds, in first-seen order."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["variant"], r["inference"]), []).append(r)
    out = []
    for (variant, inference), rs in groups.items():
        metric = rs[0]["metric"]
        out.append(
            {
                "variant": variant,
                "inference": inference,
                "k": rs[0]["k"],
                "pathways": rs[0]["pathways"],
                "metric": metric,
                "values": [r[metric] for r in rs],
                "seeds": [r["seed"] for r in rs],
                "inference_mflops_per_token": rs[0]["inference_mflops_per_token"],
                "inference_moe_mflops_per_token": rs[0].get("inference_moe_mflops_per_token"),
                "train_mflops_per_token": rs[0]["train_mflops_per_token"],
                "tokens_per_sec": [r["tokens_per_sec"] for r in rs],
                "train_wall_s": [r["train_wall_s"] for r in rs],
                "step": rs[0]["step"],
            }
        )
    return out


def split_of(rows: list[dict]) -> str:
    """The split the rows were measured on ('val' for rows written before it was recorded); several
    splits in one table are named together."""
    splits = list(dict.fromkeys(r.get("split", "val") for r in rows))
    return "/".join(splits) if splits else "val"


def summary_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No finished runs yet.\n"
    metric, split = rows[0]["metric"], split_of(rows)
    lines = [
        f"| variant | inference | {split} {metric} (mean ± std) | seeds | train MFLOPs/token | "
        f"inference MFLOPs/token | eval tokens/s | train wall s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary_rows(rows):
        how = f" (k={s['k']}" + (f", {s['pathways']}" if s["pathways"] else "") + ")" if s["k"] else ""
        lines.append(
            f"| {s['variant']} | {s['inference']}{how} "
            f"| {fmt(s['values'])} | {len(s['values'])} | {s['train_mflops_per_token']:.3f} "
            f"| {s['inference_mflops_per_token']:.3f} | {statistics.fmean(s['tokens_per_sec']):,.0f} "
            f"| {statistics.fmean(s['train_wall_s']):.0f} |"
        )
    return "\n".join(lines) + "\n"
