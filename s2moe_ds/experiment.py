"""Experiment suites: train and evaluate a list of configs over a seed list, resumably, into one table.

    s2moe experiment cpu-shakespeare                          # experiments/cpu-shakespeare.yaml
    s2moe experiment cpu-shakespeare --seeds 0 --steps 200 --only smoe-top2,s2moe --out results/quick
    s2moe experiment experiments/my_suite.yaml --nproc 2      # each run under the deepspeed launcher
    s2moe report results/cpu-shakespeare                      # docs/results.md and its plots

A suite file (YAML) names a base config, overrides shared by every run, the seeds, the evaluation
and the variants (each a config and/or overrides). Every (variant, seed) trains into
``<out>/runs/<variant>-seed<S>`` with ``train.resume=auto``, then is evaluated on the suite's split at
its training top-k and at each extra inference top-k, and analysed (``s2moe_ds.analysis``); its
``result.json`` marks it done. Rerunning the same command after an interruption skips finished runs
and resumes an unfinished one from its last checkpoint. ``results.json``, ``results.csv`` and
``results.md`` (mean and standard deviation over seeds) are rewritten after every run.

Every run records the code it ran (``code``: the git commit and a fingerprint of the package sources and
configs). A table only ever holds runs of one fingerprint (the current code's, else the one most runs
have), so runs from before a code fix never share a mean with runs after it; an unfinished run is not
resumed with other code. A variant may list its own ``seeds``; ``--shard I/N`` runs every N-th run of
the list (from the I-th), so N workers can share one suite folder.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import REPO_ROOT
from .configtools import ConfigError, arg_int, load_yaml

SUITE_DIR = REPO_ROOT / "experiments"
SUITE_KEYS = {"description", "base", "overrides", "seeds", "eval", "variants", "nproc"}
VARIANT_KEYS = {"name", "config", "overrides", "seeds"}
NOT_NUMERIC = {"report.py"}  # package files that cannot change a run's numbers (the report writer)


def code_version() -> dict:
    """The code a run is made with: a fingerprint of the package sources (all but ``NOT_NUMERIC``) and
    of configs/ and ds_configs/, and the git commit (``-dirty`` when those files differ from it)."""
    files = [p for p in (REPO_ROOT / "s2moe_ds").rglob("*.py") if p.name not in NOT_NUMERIC]
    files += list((REPO_ROOT / "configs").glob("*.yaml")) + list((REPO_ROOT / "ds_configs").glob("*.json"))
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "s2moe_ds", "configs", "ds_configs"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {"fingerprint": h.hexdigest()[:16], "commit": commit + ("-dirty" if dirty else "")}


def variant_seeds(suite: dict, variant: dict) -> list[int]:
    """A variant's own seed list, or the suite's (``--seeds`` replaces the suite's and filters a
    variant's own)."""
    own = variant.get("seeds")
    if own is None:
        return list(suite["seeds"])
    if suite.get("seeds_given"):
        return [s for s in own if s in suite["seeds"]]
    return list(own)


def find_suite(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"suite file {name!r} does not exist")
        return p
    path = SUITE_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(q.stem for q in SUITE_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown suite {name!r}; known suites: {', '.join(known)} (or pass a suite .yaml path)")
    return path


def load_suite(path: Path) -> dict:
    suite = load_yaml(path.read_text(), f"suite {path}") or {}
    unknown = set(suite) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"suite {path}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(SUITE_KEYS)}")
    if not suite.get("variants"):
        raise ConfigError(f"suite {path}: 'variants' must list at least one variant (name + config/overrides)")
    names = [v.get("name") for v in suite["variants"]]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"suite {path}: every variant needs a unique 'name'; got {names}")
    for v in suite["variants"]:
        bad = set(v) - VARIANT_KEYS
        if bad:
            raise ConfigError(
                f"suite {path}: variant {v['name']!r} has unknown key(s) {sorted(bad)}; valid keys: "
                f"{sorted(VARIANT_KEYS)}"
            )
    suite.setdefault("base", None)
    suite.setdefault("overrides", [])
    suite.setdefault("seeds", [0])
    suite.setdefault("nproc", 1)
    ev = suite.setdefault("eval", {})
    ev.setdefault("split", "val")
    ev.setdefault("extra_k", [1])
    ev.setdefault("analysis_tokens", 512)
    suite["name"] = path.stem
    return suite


def run_spec(suite: dict, variant: dict, seed: int, steps: int | None) -> dict:
    """Everything that decides a run's numbers: its config file and overrides, in order."""
    overrides = list(suite["overrides"]) + list(variant.get("overrides", [])) + [f"train.seed={seed}"]
    if steps:
        overrides.append(f"train.steps={steps}")
    return {
        "variant": variant["name"],
        "seed": seed,
        "config": variant.get("config") or suite["base"],
        "overrides": overrides,
        "nproc": suite["nproc"],
    }


