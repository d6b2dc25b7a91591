"""Where S2MoE's training step spends its time beyond SMoE top-2 (issue 12 item 11), in thread CPU time.

    python benchmarks/bench_s2moe_overhead.py            # d=256, ffn=1024, 8 experts, 4096 tokens, 1 thread

Thread CPU time (``time.thread_time``) rather than wall time, so other processes on the machine inflate the
figures less (they still share caches and memory bandwidth). Prints the medians of: the SMoE top-2 and S2MoE
layer steps (forward + backward, rounds shuffled), S2MoE without its uncertainty loss, and the parts measured
alone: the standard-normal draw of one ``[T, D]`` tensor and InfoNCE forward + backward at the default 64
negatives.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import table  # noqa: E402
from s2moe_ds.moe import MoEConfig, S2MoEConfig, build_moe_layer, info_nce  # noqa: E402


def cpu_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    D, T = args.d_model, args.tokens
    x, grad_out = torch.randn(T, D), torch.randn(T, D)

    def layer(s2: bool, k: int, **s2_fields):
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=args.experts, k=k, eval_k=1, d_ff=args.d_ff, router="smoe")
        cfg.s2moe = S2MoEConfig(enabled=s2, **s2_fields)
        return build_moe_layer(cfg, D).train()

    def step(mod):
        def run():
            xi = x.clone().requires_grad_()
            out = mod(xi)
            (out.y * grad_out).sum().add(sum(out.aux_losses.values())).backward()

        return run

    steps = {
        "SMoE top-2 layer step": step(layer(False, 2)),
        "S2MoE layer step (top-1 x 2 pathways)": step(layer(True, 1)),
        "S2MoE layer step without the uncertainty loss": step(layer(True, 1, uncertainty_coef=0.0)),
    }
    for fn in steps.values():
        fn()
    samples = {name: [] for name in steps}
    for _ in range(args.rounds):
        names = list(steps)
        random.shuffle(names)
        for name in names:
            samples[name].append(cpu_ms(steps[name], 1))
    medians = {name: statistics.median(v) for name, v in samples.items()}

    def nce():
        a = x.clone().requires_grad_()
        info_nce(a, a.detach() * 1.01 + 0.1, 0.1, 64).backward()

    medians["standard-normal draw of [T, D] (torch.randn)"] = cpu_ms(lambda: torch.randn(T, D), args.rounds)
    medians["InfoNCE forward + backward, 64 negatives"] = cpu_ms(nce, args.rounds)
    base = medians["SMoE top-2 layer step"]
    rows = [[name, f"{ms:.1f}", f"{ms / base:.3f}"] for name, ms in medians.items()]
    print(f"\nd_model={D} d_ff={args.d_ff} experts={args.experts} tokens={T} fp32 1 thread rounds={args.rounds}\n")
    print(table(rows, ["what", "median thread CPU ms", "/ SMoE top-2 step"]))


if __name__ == "__main__":
    main()
