"""The report's statements, computed from the table whichever way the numbers come out. Which variants
each one compares comes from the suite file's ``claims:`` list (``suite.Claim``); this module only knows
the kinds of statement (``STATEMENTS``: one function per kind)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .results import Result
from .stats import Paired, paired_gap, parity_verdict, sign_verdict
from .suite import Claim, Suite
from .tables import fmt, summary_rows

mean = statistics.fmean


@dataclass
class Table:
    """The rows of a results table, their per-setting summaries, and the suite that names the variants."""

    rows: list[dict]
    suite: Suite

    def __post_init__(self):
        self.metric = self.rows[0]["metric"]
        self.summ = {(s["variant"], s["inference"]): s for s in summary_rows(self.rows)}
        self.weights = {(r["variant"], r["inference"]): r.get("weights") for r in self.rows}

    def get(self, variant: str, inference: str = "train_k") -> dict | None:
        return self.summ.get((variant, inference))

    def label(self, variant: str) -> str:
        return self.suite.variant(variant).display

    def gap(self, a: str, b: str, inference_b: str = "train_k") -> Paired | None:
        return paired_gap(self.rows, (a, "train_k"), (b, inference_b), self.metric)

    def heading(self, claim: Claim, default: str) -> str:
        return heading(claim, default, self.suite, self.metric)


def heading(claim: Claim, default: str, suite: Suite, metric: str = "") -> str:
    """The claim's ``name`` (else ``default``) with its placeholders filled in."""
    return (claim.name or default).format(
        metric=metric,
        margin=f"{claim.margin:g}",
        candidate=suite.variant(claim.candidate).display if claim.candidate else "",
        baseline=suite.variant(claim.baseline).display if claim.baseline else "",
    )


def parity(t: Table, c: Claim) -> list[str]:
    cand, base = t.get(c.candidate), t.get(c.baseline)
    g = t.gap(c.candidate, c.baseline) if cand and base else None
    if not g:
        return []
    a, b = t.label(c.candidate), t.label(c.baseline)
    df = len(g.seeds) - 1
    ci = "" if math.isnan(g.hi) else f", 95% interval of the mean gap [{g.lo:+.2f}%, {g.hi:+.2f}%] (Student t, {df} df)"
    spread = "" if math.isnan(g.sd) else f" ± {g.sd:.2f}"
    head = t.heading(c, "{candidate} within {margin}% {metric} of {baseline}")
    return [
        f"**{head}:** {a} {fmt(cand['values'])} vs {b} {fmt(base['values'])}; paired gap over seeds {g.seeds}: "
        f"{g.mean:+.2f}%{spread}{ci} (positive = {a} worse). Verdict on this run: "
        f"**{parity_verdict(g, b, c.margin)}**."
    ]


def compute(t: Table, c: Claim) -> list[str]:
    cand, base = t.get(c.candidate), t.get(c.baseline)
    if not (cand and base):
        return []
    a, b = t.label(c.candidate), t.label(c.baseline)
    less = lambda key: 100 * (1 - cand[key] / base[key])  # noqa: E731
    moe = ""
    if cand.get("inference_moe_mflops_per_token") and base.get("inference_moe_mflops_per_token"):
        key = "inference_moe_mflops_per_token"
        moe = f"; the MoE layers alone {cand[key]:.3f} vs {base[key]:.3f}, {less(key):.1f}% less"
    key = "inference_mflops_per_token"
    return [
        f"**{t.heading(c, 'Inference compute')}:** {a} {cand[key]:.3f} vs {b} {base[key]:.3f} MFLOPs/token "
        f"for the whole model, {less(key):.1f}% less (attention, embeddings and head included){moe}; measured "
        f"eval throughput {mean(cand['tokens_per_sec']):,.0f} vs {mean(base['tokens_per_sec']):,.0f} tokens/s. "
        f"Training: {cand['train_mflops_per_token']:.3f} vs {base['train_mflops_per_token']:.3f} MFLOPs/token"
        + (f" ({c.note})" if c.note else "")
        + "."
    ]


def one_expert(t: Table, c: Claim) -> list[str]:
    a, items = t.label(c.candidate), []
    for v in c.baselines:
        s, g = t.get(v, "top1"), t.gap(c.candidate, v, "top1")
        if not (t.get(c.candidate) and s and g and t.weights.get((v, "top1")) == "train"):
            continue
        old = t.get(v, "top1-perk")
        old_txt = f"; under the old per-k rule it read {fmt(old['values'])}" if old else ""
        items.append(
            f"{v} at top-1 {fmt(s['values'])} ({a} {g.text()}: {sign_verdict(g, f'{a} better', f'{a} worse')}{old_txt})"
        )
    if not items:
        return []
    return [
        f"**{t.heading(c, 'Top-2-trained models run at top-1')}** (a train/test mismatch, not the fair "
        f"one-expert control: that is SMoE trained top-1. Each model at top-1 with its training weight rule, "
        f"i.e. its one expert at weight 1; gap = {a} relative to it, paired): " + "; ".join(items) + "."
    ]


