"""Training speed of whole models at the experiment scale (issue 28): dense, SMoE top-2 and S2MoE top-1 at
the Tiny Shakespeare configs, in interleaved rounds in one process, through the production trainer's step
(``Trainer.train_step``: DeepSpeed engine, optimizer, schedule).

    python benchmarks/bench_model.py                              # the experiment configs, 1 thread
    python benchmarks/bench_model.py --rounds 7 train.ds_config=ds_configs/zero2.json train.optimizer_impl=for_loop

Times are thread CPU time (``time.thread_time``) by default, so other processes on the machine inflate them
less (``--clock wall`` for wall time; with one thread and a quiet machine the two agree). Prints, per model:
median step time, tokens/s, training GFLOP/s achieved (``s2moe_ds.flops``'s count: what
the model must compute, not what the kernels do), that throughput as a fraction of dense's, and S2MoE's step
over SMoE top-2's. Rounds alternate the models so drifts of a shared machine hit each alike; compare ratios.
The corpus is the built-in Python docs (prepared once into ``data_cache/pydoc``): speed does not depend on
the text, only on the vocabulary size of the head (pydoc's is larger than Tiny Shakespeare's 65).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import table  # noqa: E402
from s2moe_ds.config import load_config  # noqa: E402
from s2moe_ds.flops import flops_per_token  # noqa: E402

MODELS = {
    "dense": ("configs/shakespeare_dense.yaml", []),
    "SMoE top-2": ("configs/shakespeare_s2moe.yaml", ["model.moe.s2moe.enabled=false", "model.moe.k=2"]),
    "S2MoE top-1": ("configs/shakespeare_s2moe.yaml", ["model.moe.k=1"]),
}
DATA = ["data.dataset=pydoc", "data.data_dir=data_cache/pydoc"]


def build(name: str, overrides: list[str]):
    from s2moe_ds.train import Trainer

    config, own = MODELS[name]
    cfg = load_config(ROOT / config, [*DATA, *own, *overrides])
    return cfg, Trainer.build(cfg, run_dir=False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per model per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread")
    ap.add_argument("overrides", nargs="*", help="config overrides for every model (e.g. train.ds_config=...)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from s2moe_ds.data.prepare import prepare_config

    data = load_config(ROOT / MODELS["dense"][0], DATA).data
    if not (Path(data.data_dir) / "meta.json").exists():
        prepare_config(data)
    built = {name: build(name, args.overrides) for name in MODELS}
    step = dict.fromkeys(MODELS, args.warmup)
    for name, (_, trainer) in built.items():
        for _ in range(args.warmup):
            trainer.train_step(step[name])
            step[name] += 1
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in MODELS}
    for _ in range(args.rounds):
        for name, (_, trainer) in built.items():
            t0 = clock()
            for _ in range(args.steps):
                trainer.train_step(step[name])
                step[name] += 1
            times[name].append((clock() - t0) / args.steps)
    out, rows = {}, []
    for name, (cfg, _) in built.items():
        t = cfg.train
        tokens = t.micro_batch_size * t.grad_accum * cfg.model.context
        sec = statistics.median(times[name])
        flops = flops_per_token(cfg.model, training=True, batch_tokens=t.micro_batch_size * cfg.model.context)
        out[name] = {"step_ms": sec * 1e3, "tokens_per_s": tokens / sec, "gflops": tokens / sec * flops / 1e9}
    dense = out["dense"]["gflops"]
    for name, r in out.items():
        r["of_dense"] = r["gflops"] / dense
        rows.append(
            [name, f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['gflops']:.1f}", f"{r['of_dense']:.2f}"]
        )
    ratio = out["S2MoE top-1"]["step_ms"] / out["SMoE top-2"]["step_ms"]
    out["s2moe_over_smoe_top2"] = ratio
    print(
        f"threads {args.threads}, {args.clock} clock, {args.rounds} rounds x {args.steps} steps, overrides "
        f"{args.overrides or 'none'}"
    )
    print(table(rows, ["model", "step ms (median)", "tokens/s", "train GFLOP/s", "GFLOP/s / dense"]))
    print(f"S2MoE top-1 step / SMoE top-2 step: {ratio:.3f}")
    return out


if __name__ == "__main__":
    main()
