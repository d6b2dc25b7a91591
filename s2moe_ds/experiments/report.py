"""Write a results report (Markdown + matplotlib PNGs) from an experiment folder.

    s2moe report results/cpu-shakespeare                       # -> results/cpu-shakespeare/report.md (+ report/*.png)
    s2moe report results/cpu-shakespeare --out docs/results.md # -> docs/results.md, docs/results/*.png

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
from .results import Result, finished_runs, git_commit, read_json
from .suite import SUITE_DIR, Suite, load_suite
from .tables import split_of, summary_markdown
from .tuning import resolve_tuned
from .tuning_report import sweep_section, tuned_section


def load_runs(folder: Path, suite: Suite | None, meta: dict) -> list[Result]:
    """The finished runs, read from each ``runs/*/result.json`` (not the cached results.json): with the suite
    file, every run that matches its spec (``results.finished_runs``: one code version, tuned variants at
    their selected points); without it, the runs results.json lists. In the suite's variant order, then seed."""
    if suite is not None:
        runs = finished_runs(folder, resolve_tuned(suite), meta.get("steps"))
    else:
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


def analysis_text(suite: Suite | None, split: str) -> str:
    ev = suite.eval if suite is not None else None
    tokens = (
        f"{ev.analysis_tokens} {split} tokens (Jacobians on {ev.jacobian_tokens}"
        if ev
        else f"{split} tokens (Jacobians"
    )
    return (
        f"Measured on {tokens} of them, drawn at random), each MoE layer as it was "
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


CLEAN_TEXT = (
    "S2MoE at inference runs the clean pathway alone, so its collapse figures are also taken on that path "
    "(the layer at its inference top-k, no noise), beside what the noise does on the same tokens: the mean "
    "cosine between a token and its noisy copy (**noise cos**) and the share of tokens whose top-1 expert "
    "differs between the two pathways (**moved**)."
)


def clean_path_table(runs: list[Result]) -> str:
    """S2MoE runs only: the clean-path collapse figures and the noise's effect (absent in older runs)."""
    keys = (
        ("clean_routing_jacobian_effective_rank", "clean path: routing-Jacobian effective rank"),
        ("clean_jacobian_effective_rank", "clean path: Jacobian effective rank"),
        ("noise_cos", "noise cos"),
        ("pathway_disagreement", "moved (top-1 expert differs)"),
    )
    lines = ["| variant | " + " | ".join(name for _, name in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for v in variants_of(runs):
        layers = [la for r in runs if r.variant == v for la in r.analysis if la.get("noise_cos") is not None]
        if layers:
            lines.append(
                f"| {v} | " + " | ".join(f"{statistics.fmean(la[k] for la in layers):.3f}" for k, _ in keys) + " |"
            )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


SMOKE_STEPS = 500  # below this a suite's models are far from trained: a pipeline check, not a comparison


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
    seeds = max(sum(r.variant == v for r in runs) for v in variants_of(runs))
    steps = max(r.rows[0]["step"] for r in runs)
    if seeds < 2 or steps < SMOKE_STEPS:
        why = "one seed per variant" if seeds < 2 else f"{steps} training steps"
        text += [
            f"**Not evidence:** {why}, so no difference below is established; this suite checks that the pipeline "
            "runs end to end.",
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
    statements, under a heading that marks it as hand-written."""
    notes = Path(notes_file).read_text() if notes_file else ""
    meta = read_json(folder / "suite.json") if (folder / "suite.json").exists() else {}
    suite = suite_of(folder, meta)
    runs = load_runs(folder, suite, meta)
    rows = [row for r in runs for row in r.table_rows()]
    said, collapse = statements(rows, runs, suite)  # a bad suite file fails before the plots
    metric, split = rows[0]["metric"], {"val": "validation"}.get(split_of(rows), split_of(rows))
    img_dir = out.parent / out.stem
    images = plots(runs, img_dir, metric)
    rel = lambda p: Path(p).relative_to(out.parent) if Path(p).is_relative_to(out.parent) else p  # noqa: E731
    text = header(folder, out, runs, meta, command, notes_file)
    if suite is not None:
        text += tuned_section(suite, resolve_tuned(suite)) + sweep_section(suite, folder)
    text += [f"## {split.capitalize()} {metric} (mean ± std over seeds) and inference cost", ""]
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
        text += ["", f"## Notes (hand-written: `{notes_file}`; every number above is computed from the runs)", ""]
        text += [notes.strip()]
    if any(r.analysis for r in runs):  # none where the suite turned the diagnostics off (a sweep)
        text += ["", f"## Representation collapse (at the end of training, on {split} tokens)", ""]
        text += [analysis_text(suite, split), "", analysis_table(runs)]
        clean = clean_path_table(runs)
        text += [CLEAN_TEXT, "", clean] if clean else []
        text += collapse
    text += ["", "## Plots", ""]
    text += [f"![{name}]({rel(img_dir / name)})" for name in images]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    return out
