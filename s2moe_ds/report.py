"""Write a results report (Markdown + matplotlib PNGs) from an experiment folder.

    s2moe report results/cpu-shakespeare                       # -> docs/results.md, docs/results/*.png
    s2moe report results/quick --out /tmp/report.md

Every number in the report is read from the folder's runs (``result.json`` and ``metrics.jsonl``);
the statements about the S2MoE claim are computed from those numbers, whichever way they come out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
from pathlib import Path

from .configtools import ConfigError
from .experiment import REPO_ROOT, fmt, mean_std, summary_markdown, summary_rows


def load_runs(folder: Path) -> list[dict]:
    """Finished runs in the order of the results table (the suite's variant order, then seed)."""
    rows = json.loads((folder / "results.json").read_text())
    runs = []
    for key in dict.fromkeys((r["variant"], r["seed"]) for r in rows):
        d = folder / "runs" / f"{key[0]}-seed{key[1]}"
        r = json.loads((d / "result.json").read_text())
        r["dir"] = d
        runs.append(r)
    if not runs:
        raise ConfigError(f"{folder} has no finished runs (no runs/*/result.json); run `s2moe experiment` first")
    return runs


def read_metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _variants(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["variant"] for r in runs))


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard table values)
T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def gap_interval(gaps: list[float]) -> tuple[float, float]:
    """95% confidence interval of the mean of paired per-seed gaps (nan, nan with fewer than 2 seeds)."""
    if len(gaps) < 2:
        return math.nan, math.nan
    m, sd = mean_std(gaps)
    df = len(gaps) - 1
    half = (T975[df - 1] if df <= len(T975) else 1.96) * sd / math.sqrt(len(gaps))
    return m - half, m + half


def paired_gap(rows: list[dict], a: tuple[str, str], b: tuple[str, str], metric: str) -> dict | None:
    """Per-seed relative gap ``100 (a / b - 1)`` of two (variant, inference) settings over their shared
    seeds: mean, sd, Student-t 95% interval. None when they share no seed."""
    by_seed = {(r["variant"], r["inference"], r["seed"]): r[metric] for r in rows}
    seeds = sorted({s for (v, i, s) in by_seed if (v, i) == a} & {s for (v, i, s) in by_seed if (v, i) == b})
    if not seeds:
        return None
    gaps = [100 * (by_seed[(*a, s)] / by_seed[(*b, s)] - 1) for s in seeds]
    m, sd = mean_std(gaps)
    lo, hi = gap_interval(gaps)
    return {"seeds": seeds, "gaps": gaps, "mean": m, "sd": sd, "lo": lo, "hi": hi}


def gap_text(g: dict) -> str:
    spread = "" if math.isnan(g["sd"]) else f" ± {g['sd']:.2f}"
    ci = "" if math.isnan(g["hi"]) else f", 95% interval [{g['lo']:+.2f}%, {g['hi']:+.2f}%]"
    return f"{g['mean']:+.2f}%{spread}{ci} over {len(g['seeds'])} paired seed{'s' if len(g['seeds']) > 1 else ''}"


def parity_verdict(g: dict, rival: str) -> str:
    """'Within 1%' verdict on a paired gap (positive = worse), from its 95% interval."""
    m, lo, hi = g["mean"], g["lo"], g["hi"]
    if math.isnan(hi):
        return ("within 1% on the mean" if m <= 1.0 else "outside 1%") + " (one seed: no interval)"
    if hi < 0.0:
        return f"better than {rival}, the whole 95% interval too"
    if hi <= 1.0:
        return "within 1%, the whole 95% interval too"
    if lo > 1.0:
        return "outside 1%, the whole 95% interval too"
    if m <= 1.0:
        return "within 1% on the mean, not established: the 95% interval reaches past 1%"
    return "outside 1% on the mean, not established: the 95% interval reaches below 1%"


def sign_verdict(g: dict, lower: str, higher: str) -> str:
    """Which side of zero a paired gap's 95% interval lies on, in words."""
    if math.isnan(g["hi"]):
        return "one seed: no interval"
    if g["hi"] < 0:
        return lower
    if g["lo"] > 0:
        return higher
    return "no difference established (the 95% interval contains 0)"


