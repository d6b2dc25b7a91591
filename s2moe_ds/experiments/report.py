"""Write a results report (Markdown + matplotlib PNGs) from an experiment folder.

    s2moe report results/cpu-shakespeare                       # -> docs/results.md, docs/results/*.png
    s2moe report results/quick --out /tmp/report.md

Every number in the report is read from the folder's runs (``result.json`` and ``metrics.jsonl``);
the statements are computed from those numbers, whichever way they come out, for the claims the suite
file lists (``claims:``; the suite file is the one recorded in the folder's suite.json, else
``experiments/<suite>.yaml``).
"""

from __future__ import annotations

import platform
import statistics
import sys
from pathlib import Path

from ..configtools import ConfigError
from .claims import claims, collapse_claims
from .plots import plots, variants_of
from .results import Result, git_commit, read_json
from .suite import SUITE_DIR, Suite, load_suite
from .tables import summary_markdown


def load_runs(folder: Path) -> list[Result]:
    """Finished runs in the order of the results table (the suite's variant order, then seed)."""
    rows = read_json(folder / "results.json")
    runs = [
        Result.load(folder / "runs" / f"{v}-seed{s}" / "result.json")
        for v, s in dict.fromkeys((r["variant"], r["seed"]) for r in rows)
    ]
    if not runs:
        raise ConfigError(f"{folder} has no finished runs (no runs/*/result.json); run `s2moe experiment` first")
    return runs


def suite_of(folder: Path, meta: dict) -> Suite | None:
    """The suite file the folder's runs were made from (whose ``claims:`` the report states), or None."""
    recorded = [Path(meta["file"])] if meta.get("file") else []
    for path in [*recorded, SUITE_DIR / f"{meta.get('suite', folder.name)}.yaml"]:
        if path.exists():
            return load_suite(path)
    return None


def analysis_table(runs: list[Result]) -> str:
    lines = [
        "| variant | routing-Jacobian effective rank | Jacobian effective rank | expert-output cos sim | "
        "router vector \\|cos\\| | routing entropy (nats) | load imbalance (max/mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants_of(runs):
        layers = [layer for r in runs if r.variant == v for layer in r.analysis]

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


def header(folder: Path, out: Path, runs: list[Result], meta: dict, command: str, notes_file: str = "") -> list[str]:
    """Title, the commands that reproduce the folder, and what the runs were."""
    import torch

    shown = command or meta.get("command", f"s2moe experiment {folder.name}")
    text = [f"# Results: {meta.get('suite', folder.name)}", "", meta.get("description", ""), ""]
    text += [
        "Produced by (from the repository root; the experiment command is resumable and runs only what is missing):"
    ]
    notes = f" --notes {notes_file}" if notes_file else ""
    text += ["", "```", shown, f"s2moe report {folder} --out {out}{notes}", "```", ""]
    history = [c for c in meta.get("commands", []) if c != shown]
    if history:
        text += ["The runs were made, in this order, by:", "", "```", *history, "```", ""]
    configs = ", ".join(f"`{c}`" for c in sorted({r.spec.config for r in runs}))
    commits = ", ".join(sorted({r.commit or "unrecorded" for r in runs}))
    text += [
        f"Runs: {len(runs)} ({len(variants_of(runs))} variants; seeds used: {sorted({r.seed for r in runs})}; the "
        f"seeds column gives each variant's count), {sorted({r.rows[0]['step'] for r in runs})} training steps; "
        f"configs {configs} with the suite's overrides (each run's exact overrides are in "
        f"`{folder.name}/runs/*/spec.json`). Machine: {platform.machine()}, torch {torch.__version__}, "
        f"runs made by code {commits} (one code version per table: `code` in each run's result.json), report "
        f"written at commit {git_commit()}. Wall and throughput times are from one shared, noisy machine with "
        f"runs sharing its cores: treat them as rough.",
        "",
    ]
    return text


def statements(rows: list[dict], runs: list[Result], suite: Suite | None) -> tuple[list[str], list[str]]:
    """The bullet lists of 'What the numbers say' and of the collapse section."""
    if suite is None:
        msg = "no suite file found for this folder (suite.json's `file`, or experiments/<suite>.yaml): no claims stated"
        print(f"[s2moe report] warning: {msg}", file=sys.stderr)
        return [f"- {msg[0].upper()}{msg[1:]}."], []
    return [f"- {c}" for c in claims(rows, suite)], [f"- {c}" for c in collapse_claims(runs, suite)]


def write_report(folder: Path, out: Path, command: str = "", notes_file: str = "") -> Path:
    """``docs/results.md``-style report of ``folder``; the Markdown of ``notes_file`` goes after the computed
    statements."""
    notes = Path(notes_file).read_text() if notes_file else ""
    runs = load_runs(folder)
    rows = read_json(folder / "results.json")
    meta = read_json(folder / "suite.json") if (folder / "suite.json").exists() else {}
    said, collapse = statements(rows, runs, suite_of(folder, meta))  # a bad suite file fails before the plots
    metric = rows[0]["metric"]
    img_dir = out.parent / out.stem
    images = plots(runs, img_dir, metric)
    rel = lambda p: Path(p).relative_to(out.parent) if Path(p).is_relative_to(out.parent) else p  # noqa: E731
    text = header(folder, out, runs, meta, command, notes_file)
    text += [f"## Validation {metric} (mean ± std over seeds) and inference cost", ""]
    text += [
        "`train_k` is each model at its training top-k; `topN` overrides the inference top-k; "
        "`-both` runs both S2MoE pathways at inference.",
        "",
        summary_markdown(rows),
        "## What the numbers say",
        "",
        *said,
    ]
    if notes:
        text += ["", notes.strip()]
    text += ["", "## Representation collapse (at the end of training, on validation tokens)", "", ANALYSIS_TEXT, ""]
    text += [analysis_table(runs), *collapse, "", "## Plots", ""]
    text += [f"![{name}]({rel(img_dir / name)})" for name in images]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    return out
