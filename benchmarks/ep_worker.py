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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s2moe_ds.config import load_config  # noqa: E402
from s2moe_ds.train import Trainer  # noqa: E402


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
    # the production trainer's step, with DeepSpeed's comms logger on; no run directory is opened
    comms = {"comms_logger": {"enabled": True, "verbose": False, "prof_all": True}}
    trainer = Trainer.build(cfg, run_dir=False, ds_overrides=comms)
    rank, world, engine, model = trainer.rank, trainer.world, trainer.engine, trainer.model
    import deepspeed.comm as dcomm

    times, a2a = [], []

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
        dt = trainer.train_step(step).seconds
        after = a2a_totals()
        if step >= args.warmup:
            times.append(dt)
            a2a.append((after[0] - before[0], after[1] - before[1]))
    ckpt = {}
    if args.ckpt_reps:
        import torch.distributed as dist

        from s2moe_ds.checkpoint.portable import save_portable

        root = Path(args.ckpt_dir)
        ds_s, portable_s = [], []
        for r in range(args.ckpt_reps):
            dist.barrier()
            t0 = time.perf_counter()
            engine.save_checkpoint(str(root), tag=f"r{r}", save_latest=False)
            dist.barrier()
            t1 = time.perf_counter()
            save_portable(engine, model, root / f"r{r}", trainer.layout)
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
                trainer.train_step(10_000 + step)
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