def claims(rows: list[dict]) -> list[str]:
    """Plain statements computed from the table: the S2MoE claims, the one-expert comparison under both
    weight conventions, dense vs MoE, where S2MoE loses, the ablations."""
    summ = {(s["variant"], s["inference"]): s for s in summary_rows(rows)}
    out = []
    metric = rows[0]["metric"]
    s2 = summ.get(("s2moe-top1", "train_k")) or next(
        (s for (v, i), s in summ.items() if v.startswith("s2moe") and i == "train_k"), None
    )
    smoe = summ.get(("smoe-top2", "train_k"))
    if s2 and smoe:
        g = paired_gap(rows, (s2["variant"], "train_k"), ("smoe-top2", "train_k"), metric)
        if g:
            lo, hi = g["lo"], g["hi"]
            ci = (
                ""
                if math.isnan(hi)
                else f", 95% interval of the mean gap [{lo:+.2f}%, {hi:+.2f}%] (Student t, {len(g['gaps']) - 1} df)"
            )
            spread = "" if math.isnan(g["sd"]) else f" ± {g['sd']:.2f}"
            out.append(
                f"**S2MoE claim (top-1 at inference within 1% {metric} of SMoE top-2):** S2MoE top-1 "
                f"{fmt(s2['values'])} vs SMoE top-2 {fmt(smoe['values'])}; paired gap over seeds {g['seeds']}: "
                f"{g['mean']:+.2f}%{spread}{ci} (positive = S2MoE worse). Verdict on this run: "
                f"**{parity_verdict(g, 'SMoE top-2')}**."
            )
        moe_cost = ""
        if s2.get("inference_moe_mflops_per_token") and smoe.get("inference_moe_mflops_per_token"):
            moe_cost = (
                f"; the MoE layers alone {s2['inference_moe_mflops_per_token']:.3f} vs "
                f"{smoe['inference_moe_mflops_per_token']:.3f}, "
                f"{100 * (1 - s2['inference_moe_mflops_per_token'] / smoe['inference_moe_mflops_per_token']):.1f}% less"
            )
        out.append(
            f"**Inference compute (the paper reports 28% less):** S2MoE top-1 {s2['inference_mflops_per_token']:.3f} "
            f"vs SMoE top-2 {smoe['inference_mflops_per_token']:.3f} MFLOPs/token for the whole model, "
            f"{100 * (1 - s2['inference_mflops_per_token'] / smoe['inference_mflops_per_token']):.1f}% less "
            f"(attention, embeddings and head included){moe_cost}; measured eval throughput "
            f"{statistics.fmean(s2['tokens_per_sec']):,.0f} vs {statistics.fmean(smoe['tokens_per_sec']):,.0f} "
            f"tokens/s. Training: {s2['train_mflops_per_token']:.3f} vs {smoe['train_mflops_per_token']:.3f} "
            f"MFLOPs/token (the two top-1 pathways do the expert work of top-2; S2MoE adds the gate and InfoNCE)."
        )
        one = []
        rule = {(r["variant"], r["inference"]): r.get("weights") for r in rows}
        for (v, i), s in summ.items():
            if i == "top1" and v != s2["variant"] and rule.get((v, i)) == "train":
                g1 = paired_gap(rows, (s2["variant"], "train_k"), (v, "top1"), metric)
                old = summ.get((v, "top1-perk"))
                old_txt = f"; under the old per-k rule it read {fmt(old['values'])}" if old else ""
                if g1:
                    one.append(
                        f"{v} at top-1 {fmt(s['values'])} (S2MoE {gap_text(g1)}: "
                        f"{sign_verdict(g1, 'S2MoE better', 'S2MoE worse')}{old_txt})"
                    )
        if one:
            out.append(
                "**The fair one-expert comparison** (each top-2-trained model run at top-1 with its training "
                "weight rule, i.e. its one expert at weight 1; gap = S2MoE top-1 relative to it, paired): "
                + "; ".join(one)
                + "."
            )
        better = sorted(
            (statistics.fmean(s["values"]), v, s["inference_mflops_per_token"])
            for (v, i), s in summ.items()
            if i == "train_k"
            and v != s2["variant"]
            and not v.startswith("s2moe")
            and statistics.fmean(s["values"]) < statistics.fmean(s2["values"])
        )
        if better:
            out.append(
                "Where S2MoE top-1 does **not** win: "
                + ", ".join(f"{v} ({m:.4f} at {f:.3f} MFLOPs/token)" for m, v, f in better)
                + f" score a lower mean {metric} at their training top-k."
            )
        else:
            out.append(f"No other router scored a lower mean {metric} than S2MoE top-1 at its training top-k.")
        ablations = []
        for (v, i), s in summ.items():
            if v.startswith("s2moe-") and v != s2["variant"] and i == "train_k":
                ga = paired_gap(rows, (v, "train_k"), (s2["variant"], "train_k"), metric)
                if ga:
                    ablations.append(
                        f"{v} {fmt(s['values'])} ({gap_text(ga)} vs S2MoE: "
                        f"{sign_verdict(ga, 'better than S2MoE', 'worse than S2MoE')})"
                    )
        if ablations:
            out.append(
                "**Ablations of S2MoE** (top-1, paired with s2moe-top1's seeds; positive = the ablation "
                "is worse): " + "; ".join(ablations) + "."
            )
    dense = summ.get(("dense", "train_k"))
    if dense:
        d = statistics.fmean(dense["values"])
        one = [
            (v, s)
            for (v, i), s in summ.items()
            if s["k"] == 1 and not v.startswith("dense") and s["pathways"] != "both" and not i.endswith("-perk")
        ]
        beat = [f"{v} ({statistics.fmean(s['values']):.4f})" for v, s in one if statistics.fmean(s["values"]) < d]
        lose = [f"{v} ({statistics.fmean(s['values']):.4f})" for v, s in one if statistics.fmean(s["values"]) >= d]
        out.append(
            f"Dense baseline: {fmt(dense['values'])} {metric} at {dense['inference_mflops_per_token']:.3f} "
            f"MFLOPs/token. At one expert per token (about the dense FLOPs), better than dense: "
            f"{', '.join(beat) or 'none'}; not better: {', '.join(lose) or 'none'}."
        )
        wide = summ.get(("dense-wide", "train_k"))
        if wide and s2:
            gw = paired_gap(rows, (s2["variant"], "train_k"), ("dense-wide", "train_k"), metric)
            out.append(
                f"Dense with the MoE models' total parameters (dense-wide): {fmt(wide['values'])} at "
                f"{wide['inference_mflops_per_token']:.3f} MFLOPs/token"
                + (f"; S2MoE top-1 relative to it: {gap_text(gw)}" if gw else "")
                + "."
            )
    return out


