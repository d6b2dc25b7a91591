"""Activation checkpointing: the memory it saves and the time it costs, S2MoE top-1 and SMoE top-2.

    python benchmarks/bench_activation_checkpointing.py               # d=256, 4 layers, 8 experts, 8 x 256 tokens
    python benchmarks/bench_activation_checkpointing.py --rounds 3    # quicker

Memory is what the forward pass keeps for the backward pass: the bytes of every distinct tensor storage
autograd saves (``torch.autograd.graph.saved_tensors_hooks``), parameters left out. It is what
checkpointing trades for recomputation, it is exact, and it is the same on any device (a peak-RSS or
allocator figure would add the weights, the optimizer and the allocator's caching). Time is the median
of one forward + backward in interleaved rounds.
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

MODES = ("none", "moe", "all")


def saved_bytes(model, x) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, x)
    (out.loss + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {
        "S2MoE top-1": ["model.moe.k=1", "model.moe.s2moe.enabled=true"],
        "SMoE top-2": ["model.moe.k=2", "model.moe.s2moe.enabled=false"],
    }
    rows = []
    for name, overrides in variants.items():
        models = {}
        for mode in MODES:
            cfg = load_config(
                None,
                [
                    "model.vocab_size=256",
                    f"model.n_layer={args.layers}",
                    "model.n_head=4",
                    f"model.d_model={args.d_model}",
                    f"model.context={args.context}",
                    f"model.moe.num_experts={args.experts}",
                    f"model.activation_checkpointing={mode}",
                    *overrides,
                ],
            ).model
            torch.manual_seed(0)
            models[mode] = MoELanguageModel(cfg).train()
        x = torch.randint(0, 256, (args.batch, args.context))
        memory = {mode: saved_bytes(m, x) for mode, m in models.items()}

        def step(m):
            def run():
                out = m(x, x)
                (out.loss + out.aux_loss).backward()
                m.zero_grad(set_to_none=True)

            return run

        times = interleaved_medians({mode: step(m) for mode, m in models.items()}, rounds=args.rounds, warmup=1)
        for mode in MODES:
            rows.append(
                [
                    name,
                    mode,
                    f"{memory[mode] / 2**20:,.1f}",
                    f"{memory[mode] / memory['none']:.2f}",
                    f"{1e3 * times[mode]:,.0f}",
                    f"{times[mode] / times['none']:.2f}",
                ]
            )
    print(
        f"d_model {args.d_model}, {args.layers} layers, {args.experts} experts, {args.batch} x {args.context} "
        f"tokens, fp32, {args.threads} thread(s), medians of {args.rounds} interleaved rounds\n"
    )
    print(
        table(
            rows,
            ["model", "activation_checkpointing", "saved for backward (MiB)", "vs none", "fwd+bwd (ms)", "vs none"],
        )
    )


if __name__ == "__main__":
    main()
