"""Cost of S2MoE's InfoNCE uncertainty loss by number of sampled negatives (forward + backward).

    python benchmarks/bench_infonce.py [--tokens 4096 --d-model 256]

The all-pairs loss (negatives=0) is quadratic in the micro-batch; sampled negatives make it linear.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import interleaved_medians, table  # noqa: E402
from s2moe_ds.moe import info_nce  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    x = torch.randn(args.tokens, args.d_model)
    x_hat = x + 0.1 * torch.randn_like(x)

    def run(m):
        def f():
            a, p = x.clone().requires_grad_(), x_hat.clone().requires_grad_()
            info_nce(a, p, 0.1, m).backward()

        return f

    counts = [16, 64, 256, 1024, 0]
    res = interleaved_medians({str(m): run(m) for m in counts}, rounds=args.rounds)
    rows = [[("all pairs" if m == 0 else m), f"{res[str(m)] * 1e3:.1f}"] for m in counts]
    print(f"tokens={args.tokens} d_model={args.d_model} fp32 threads={torch.get_num_threads()}\n")
    print(table(rows, ["negatives per anchor", "median ms (fwd+bwd)"]))


if __name__ == "__main__":
    main()