def collapse_claims(runs: list[dict]) -> list[str]:
    """S2MoE vs SMoE top-2 on the collapse diagnostics (per run: the mean over MoE layers), paired by seed."""

    def per_run(key: str) -> dict:
        vals = {}
        for r in runs:
            layer_vals = [la[key] for la in r["analysis"] if la.get(key) is not None]
            if layer_vals:
                vals[(r["variant"], r["seed"])] = statistics.fmean(layer_vals)
        return vals

    out = []
    for key, name, lower, higher in (
        (
            "routing_jacobian_effective_rank",
            "routing-Jacobian effective rank",
            "S2MoE lower (more collapsed)",
            "S2MoE higher (less collapsed)",
        ),
        ("jacobian_effective_rank", "whole-layer Jacobian effective rank", "S2MoE lower", "S2MoE higher"),
        (
            "expert_output_similarity",
            "expert-output cosine similarity",
            "S2MoE lower (less alike)",
            "S2MoE higher (more alike)",
        ),
    ):
        vals = per_run(key)
        seeds = sorted({s for (v, s) in vals if v == "s2moe-top1"} & {s for (v, s) in vals if v == "smoe-top2"})
        if len(seeds) < 2:
            continue
        diffs = [vals[("s2moe-top1", s)] - vals[("smoe-top2", s)] for s in seeds]
        m, sd = mean_std(diffs)
        lo, hi = gap_interval(diffs)
        g = {"mean": m, "sd": sd, "lo": lo, "hi": hi, "seeds": seeds}
        out.append(
            f"{name}: S2MoE {statistics.fmean(vals[('s2moe-top1', s)] for s in seeds):.3f} vs SMoE top-2 "
            f"{statistics.fmean(vals[('smoe-top2', s)] for s in seeds):.3f}; paired difference {m:+.3f} ± {sd:.3f}, "
            f"95% interval [{lo:+.3f}, {hi:+.3f}] over {len(seeds)} seeds: {sign_verdict(g, lower, higher)}."
        )
    if out:
        out.insert(
            0,
            "**Representation collapse (the paper: S2MoE collapses less)**, means over the 4 MoE layers, "
            "paired by seed:",
        )
    return out


