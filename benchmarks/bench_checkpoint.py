"""What the portable (layout-free) checkpoint copy costs next to DeepSpeed's own save, side by side:

    python benchmarks/bench_checkpoint.py [--reps 3]

Every checkpoint written during training is DeepSpeed's ``save_checkpoint`` plus ``save_portable``
(``s2moe_ds/checkpoint/portable.py``: the fp32 values and Adam moments each rank owns under ZeRO, written without
any collective and tiled back together when read, one entry per global expert), which is what lets a
run resume under another ``ep_size`` / world size with its optimizer state. This times both on 2
processes (gloo, ZeRO 2) for a small and a larger model, with experts replicated and with ep=2, and
prints the ratio. Needs the built-in corpus prepared
(``s2moe prepare --config configs/tiny.yaml``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_expert_parallel import run_worker  # noqa: E402
from benchmarks.common import table  # noqa: E402

SMALL = ["model.moe.num_experts=4"]
LARGE = ["model.d_model=256", "model.n_layer=4", "model.n_head=4", "model.moe.num_experts=8"]
CASES = {
    "tiny (2 layers, d=64, 4 experts), data parallel": SMALL + ["model.moe.ep_size=1"],
    "tiny, ep=2": SMALL + ["model.moe.ep_size=2"],
    "d=256, 4 layers, 8 experts, data parallel": LARGE + ["model.moe.ep_size=1"],
    "d=256, 4 layers, 8 experts, ep=2": LARGE + ["model.moe.ep_size=2"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data-dir", default="data_cache/pydoc")
    args = ap.parse_args(argv)
    rows = []
    for name, overrides in CASES.items():
        with tempfile.TemporaryDirectory(prefix="s2moe-ckpt-bench-") as tmp:
            r = run_worker(
                2,
                overrides + ["train.micro_batch_size=2"],
                {},
                2,
                args.data_dir,
                ["--warmup", "1", "--ckpt-reps", str(args.reps), "--ckpt-dir", tmp],
            )
        rows.append(
            [
                name,
                f"{r['params'] / 1e6:.2f}",
                f"{r['ds_save_s'] * 1e3:.0f}",
                f"{r['portable_save_s'] * 1e3:.0f}",
                f"{r['portable_save_s'] / r['ds_save_s']:.2f}",
                f"{r['ds_bytes'] / 2**20:.1f}",
                f"{r['portable_bytes'] / 2**20:.1f}",
            ]
        )
    print(f"2 processes, gloo, ZeRO 2, AdamW; median of {args.reps} saves\n")
    print(
        table(
            rows,
            [
                "model",
                "params per rank (M)",
                "DeepSpeed save ms",
                "portable copy ms",
                "portable / DeepSpeed",
                "DeepSpeed MiB",
                "portable MiB",
            ],
        )
    )


if __name__ == "__main__":
    main()