def train_command(spec: dict, run_dir: Path) -> list[str]:
    args = [
        "--config",
        spec["config"],
        *spec["overrides"],
        f"train.out_dir={run_dir}",
        "train.resume=auto",
        "train.progress=false",
    ]
    if spec["nproc"] > 1:
        return ["deepspeed", "--num_gpus", str(spec["nproc"]), "--module", "s2moe_ds.train", *args]
    return [sys.executable, "-m", "s2moe_ds.train", *args]


def _train(spec: dict, run_dir: Path) -> float:
    cmd = train_command(spec, run_dir)
    print("+ " + shlex.join(cmd), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-15:]
        raise RuntimeError(
            f"training {spec['variant']} seed {spec['seed']} failed (exit {proc.returncode}); "
            f"last lines of {run_dir / 'train.log'}:\n" + "\n".join(tail)
        )
    return wall


def evaluate_run(run_dir: Path, suite: dict) -> tuple[list[dict], list[dict]]:
    """Rows (one per inference setting) and the per-layer analysis of a finished run."""
    from .analysis import analyse
    from .data.loader import WindowSampler
    from .data.prepare import load_split
    from .evaluate import evaluate_model, load_model
    from .flops import flops_per_token, moe_layer_flops

    torch.manual_seed(0)
    model, meta, info = load_model(str(run_dir))
    cfg = info["config"]
    if info["step"] != cfg.train.steps:
        raise RuntimeError(
            f"{run_dir}: the last checkpoint is step {info['step']} of {cfg.train.steps} (training "
            f"was stopped early); rerun the same command to resume it"
        )
    moe = cfg.model.moe
    is_moe = bool(cfg.model.moe_layer_ids())
    # (label, k, pathways, combine-weight convention): the training rule at every k, and at the other
    # top-k also the old per-k convention ('-perk'), so both conventions stay visible
    settings = [("train_k", moe.k if is_moe else None, None, "train")]
    if is_moe:
        for k in suite["eval"]["extra_k"]:
            if k != moe.k:
                settings += [(f"top{k}", k, None, "train"), (f"top{k}-perk", k, None, "per_k")]
        if moe.s2moe.enabled and suite["eval"].get("s2moe_both_pathways", True):
            settings.append((f"top{moe.k}-both", moe.k, "both", "train"))
    rows = []
    for label, k, pathways, weights in settings:
        if is_moe:
            model.set_inference(k=k, pathways=pathways or ("clean" if moe.s2moe.enabled else None), weights=weights)
        res = evaluate_model(model, meta, cfg.data.data_dir, suite["eval"]["split"])
        rows.append(
            {
                "inference": label,
                "k": res.k if is_moe else 0,
                "pathways": res.pathways if moe.s2moe.enabled and is_moe else "",
                "weights": weights if is_moe else "",
                "loss": res.loss,
                res.metric: res.value,
                "metric": res.metric,
                "tokens": res.tokens,
                "inference_mflops_per_token": res.inference_gflops_per_token * 1e3,
                "inference_moe_mflops_per_token": (
                    moe_layer_flops(cfg.model, training=False, k=k, pathways=res.pathways)
                    * len(cfg.model.moe_layer_ids())
                    / 1e6
                )
                if is_moe
                else 0.0,
                "train_mflops_per_token": flops_per_token(
                    cfg.model, training=True, batch_tokens=cfg.train.micro_batch_size * cfg.model.context
                )
                / 1e6,
                "tokens_per_sec": res.tokens_per_sec,
                "params_total": res.params_total,
                "params_active": res.params_active,
                "step": info["step"],
            }
        )
    if is_moe:  # inference routing statistics at the training top-k and rule, clean pathway
        model.set_inference(k=moe.k, pathways="clean" if moe.s2moe.enabled else None, weights="train")
    val = load_split(cfg.data.data_dir, suite["eval"]["split"], meta)
    n = max(1, suite["eval"]["analysis_tokens"] // cfg.model.context)
    x, _ = next(WindowSampler(val, cfg.model.context).sequential(n, 1))
    x = x.to(next(model.parameters()).device)
    return rows, analyse(model, x, jacobian_tokens=suite["eval"].get("jacobian_tokens", 128))


def finished_runs(out: Path, suite: dict, steps: int | None = None, quiet: bool = False) -> list[dict]:
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
    for variant in suite["variants"]:
        found = []
        for f in (out / "runs").glob(f"{variant['name']}-seed*/result.json"):
            seed_text = f.parent.name[len(variant["name"]) + len("-seed") :]
            if not seed_text.isdigit():
                continue  # another variant whose name extends this one
            r = json.loads(f.read_text())
            spec = {k: r.get(k) for k in ("variant", "seed", "config", "overrides", "nproc")}
            if spec != run_spec(suite, variant, int(seed_text), steps):
                warn(
                    f"{f.parent} was run with another spec than this suite's (overrides {spec['overrides']}); "
                    f"left out of the table"
                )
                continue
            found.append(r)
        results += sorted(found, key=lambda r: r["seed"])
    versions = [(r.get("code") or {}).get("fingerprint") for r in results]
    if len(set(versions)) > 1:
        current = code_version()["fingerprint"]
        keep = current if current in versions else max(set(versions), key=versions.count)
        for r, v in zip(results, versions):
            if v != keep:
                warn(
                    f"{r['variant']}-seed{r['seed']} was made by other code (commit "
                    f"{(r.get('code') or {}).get('commit', 'unrecorded')}) than the table's; left out of it"
                )
        results = [r for r, v in zip(results, versions) if v == keep]
    return results


def aggregate(out: Path, suite: dict, steps: int | None = None) -> list[dict]:
    """Collect every finished run's rows and rewrite results.json / results.csv / results.md."""
    rows = []
    for r in finished_runs(out, suite, steps):
        code = (r.get("code") or {}).get("commit", "")
        rows += [
            {"variant": r["variant"], "seed": r["seed"], "train_wall_s": r["train_wall_s"], **row, "code": code}
            for row in r["rows"]
        ]
    _write_atomic(out / "results.json", json.dumps(rows, indent=1))
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        tmp = out / f".results.csv.{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, out / "results.csv")
    _write_atomic(out / "results.md", summary_markdown(rows))
    return rows


def _write_atomic(path: Path, text: str) -> None:
    """Several workers (``--shard``) rewrite the tables: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_command(out: Path, suite: dict, steps: int | None, command: str, full_command: str = "") -> None:
    """suite.json: the suite, the one command that reproduces the whole table, and every command that
    has contributed runs to this folder (a time-boxed suite is often completed by partial commands)."""
    f = out / "suite.json"
    old = json.loads(f.read_text()) if f.exists() else {}
    history = old.get("commands") or ([old["command"]] if old.get("command") else [])
    if command and command not in history:
        history.append(command)
    full = full_command or f"s2moe experiment {suite['name']}" + (f" --steps {steps}" if steps else "")
    f.write_text(
        json.dumps(
            {
                "suite": suite["name"],
                "description": suite.get("description", ""),
                "command": full,
                "commands": history,
                "seeds": suite["seeds"],
                "steps": steps,
            },
            indent=1,
        )
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


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


def summary_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No finished runs yet.\n"
    metric = rows[0]["metric"]
    lines = [
        f"| variant | inference | val {metric} (mean ± std) | seeds | train MFLOPs/token | "
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


def prepare_data(suite: dict) -> None:
    from .config import load_config
    from .data.prepare import prepare_config

    cfg = load_config(suite["base"] or suite["variants"][0]["config"], suite["overrides"]).data
    if (Path(cfg.data_dir) / "meta.json").exists() or (REPO_ROOT / cfg.data_dir / "meta.json").exists():
        return
    print(f"[s2moe experiment] preparing {cfg.dataset} into {cfg.data_dir}", flush=True)
    prepare_config(cfg)


def run_suite(
    suite: dict,
    out: Path,
    steps: int | None = None,
    only: list[str] | None = None,
    command: str = "",
    full_command: str = "",
    shard: tuple[int, int] = (0, 1),
) -> list[dict]:
    variants = suite["variants"]
    if only:
        unknown = set(only) - {v["name"] for v in variants}
        if unknown:
            raise ConfigError(
                f"--only: unknown variant(s) {sorted(unknown)}; the suite has {', '.join(v['name'] for v in variants)}"
            )
        variants = [v for v in variants if v["name"] in only]
    out.mkdir(parents=True, exist_ok=True)
    record_command(out, suite, steps, command, full_command)
    prepare_data(suite)
    code = code_version()
    # seed-major: an interrupted or time-boxed suite has every variant on the first seeds
    seeds = sorted({s for v in variants for s in variant_seeds(suite, v)})
    todo = [(v, s) for s in seeds for v in variants if s in variant_seeds(suite, v)]
    todo = todo[shard[0] :: shard[1]]
    for n, (variant, seed) in enumerate(todo, 1):
        spec = run_spec(suite, variant, seed, steps)
        run_dir = out / "runs" / f"{variant['name']}-seed{seed}"
        spec_file, result_file = run_dir / "spec.json", run_dir / "result.json"
        old_code = None
        if spec_file.exists():
            old = json.loads(spec_file.read_text())
            old_code = old.pop("code", None)
            if old != spec:
                raise ConfigError(
                    f"{run_dir} was started with a different spec ({old}) than this command's "
                    f"({spec}); use another --out, or move that run away to restart it"
                )
        if result_file.exists():
            done_code = json.loads(result_file.read_text()).get("code") or {}
            note = (
                ""
                if done_code.get("fingerprint") == code["fingerprint"]
                else (
                    f" (by other code, commit {done_code.get('commit', 'unrecorded')}: not in this code's table; "
                    f"move the run away to redo it)"
                )
            )
            print(
                f"[s2moe experiment] {n}/{len(todo)} {variant['name']} seed {seed}: done earlier, skipped{note}",
                flush=True,
            )
            continue
        resumed = (run_dir / "checkpoints" / "latest").exists()
        if resumed and (old_code or {}).get("fingerprint") != code["fingerprint"]:
            raise ConfigError(
                f"{run_dir} was started by other code (commit {(old_code or {}).get('commit', 'unrecorded')}) "
                f"than this checkout's ({code['commit']}); resuming it would mix two code versions in "
                f"one run: move it away to restart it, or check out that commit to finish it"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps({**spec, "code": code}, indent=1))
        print(f"[s2moe experiment] {n}/{len(todo)} {variant['name']} seed {seed}", flush=True)
        wall = _train(spec, run_dir)
        rows, layers = evaluate_run(run_dir, suite)
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {**spec, "code": code, "train_wall_s": wall, "resumed": resumed, "rows": rows, "analysis": layers},
                indent=1,
            )
        )
        os.replace(tmp, result_file)
        for r in rows:
            print(
                f"[s2moe experiment]   {r['inference']}: val {r['metric']} {r[r['metric']]:.4f}, "
                f"{r['inference_mflops_per_token']:.3f} MFLOPs/token",
                flush=True,
            )
        aggregate(out, suite, steps)
    rows = aggregate(out, suite, steps)
    print(f"[s2moe experiment] results: {out / 'results.md'} ({len(rows)} rows)", flush=True)
    print((out / "results.md").read_text(), flush=True)
    return rows


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/2 and 1/2 for two workers), got {text!r}")
    return i, n


def main_experiment(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="s2moe experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("suite", help="a suite name from experiments/ or a suite .yaml path")
    ap.add_argument("--out", default=None, help="results folder (default: results/<suite>)")
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, replacing the suite's list (and filtering a variant's own list)",
    )
    ap.add_argument("--steps", type=arg_int(1), default=None, help="train.steps for every run (a shorter budget)")
    ap.add_argument("--only", default=None, help="comma-separated variant names to run")
    ap.add_argument("--nproc", type=arg_int(1), default=None, help="processes per run (>1 uses the deepspeed launcher)")
    ap.add_argument(
        "--shard",
        default=None,
        help="I/N: run every N-th run of the list from the I-th (N workers sharing one --out, e.g. 0/2 and 1/2)",
    )
    args = ap.parse_args(argv)
    shard = parse_shard(args.shard)
    suite = load_suite(find_suite(args.suite))
    if args.seeds is not None:
        try:
            suite["seeds"] = [int(s) for s in args.seeds.split(",")]
            suite["seeds_given"] = True
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {args.seeds!r}") from None
    if args.only is not None and not [v for v in args.only.split(",") if v.strip()]:
        raise ConfigError(f"--only must name at least one variant, e.g. --only smoe-top2,s2moe-top1; got {args.only!r}")
    if args.nproc:
        suite["nproc"] = args.nproc
    out = Path(args.out or REPO_ROOT / "results" / suite["name"]).resolve()
    os.chdir(REPO_ROOT)  # configs, data_dir and ds_config paths in the suite are relative to the repository
    command = "s2moe experiment " + shlex.join(sys.argv[2:] if argv is None else argv)
    # the same command without --seeds/--only: what reruns (or, resumed, completes) the whole table
    full = (
        [args.suite] + (["--out", args.out] if args.out else []) + (["--steps", str(args.steps)] if args.steps else [])
    )
    full += ["--nproc", str(args.nproc)] if args.nproc else []
    run_suite(
        suite,
        out,
        args.steps,
        args.only.split(",") if args.only else None,
        command,
        "s2moe experiment " + shlex.join(full),
        shard,
    )
    return 0