def analysis_table(runs: list[dict]) -> str:
    lines = [
        "| variant | routing-Jacobian effective rank | Jacobian effective rank | expert-output cos sim | "
        "router vector \\|cos\\| | routing entropy (nats) | load imbalance (max/mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in _variants(runs):
        layers = [layer for r in runs if r["variant"] == v for layer in r["analysis"]]

        def col(key: str) -> str:
            vals = [layer[key] for layer in layers if layer.get(key) is not None]
            return f"{statistics.fmean(vals):.3f}" if vals else "–"

        lines.append(
            f"| {v} | {col('routing_jacobian_effective_rank')} | {col('jacobian_effective_rank')} | "
            f"{col('expert_output_similarity')} | {col('router_similarity')} | {col('routing_entropy')} | "
            f"{col('load_imbalance')} |"
        )
    return "\n".join(lines) + "\n"


ANALYSIS_TEXT = (
    "Measured on 512 validation tokens (Jacobians on 128 of them, drawn at random), each MoE layer as it was "
    "trained: its training top-k, and for S2MoE both pathways (one fixed noise draw) mixed by its gate. "
    "Means over layers and seeds; definitions in `s2moe_ds/analysis.py`. **Routing-Jacobian effective rank**: "
    "the effective rank of the part of the layer's Jacobian that goes through the routing weights (and "
    "S2MoE's gate) with the experts' outputs held fixed: the term the representation-collapse argument is "
    "about; low = the routing moves the representation along few directions. **Jacobian effective rank**: "
    "the same for the whole layer. **Expert-output cos sim**: how alike the experts' outputs are on the same "
    "tokens (1 = identical experts). **Router vector |cos|**: how alike the routers' per-expert directions "
    "are, in the d_model input space for every router (XMoE's 8-dim embeddings mapped back through its "
    "projection; VQMoE's codebook). Dense rows have only the whole-layer Jacobian."
)


def plots(runs: list[dict], img_dir: Path, metric: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    img_dir.mkdir(parents=True, exist_ok=True)
    made = []
    variants = _variants(runs)

    # validation curves, mean over seeds
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        curves = {}
        for r in runs:
            if r["variant"] == v:
                for rec in read_metrics(r["dir"]):
                    if rec["kind"] == "val" and f"val/{metric}" in rec:
                        curves.setdefault(rec["step"], []).append(rec[f"val/{metric}"])
        if curves:
            steps = sorted(curves)
            ax.plot(steps, [statistics.fmean(curves[s]) for s in steps], marker="o", ms=3, label=v)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric} (mean over seeds, training top-k)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img_dir / "val_curves.png", dpi=110)
    plt.close(fig)
    made.append("val_curves.png")

    # per-layer expert load over training (first seed of each MoE variant)
    moe_runs = []
    for v in variants:
        r = next(r for r in runs if r["variant"] == v)
        recs = [rec for rec in read_metrics(r["dir"]) if rec["kind"] == "moe"]
        layers = sorted(
            {k.split("/")[0] for rec in recs for k in rec if k.endswith("/tokens_per_expert")}, key=lambda s: int(s[5:])
        )
        if layers:
            moe_runs.append((v, r["seed"], recs, layers))
    if moe_runs:
        n_layers = max(len(x[3]) for x in moe_runs)
        fig, axes = plt.subplots(len(moe_runs), n_layers, figsize=(2.6 * n_layers, 1.7 * len(moe_runs)), squeeze=False)
        for row, (v, seed, recs, layers) in enumerate(moe_runs):
            for col, layer in enumerate(layers):
                key = f"{layer}/tokens_per_expert"
                pts = [(rec["step"], rec[key]) for rec in recs if key in rec]
                load = np.array([c for _, c in pts], dtype=float)
                load = load / load.sum(1, keepdims=True).clip(min=1e-9)
                ax = axes[row][col]
                ax.imshow(
                    load.T,
                    aspect="auto",
                    cmap="viridis",
                    vmin=0,
                    vmax=max(0.5, float(load.max())),
                    extent=(pts[0][0], pts[-1][0], load.shape[1] - 0.5, -0.5),
                    interpolation="nearest",
                )
                ax.set_title(f"{v} s{seed} {layer}", fontsize=7)
                ax.tick_params(labelsize=6)
                if col == 0:
                    ax.set_ylabel("expert", fontsize=7)
        fig.suptitle("share of routed tokens per expert over training steps (training routing)", fontsize=9)
        fig.tight_layout()
        fig.savefig(img_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        made.append("expert_load.png")

        # routing entropy and imbalance over training, mean over layers, first seed
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for v, _seed, recs, layers in moe_runs:
            for ax, name in zip(axes, ("routing_entropy", "load_imbalance")):
                pts = [
                    (rec["step"], statistics.fmean(rec[f"{lay}/{name}"] for lay in layers))
                    for rec in recs
                    if all(f"{lay}/{name}" in rec for lay in layers)
                ]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=v)
        for ax, name in zip(axes, ("routing entropy (nats), mean over layers", "load imbalance (max/mean)")):
            ax.set_xlabel("step")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img_dir / "routing_over_training.png", dpi=110)
        plt.close(fig)
        made.append("routing_over_training.png")

    # collapse diagnostics: expert-output similarity per layer; Jacobian spectra
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    with_moe = [
        v
        for v in variants
        if any(
            layer["expert_output_similarity"] is not None for r in runs if r["variant"] == v for layer in r["analysis"]
        )
    ]
    width = 0.8 / max(1, len(with_moe))
    n_layers = max(len(r["analysis"]) for r in runs)
    for j, v in enumerate(with_moe):
        rs = [r for r in runs if r["variant"] == v]
        sims = [statistics.fmean(r["analysis"][i]["expert_output_similarity"] for r in rs) for i in range(n_layers)]
        axes[0].bar(np.arange(n_layers) + (j - (len(with_moe) - 1) / 2) * width, sims, width, label=v)
    axes[0].set_xticks(np.arange(n_layers))
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        spec = np.mean([np.array(layer["jacobian_spectrum"]) for r in rs for layer in r["analysis"]], axis=0)
        axes[1].semilogy(np.arange(1, len(spec) + 1), spec, label=v)
    axes[0].set_xlabel("layer")
    axes[0].set_title("mean pairwise cosine similarity of expert outputs (same tokens)", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("singular value index")
    axes[1].set_title("FFN/MoE Jacobian spectrum (normalised, mean over layers, tokens, seeds)", fontsize=9)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(img_dir / "collapse.png", dpi=110)
    plt.close(fig)
    made.append("collapse.png")
    return made


def _git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(folder: Path, out: Path, command: str = "", notes: str = "") -> Path:
    import torch

    runs = load_runs(folder)
    rows = json.loads((folder / "results.json").read_text())
    metric = rows[0]["metric"]
    img_dir = out.parent / out.stem
    images = plots(runs, img_dir, metric)
    meta = json.loads((folder / "suite.json").read_text()) if (folder / "suite.json").exists() else {}
    configs = sorted({r["config"] for r in runs})
    steps = sorted({r["rows"][0]["step"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    rel = lambda p: Path(p).relative_to(out.parent) if Path(p).is_relative_to(out.parent) else p  # noqa: E731
    shown = command or meta.get("command", f"s2moe experiment {folder.name}")
    text = [
        f"# Results: {meta.get('suite', folder.name)}",
        "",
        meta.get("description", ""),
        "",
        "Produced by (from the repository root; the experiment command is resumable and runs only what is missing):",
        "",
        "```",
        shown,
        f"s2moe report {folder} --out {out}",
        "```",
        "",
    ]
    history = [c for c in meta.get("commands", []) if c != shown]
    if history:
        text += ["The runs were made, in this order, by:", "", "```", *history, "```", ""]
    text += [
        f"Runs: {len(runs)} ({len(_variants(runs))} variants; seeds used: {seeds}; the seeds column gives each "
        f"variant's count), {steps} training steps; configs "
        f"{', '.join(f'`{c}`' for c in configs)} with the suite's overrides (each run's exact overrides are in "
        f"`{folder.name}/runs/*/spec.json`). Machine: {platform.machine()}, torch {torch.__version__}, "
        f"runs made by code {', '.join(sorted({(r.get('code') or {}).get('commit', 'unrecorded') for r in runs}))} "
        f"(one code version per table: `code` in each run's result.json), report written at commit {_git_commit()}. "
        f"Wall and throughput times are from one shared, noisy machine with runs sharing its cores: treat them as rough.",
        "",
        f"## Validation {metric} (mean ± std over seeds) and inference cost",
        "",
        "`train_k` is each model at its training top-k; `topN` overrides the inference top-k; "
        "`-both` runs both S2MoE pathways at inference.",
        "",
        summary_markdown(rows),
        "## What the numbers say",
        "",
    ]
    text += [f"- {c}" for c in claims(rows)]
    if notes:
        text += ["", notes.strip()]
    text += [
        "",
        "## Representation collapse (at the end of training, on validation tokens)",
        "",
        ANALYSIS_TEXT,
        "",
        analysis_table(runs),
    ]
    text += [f"- {c}" for c in collapse_claims(runs)]
    text += ["", "## Plots", ""]
    text += [f"![{name}]({rel(img_dir / name)})" for name in images]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    return out


def main_report(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="s2moe report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    if not (folder / "results.json").exists():
        raise ConfigError(
            f"{folder} is not an experiment folder (no results.json); pass the --out folder "
            f"of `s2moe experiment`, e.g. results/cpu-shakespeare"
        )
    notes = Path(args.notes).read_text() if args.notes else ""
    out = write_report(folder, Path(args.out) if args.out else REPO_ROOT / "docs" / "results.md", args.command, notes)
    print(f"[s2moe report] wrote {out}")
    return 0
