"""The report's figures (matplotlib PNGs), each from the runs' ``metrics.jsonl`` or ``result.json``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .results import Result


def read_metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def variants_of(runs: list[Result]) -> list[str]:
    return list(dict.fromkeys(r.variant for r in runs))


def plots(runs: list[Result], img_dir: Path, metric: str) -> list[str]:
    """Write every figure into ``img_dir``; the file names written, in report order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(img_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)

    save(val_curves(plt, runs, metric), "val_curves.png")
    moe_runs = moe_metrics(runs)
    if moe_runs:
        save(expert_load(plt, moe_runs), "expert_load.png")
        save(routing_over_training(plt, moe_runs), "routing_over_training.png")
    if any(r.analysis for r in runs):  # a suite with eval.analysis_tokens: 0 (a sweep) has no diagnostics
        save(collapse(plt, runs), "collapse.png")
    return made


def val_curves(plt, runs: list[Result], metric: str):
    """Validation curves of the in-loop evaluation (its first ``train.eval_iters`` batches), mean over seeds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants_of(runs):
        curves = {}
        for r in (r for r in runs if r.variant == v):
            for rec in read_metrics(r.dir):
                if rec["kind"] == "val" and f"val/{metric}" in rec:
                    curves.setdefault(rec["step"], []).append(rec[f"val/{metric}"])
        if curves:
            steps = sorted(curves)
            ax.plot(steps, [statistics.fmean(curves[s]) for s in steps], marker="o", ms=3, label=v)
    ax.set_xlabel("step")
    ax.set_ylabel(f"in-loop validation {metric} (a subset, mean over seeds)")
    ax.set_title("train.eval_iters batches of validation, training top-k: not the full split of the tables", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def moe_metrics(runs: list[Result]) -> list[tuple]:
    """(variant, seed, MoE metric records, layer names) of the first seed of each MoE variant."""
    out = []
    for v in variants_of(runs):
        r = next(r for r in runs if r.variant == v)
        recs = [rec for rec in read_metrics(r.dir) if rec["kind"] == "moe"]
        layers = sorted(
            {k.split("/")[0] for rec in recs for k in rec if k.endswith("/tokens_per_expert")}, key=lambda s: int(s[5:])
        )
        if layers:
            out.append((v, r.seed, recs, layers))
    return out


def expert_load(plt, moe_runs: list[tuple]):
    """Per-layer share of routed tokens per expert over training."""
    import numpy as np

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
    return fig


def routing_over_training(plt, moe_runs: list[tuple]):
    """Routing entropy and load imbalance over training, mean over layers, first seed."""
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
    return fig


def collapse(plt, runs: list[Result]):
    """Collapse diagnostics: expert-output similarity per layer; the Jacobian spectra."""
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    variants = variants_of(runs)
    with_moe = [
        v
        for v in variants
        if any(la["expert_output_similarity"] is not None for r in runs_of(runs, v) for la in r.analysis)
    ]
    width = 0.8 / max(1, len(with_moe))
    n_layers = max(len(r.analysis) for r in runs)
    for j, v in enumerate(with_moe):
        rs = runs_of(runs, v)
        sims = [statistics.fmean(r.analysis[i]["expert_output_similarity"] for r in rs) for i in range(n_layers)]
        axes[0].bar(np.arange(n_layers) + (j - (len(with_moe) - 1) / 2) * width, sims, width, label=v)
    axes[0].set_xticks(np.arange(n_layers))
    for v in (v for v in variants if any(r.analysis for r in runs_of(runs, v))):
        spec = np.mean([np.array(la["jacobian_spectrum"]) for r in runs_of(runs, v) for la in r.analysis], axis=0)
        axes[1].semilogy(np.arange(1, len(spec) + 1), spec, label=v)
    axes[0].set_xlabel("layer")
    axes[0].set_title("mean pairwise cosine similarity of expert outputs (same tokens)", fontsize=9)
    axes[1].set_xlabel("singular value index")
    axes[1].set_title("FFN/MoE Jacobian spectrum (normalised, mean over layers, tokens, seeds)", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return fig


def runs_of(runs: list[Result], variant: str) -> list[Result]:
    return [r for r in runs if r.variant == variant]
