"""One timed training run for bench_expert_parallel.py (started by the deepspeed launcher).

Prints one JSON line on rank 0: median step time and the all-to-all time per step from DeepSpeed's
comms logger (forward and backward all-to-alls of every MoE layer)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s2moe_ds.config import load_config  # noqa: E402
from s2moe_ds.data.loader import WindowSampler  # noqa: E402
from s2moe_ds.data.prepare import load_split, read_meta  # noqa: E402
from s2moe_ds.distributed import build_engine, deepspeed_config, init_distributed  # noqa: E402
from s2moe_ds.model import MoELanguageModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--ckpt-reps",
        type=int,
        default=0,
        help="after the timed steps, time this many checkpoint saves into --ckpt-dir: DeepSpeed's "
        "save_checkpoint and our portable copy separately (bench_checkpoint.py)",
    )
    ap.add_argument("--ckpt-dir", default="")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile this many steps after the timed ones (torch.profiler) and print rank 0's top ops",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny.yaml", args.overrides)
    rank, world = init_distributed(120)
    meta = read_meta(cfg.data.data_dir)
    cfg.model.vocab_size = meta["vocab_size"]
    windows = WindowSampler(load_split(cfg.data.data_dir, "train", meta), cfg.model.context)
    torch.manual_seed(0)
    model = MoELanguageModel(cfg.model)
    import deepspeed.comm as dcomm
    import deepspeed.runtime.engine  # noqa: F401

    ds = deepspeed_config(cfg)
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    import s2moe_ds.distributed as sd

    orig = sd.deepspeed_config
    sd.deepspeed_config = lambda c: ds
    engine, _ = build_engine(model, cfg)
    sd.deepspeed_config = orig
    times, a2a = [], []
    t = cfg.train

    def a2a_totals():
        # the comms logger records each op's *cumulative* elapsed time (its timer is never reset), so the
        # newest record of an op name is that op's total so far; the step's share is the difference
        total = calls = 0.0
        for name, sizes in dcomm.comms_logger.comms_dict.items():
            if "all_to_all" in name:
                total += max(max(rec[1]) for rec in sizes.values())
                calls += sum(rec[0] for rec in sizes.values())
        return total / 1e3, calls

    for step in range(args.warmup + args.steps):
        before = a2a_totals()
        t0 = time.perf_counter()
        for micro in range(t.grad_accum):
            x, y = windows.batch(t.micro_batch_size, t.seed, step, micro * world + rank)
            out = engine(x, y)
            engine.backward(out.loss + out.aux_loss)
            engine.step()
        dt = time.perf_counter() - t0
        after = a2a_totals()
        if step >= args.warmup:
            times.append(dt)
            a2a.append((after[0] - before[0], after[1] - before[1]))
    ckpt = {}
    if args.ckpt_reps:
        import torch.distributed as dist

        from s2moe_ds.reshard import save_portable

        root = Path(args.ckpt_dir)
        layout = {"world": world, "ep_size": cfg.model.moe.ep_size}
        ds_s, portable_s = [], []
        for r in range(args.ckpt_reps):
            dist.barrier()
            t0 = time.perf_counter()
            engine.save_checkpoint(str(root), tag=f"r{r}", save_latest=False)
            dist.barrier()
            t1 = time.perf_counter()
            save_portable(engine, model, root / f"r{r}", layout)
            dist.barrier()
            ds_s.append(t1 - t0)
            portable_s.append(time.perf_counter() - t1)
        tag = root / "r0"
        portable_bytes = sum(f.stat().st_size for f in (tag / "s2moe_portable").iterdir())
        ds_bytes = sum(f.stat().st_size for f in tag.iterdir() if f.is_file())
        ckpt = {
            "ds_save_s": statistics.median(ds_s),
            "portable_save_s": statistics.median(portable_s),
            "ds_bytes": ds_bytes,
            "portable_bytes": portable_bytes,
            "params": sum(p.numel() for p in model.parameters()),
        }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(args.profile):
                for micro in range(t.grad_accum):
                    x, y = windows.batch(t.micro_batch_size, t.seed, 10_000 + step, micro * world + rank)
                    out = engine(x, y)
                    engine.backward(out.loss + out.aux_loss)
                    engine.step()
        if rank == 0:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    if rank == 0:
        print(
            "RESULT "
            + json.dumps(
                {
                    "world": world,
                    "ep_size": cfg.model.moe.ep_size,
                    "fused": cfg.model.moe.s2moe.fused_dispatch,
                    "step_s": statistics.median(times),
                    "a2a_s": statistics.median(a for a, _ in a2a),
                    "a2a_calls": statistics.median(c for _, c in a2a),
                }
                | ckpt
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