def rank(t: Table, c: Claim) -> list[str]:
    cand = t.get(c.candidate)
    if not cand:
        return []
    a, m = t.label(c.candidate), mean(cand["values"])
    better = sorted(
        (mean(s["values"]), v, s["inference_mflops_per_token"])
        for v in c.baselines
        if (s := t.get(v)) and mean(s["values"]) < m
    )
    if not better:
        return [f"No other router scored a lower mean {t.metric} than {a} at its training top-k."]
    return [
        f"{t.heading(c, 'Where {candidate} does **not** win')}: "
        + ", ".join(f"{v} ({x:.4f} at {f:.3f} MFLOPs/token)" for x, v, f in better)
        + f" score a lower mean {t.metric} at their training top-k."
    ]


def ablations(t: Table, c: Claim) -> list[str]:
    b, items = t.label(c.baseline), []
    for v in c.candidates:
        s, g = t.get(v), t.gap(v, c.baseline)
        if s and g:
            verdict = sign_verdict(g, f"better than {b}", f"worse than {b}")
            items.append(f"{v} {fmt(s['values'])} ({g.text()} vs {b}: {verdict})")
    if not items:
        return []
    head = t.heading(c, "Ablations of {baseline}")
    return [
        f"**{head}** (paired with {c.baseline}'s seeds; positive = the ablation is worse): " + "; ".join(items) + "."
    ]


def dense(t: Table, c: Claim) -> list[str]:
    base = t.get(c.baseline)
    if not base:
        return []
    d = mean(base["values"])
    one = [
        (v, s)
        for (v, i), s in t.summ.items()
        if s["k"] == 1
        and s["pathways"] != "both"
        and not i.endswith("-perk")
        and (not c.candidates or v in c.candidates)
    ]
    beat = [f"{v} ({mean(s['values']):.4f})" for v, s in one if mean(s["values"]) < d]
    lose = [f"{v} ({mean(s['values']):.4f})" for v, s in one if mean(s["values"]) >= d]
    return [
        f"{t.heading(c, 'Dense baseline')}: {fmt(base['values'])} {t.metric} at "
        f"{base['inference_mflops_per_token']:.3f} MFLOPs/token. At one expert per token (about the dense "
        f"FLOPs), better than {c.baseline}: {', '.join(beat) or 'none'}; not better: {', '.join(lose) or 'none'}."
    ]


def gap(t: Table, c: Claim) -> list[str]:
    base = t.get(c.baseline)
    if not (base and t.get(c.candidate)):
        return []
    g = t.gap(c.candidate, c.baseline)
    return [
        f"{t.heading(c, '{baseline}')} ({c.baseline}): {fmt(base['values'])} at "
        f"{base['inference_mflops_per_token']:.3f} MFLOPs/token"
        + (f"; {t.label(c.candidate)} relative to it: {g.text()}" if g else "")
        + "."
    ]


STATEMENTS: dict[str, Callable[[Table, Claim], list[str]]] = {
    "parity": parity,
    "compute": compute,
    "one_expert": one_expert,
    "rank": rank,
    "ablations": ablations,
    "dense": dense,
    "gap": gap,
}


def claims(rows: list[dict], suite: Suite) -> list[str]:
    """The statements of the suite's table claims (every kind but ``collapse``), in the suite's order."""
    t = Table(rows, suite)
    return [line for c in suite.claims if c.kind in STATEMENTS for line in STATEMENTS[c.kind](t, c)]


DIAGNOSTICS = (  # (analysis key, name, what 'lower' means, what 'higher' means)
    ("routing_jacobian_effective_rank", "routing-Jacobian effective rank", " (more collapsed)", " (less collapsed)"),
    ("jacobian_effective_rank", "whole-layer Jacobian effective rank", "", ""),
    ("expert_output_similarity", "expert-output cosine similarity", " (less alike)", " (more alike)"),
)


def collapse_claims(runs: list[Result], suite: Suite) -> list[str]:
    """The suite's ``collapse`` claims: candidate vs baseline on the collapse diagnostics (per run: the mean
    over MoE layers), paired by seed."""
    out = []
    for c in (c for c in suite.claims if c.kind == "collapse"):
        a, b = suite.variant(c.candidate).display, suite.variant(c.baseline).display
        lines = []
        for key, name, lower, higher in DIAGNOSTICS:
            vals = {(r.variant, r.seed): m for r in runs if (m := layer_mean(r, key)) is not None}
            seeds = sorted({s for (v, s) in vals if v == c.candidate} & {s for (v, s) in vals if v == c.baseline})
            if len(seeds) < 2:
                continue
            g = Paired.of(seeds, [vals[(c.candidate, s)] - vals[(c.baseline, s)] for s in seeds])
            lines.append(
                f"{name}: {a} {mean(vals[(c.candidate, s)] for s in seeds):.3f} vs {b} "
                f"{mean(vals[(c.baseline, s)] for s in seeds):.3f}; paired difference {g.mean:+.3f} ± {g.sd:.3f}, "
                f"95% interval [{g.lo:+.3f}, {g.hi:+.3f}] over {len(seeds)} seeds: "
                f"{sign_verdict(g, f'{a} lower{lower}', f'{a} higher{higher}')}."
            )
        if lines:
            n = sum(1 for la in next(r for r in runs if r.variant == c.candidate).analysis if la.get("kind") == "moe")
            head = heading(c, "Representation collapse", suite)
            out += [f"**{head}**, means over the {n} MoE layers, paired by seed:", *lines]
    return out


def layer_mean(run: Result, key: str) -> float | None:
    vals = [la[key] for la in run.analysis if la.get(key) is not None]
    return mean(vals) if vals else None
