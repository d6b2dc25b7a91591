"""Experiment suites: train and evaluate a list of configs over a seed list, resumably, into one table.

    s2moe experiment cpu-shakespeare                          # experiments/cpu-shakespeare.yaml
    s2moe experiment cpu-shakespeare --seeds 0 --steps 200 --only smoe-top2,s2moe --out results/quick
    s2moe experiment experiments/my_suite.yaml --nproc 2      # each run under the deepspeed launcher
    s2moe report results/cpu-shakespeare                      # docs/results.md and its plots

A suite file (YAML) names a base config, overrides shared by every run, the seeds, the evaluation,
the variants (each a config and/or overrides) and the claims the report states about them. Every
(variant, seed) trains into ``<out>/runs/<variant>-seed<S>`` with ``train.resume=auto``, then is
evaluated on the suite's split at its training top-k and at each extra inference top-k, and analysed
(``s2moe_ds.analysis``); its ``result.json`` marks it done. Rerunning the same command after an
interruption skips finished runs and resumes an unfinished one from its last checkpoint.
``results.json``, ``results.csv`` and ``results.md`` (mean and standard deviation over seeds) are
rewritten after every run.

Every run records the code it ran (``code``: the git commit and a fingerprint of the package sources and
configs). A table only ever holds runs of one fingerprint (the current code's, else the one most runs
have), so runs from before a code fix never share a mean with runs after it; an unfinished run is not
resumed with other code. A variant may list its own ``seeds``; ``--shard I/N`` runs every N-th run of
the list (from the I-th), so N workers can share one suite folder.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..config import PACKAGE_DIR
from ..configtools import ConfigError
from .results import Result, aggregate, code_version, read_json, record_command, write_atomic
from .suite import EvalSpec, RunSpec, Suite, Variant, run_spec


def train_command(spec: RunSpec, run_dir: Path) -> list[str]:
    args = ["--config", spec.config, *spec.overrides, f"train.out_dir={run_dir}", "train.resume=auto"]
    args.append("train.progress=false")
    if spec.nproc > 1:
        return ["deepspeed", "--num_gpus", str(spec.nproc), "--module", "s2moe_ds.train", *args]
    return [sys.executable, "-m", "s2moe_ds.train", *args]


def train_env() -> dict:
    """The environment of a training subprocess: it imports this very package (the code whose fingerprint
    the run records), whether installed or run from a source checkout in another directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), env.get("PYTHONPATH")]))
    return env


