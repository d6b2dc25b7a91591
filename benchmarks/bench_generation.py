"""Generation with and without the KV cache, side by side: tokens/s at context 64 and 1024.

    python benchmarks/bench_generation.py              # S2MoE top-1 (clean pathway), 4 layers, d_model 256
    python benchmarks/bench_generation.py --rounds 1   # quicker

For each context, the prompt fills the context but the last ``--new`` positions (at least one token), and ``--new`` tokens are
generated greedily, so both paths produce the same tokens (checked) and stay inside the context (past it,
absolute positions make every step a full recomputation, cached or not). Tokens/s counts generated
tokens; the prompt's prefill is included in the time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import interleaved_medians, table  # noqa: E402
from s2moe_ds.config import load_config  # noqa: E402
from s2moe_ds.model import MoELanguageModel  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="64,1024")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per run")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        cfg = load_config(
            None,
            [
                "model.vocab_size=256",
                f"model.context={ctx}",
                f"model.n_layer={args.layers}",
                "model.n_head=4",
                f"model.d_model={args.d_model}",
                "model.moe.k=1",
                "model.moe.s2moe.enabled=true",
            ],
        ).model
        torch.manual_seed(0)
        model = MoELanguageModel(cfg).eval()
        prompt = torch.randint(0, 256, (1, max(1, ctx - args.new)))
        outs = {}

        def run(use_cache):
            def go():
                outs[use_cache] = model.generate(prompt, args.new, greedy=True, use_cache=use_cache)

            return go

        times = interleaved_medians({"cached": run(True), "uncached": run(False)}, rounds=args.rounds, warmup=1)
        assert torch.equal(outs[True], outs[False]), "the cached path must give the uncached path's tokens"
        rows.append(
            [
                str(ctx),
                str(prompt.shape[1]),
                str(args.new),
                f"{args.new / times['uncached']:,.1f}",
                f"{args.new / times['cached']:,.1f}",
                f"{times['uncached'] / times['cached']:.1f}x",
            ]
        )
    print(
        f"S2MoE top-1, {args.layers} layers, d_model {args.d_model}, 8 experts, fp32, {args.threads} thread(s), "
        f"batch 1, greedy; medians of {args.rounds} interleaved rounds\n"
    )
    print(table(rows, ["context", "prompt tokens", "new tokens", "uncached tokens/s", "cached tokens/s", "speed-up"]))


if __name__ == "__main__":
    main()