def train(spec: RunSpec, run_dir: Path) -> float:
    """Train (or resume) one run in a subprocess, in this working directory (where the suite's relative
    paths, such as data.data_dir, start); its wall time in seconds."""
    cmd = train_command(spec, run_dir)
    print("+ " + shlex.join(cmd), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(cmd, env=train_env(), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-15:]
        raise RuntimeError(
            f"training {spec.variant} seed {spec.seed} failed (exit {proc.returncode}); "
            f"last lines of {run_dir / 'train.log'}:\n" + "\n".join(tail)
        )
    return wall


def inference_settings(cfg, ev: EvalSpec) -> list[tuple]:
    """(label, k, pathways, combine-weight convention) to evaluate: the training rule at every k, and at the
    other top-k also the old per-k convention ('-perk'), so both conventions stay visible."""
    moe = cfg.model.moe
    if not cfg.model.moe_layer_ids():
        return [("train_k", None, None, "train")]
    settings = [("train_k", moe.k, None, "train")]
    for k in ev.extra_k:
        if k != moe.k:
            settings += [(f"top{k}", k, None, "train"), (f"top{k}-perk", k, None, "per_k")]
    if moe.s2moe.enabled and ev.s2moe_both_pathways:
        settings.append((f"top{moe.k}-both", moe.k, "both", "train"))
    return settings


def eval_row(res, cfg, k: int | None, label: str, weights: str, step: int, split: str) -> dict:
    """One results row (the results.json format) of an evaluation ``res`` on ``split`` at inference top-k
    ``k``."""
    from ..flops import flops_per_token, moe_layer_flops

    n_moe = len(cfg.model.moe_layer_ids())
    is_moe = bool(n_moe)
    batch_tokens = cfg.train.micro_batch_size * cfg.model.context
    return {
        "split": split,
        "inference": label,
        "k": res.k if is_moe else 0,
        "pathways": res.pathways if cfg.model.moe.s2moe.enabled and is_moe else "",
        "weights": weights if is_moe else "",
        "loss": res.loss,
        res.metric: res.value,
        "metric": res.metric,
        "tokens": res.tokens,
        "inference_mflops_per_token": res.inference_gflops_per_token * 1e3,
        "inference_moe_mflops_per_token": moe_layer_flops(cfg.model, training=False, k=k, pathways=res.pathways)
        * n_moe
        / 1e6
        if is_moe
        else 0.0,
        "train_mflops_per_token": flops_per_token(cfg.model, training=True, batch_tokens=batch_tokens) / 1e6,
        "tokens_per_sec": res.tokens_per_sec,
        "params_total": res.params_total,
        "params_active": res.params_active,
        "step": step,
    }


def evaluate_run(run_dir: Path, suite: Suite) -> tuple[list[dict], list[dict]]:
    """Rows (one per inference setting) and the per-layer analysis of a finished run."""
    from ..analysis import analyse
    from ..data.loader import WindowSampler
    from ..data.store import load_split
    from ..evaluate import evaluate_model, load_model

    torch.manual_seed(0)
    model, meta, info = load_model(str(run_dir))
    cfg, ev = info["config"], suite.eval
    if info["step"] != cfg.train.steps:
        raise RuntimeError(
            f"{run_dir}: the last checkpoint is step {info['step']} of {cfg.train.steps} (training "
            f"was stopped early); rerun the same command to resume it"
        )
    moe, is_moe = cfg.model.moe, bool(cfg.model.moe_layer_ids())
    rows = []
    for label, k, pathways, weights in inference_settings(cfg, ev):
        if is_moe:
            model.set_inference(k=k, pathways=pathways or ("clean" if moe.s2moe.enabled else None), weights=weights)
        res = evaluate_model(model, meta, cfg.data.data_dir, ev.split)
        rows.append(eval_row(res, cfg, k, label, weights, info["step"], ev.split))
    if ev.analysis_tokens == 0:  # a tuning sweep reads only the table
        return rows, []
    if is_moe:  # inference routing statistics at the training top-k and rule, clean pathway
        model.set_inference(k=moe.k, pathways="clean" if moe.s2moe.enabled else None, weights="train")
    val = load_split(cfg.data.data_dir, ev.split, meta)
    n = max(1, ev.analysis_tokens // cfg.model.context)
    x, _ = next(WindowSampler(val, cfg.model.context).sequential(n, 1))
    x = x.to(next(model.parameters()).device)
    return rows, analyse(model, x, jacobian_tokens=ev.jacobian_tokens)


def prepare_data(suite: Suite, data_source: str = "") -> None:
    """Prepare the suite's data once (skipped when ``data.data_dir`` holds it), from ``data_source`` when
    given (``--data-source``: where the corpus file sits is not part of a run's spec)."""
    from ..config import load_config
    from ..data.errors import DataError
    from ..data.prepare import prepare_config

    extra = [f"data.source={data_source}"] if data_source else []
    cfg = load_config(suite.base or suite.variants[0].config, list(suite.overrides) + extra).data
    if (Path(cfg.data_dir) / "meta.json").exists():
        return
    print(f"[s2moe experiment] preparing {cfg.dataset} into {cfg.data_dir}", flush=True)
    try:
        prepare_config(cfg)
    except DataError as e:  # the experiment command's own way to name the corpus file
        raise DataError(str(e).replace("pass data.source=PATH", "pass --data-source PATH")) from None


def check_run_dir(run_dir: Path, spec: RunSpec, code: dict) -> str | None:
    """Why the run is already done (None if it is not); refuse a run started with another spec, or an
    unfinished one started by other code."""
    spec_file, result_file = run_dir / "spec.json", run_dir / "result.json"
    old_code = None
    if spec_file.exists():
        old = read_json(spec_file)
        old_code = old.pop("code", None) or {}
        if not spec.same_run(old):
            raise ConfigError(
                f"{run_dir} was started with a different spec ({old}) than this command's "
                f"({spec.to_dict()}); use another --out, or move that run away to restart it"
            )
    if result_file.exists():
        done = Result.load(result_file)
        if done.fingerprint == code["fingerprint"]:
            return "done earlier, skipped"
        return (
            f"done earlier, skipped (by other code, commit {done.commit or 'unrecorded'}: not in this code's "
            f"table; move the run away to redo it)"
        )
    if (run_dir / "checkpoints" / "latest").exists() and (old_code or {}).get("fingerprint") != code["fingerprint"]:
        raise ConfigError(
            f"{run_dir} was started by other code (commit {(old_code or {}).get('commit', 'unrecorded')}) "
            f"than this checkout's ({code['commit']}); resuming it would mix two code versions in "
            f"one run: move it away to restart it, or check out that commit to finish it"
        )
    return None


def run_one(run_dir: Path, spec: RunSpec, suite: Suite, code: dict) -> Result:
    """Train, evaluate and analyse one run; its result.json marks it done."""
    resumed = (run_dir / "checkpoints" / "latest").exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps({**spec.to_dict(), "code": code}, indent=1))
    wall = train(spec, run_dir)
    rows, layers = evaluate_run(run_dir, suite)
    result = Result(spec, code, wall, resumed, rows, layers, dir=run_dir)
    write_atomic(run_dir / "result.json", result.to_json())
    for r in rows:
        print(
            f"[s2moe experiment]   {r['inference']}: {r['split']} {r['metric']} {r[r['metric']]:.4f}, "
            f"{r['inference_mflops_per_token']:.3f} MFLOPs/token",
            flush=True,
        )
    return result


def select_variants(suite: Suite, only: list[str] | None) -> list[Variant]:
    if not only:
        return list(suite.variants)
    unknown = set(only) - {v.name for v in suite.variants}
    if unknown:
        raise ConfigError(
            f"--only: unknown variant(s) {sorted(unknown)}; the suite has {', '.join(v.name for v in suite.variants)}"
        )
    return [v for v in suite.variants if v.name in only]


def run_suite(
    suite: Suite,
    out: Path,
    steps: int | None = None,
    only: list[str] | None = None,
    command: str = "",
    full_command: str = "",
    shard: tuple[int, int] = (0, 1),
    data_source: str = "",
) -> list[dict]:
    variants = select_variants(suite, only)
    code = code_version()
    # seed-major: an interrupted or time-boxed suite has every variant on the first seeds
    seeds = sorted({s for v in variants for s in suite.variant_seeds(v)})
    todo = [(v, s) for s in seeds for v in variants if s in suite.variant_seeds(v)]
    todo = todo[shard[0] :: shard[1]]
    for variant, seed in todo:  # a command refused for any of its runs changes nothing, suite.json included
        check_run_dir(out / "runs" / f"{variant.name}-seed{seed}", run_spec(suite, variant, seed, steps), code)
    prepare_data(suite, data_source)
    out.mkdir(parents=True, exist_ok=True)
    record_command(out, suite, steps, command, full_command)
    for n, (variant, seed) in enumerate(todo, 1):
        spec = run_spec(suite, variant, seed, steps)
        run_dir = out / "runs" / f"{variant.name}-seed{seed}"
        done = check_run_dir(run_dir, spec, code)
        print(
            f"[s2moe experiment] {n}/{len(todo)} {variant.name} seed {seed}" + (f": {done}" if done else ""), flush=True
        )
        if not done:
            run_one(run_dir, spec, suite, code)
            aggregate(out, suite, steps)
    rows = aggregate(out, suite, steps)
    print(f"[s2moe experiment] results: {out / 'results.md'} ({len(rows)} rows)", flush=True)
    print((out / "results.md").read_text(), flush=True)
    return rows
