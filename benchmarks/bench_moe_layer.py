"""S2MoE layer vs SMoE top-2 vs DeepSpeed's stock MoE vs a dense matmul ceiling, side by side.

    python benchmarks/bench_moe_layer.py            # d=256, ffn=1024, 8 experts, 4096 tokens, fp32
    python benchmarks/bench_moe_layer.py --rounds 5 --tokens 1024   # quicker

Prints a Markdown table of median times over interleaved rounds and the ratios the targets name:
S2MoE training step / DeepSpeed top-2 (target <= 0.85), S2MoE / our SMoE top-2 (S2MoE's own overhead at equal
expert FLOPs, target <= 1.05), expert GFLOP/s / dense GFLOP/s (target >= 0.85),
S2MoE eval throughput / DeepSpeed top-2 eval throughput (target >= 2.5), and each local implementation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import deepspeed_moe_peer, init_single_process_dist, interleaved_medians, table  # noqa: E402
from s2moe_ds.moe import MoEConfig, S2MoEConfig, build_moe_layer  # noqa: E402
from s2moe_ds.moe.backends import ExpertSpec, build_backend  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    D, Fh, E, T = args.d_model, args.d_ff, args.experts, args.tokens
    init_single_process_dist()

    x = torch.randn(T, D)
    grad_out = torch.randn(T, D)  # non-uniform upstream gradient, as in training

    def train_step(layer_fn):
        def run():
            xi = x.clone().requires_grad_()
            y, aux = layer_fn(xi)
            (y * grad_out).sum().add(aux).backward()

        return run

    def ours(s2: bool, k: int):
        cfg = MoEConfig(num_experts=E, k=k, eval_k=1, d_ff=Fh, router="smoe", s2moe=S2MoEConfig(enabled=s2))
        layer = build_moe_layer(cfg, D)
        return layer

    s2 = ours(True, 1)
    smoe2 = ours(False, 2)
    ds = deepspeed_moe_peer(D, Fh, E)

    def ours_fn(layer):
        def f(xi):
            out = layer(xi)
            return out.y, sum(out.aux_losses.values())

        return f

    def ds_fn(xi):
        y, l_aux, _ = ds(xi.unsqueeze(0))
        return y.squeeze(0), 0.01 * l_aux

    # dense ceiling: the same FLOPs as top-2 experts, as two plain matmuls over 2T rows
    w1 = torch.randn(D, Fh, requires_grad=True)
    w2 = torch.randn(Fh, D, requires_grad=True)
    x2 = torch.randn(2 * T, D)
    g2 = torch.randn(2 * T, D)

    def dense(blocks: int):
        def run():
            xi = x2.clone().requires_grad_()
            y = torch.cat([F.gelu(c @ w1) @ w2 for c in xi.chunk(blocks)])
            (y * g2).sum().backward()

        return run

    # the expert computation alone (top-2 routing from the SMoE router), each local implementation
    ids = smoe2.router(x, 2).expert_ids_TK.detach()
    wts = torch.rand(T, 2)
    backends = {}
    for impl in ("loop", "grouped_mm", "padded_bmm"):
        b = build_backend("local", ExpertSpec(E, D, Fh), impl=impl)
        b.load_state_dict(smoe2.experts.state_dict())
        backends[impl] = b

    def expert_only(b):
        def run():
            xi = x.clone().requires_grad_()
            (b(xi, ids, wts) * grad_out).sum().backward()

        return run

    train = interleaved_medians(
        {
            "S2MoE train step (2 pathways x top-1, fused)": train_step(ours_fn(s2.train())),
            "SMoE top-2 (ours, dropless)": train_step(ours_fn(smoe2.train())),
            "DeepSpeed MoE top-2 (capacity 1.25)": train_step(ds_fn),
            "dense matmul, same FLOPs, 1 block": dense(1),
            f"dense matmul, same FLOPs, {E} blocks": dense(E),
            **{f"experts only, impl={impl}": expert_only(b) for impl, b in backends.items()},
        },
        rounds=args.rounds,
    )

    s2.eval()
    ds.eval()

    @torch.no_grad()
    def s2_eval():
        s2(x)

    @torch.no_grad()
    def ds_eval():
        ds(x.unsqueeze(0))

    infer = interleaved_medians(
        {"S2MoE eval (clean, top-1)": s2_eval, "DeepSpeed MoE top-2 eval": ds_eval}, rounds=args.rounds
    )

    flops_top2 = 3 * 2 * T * 2 * 2 * D * Fh  # fwd+bwd = 3x forward; 2 slots/token; 2 matmuls of 2*D*F
    rows = []
    for name, t in {**train, **infer}.items():
        gflops = f"{flops_top2 / t / 1e9:.1f}" if ("experts only" in name or "dense" in name) else ""
        rows.append([name, f"{t * 1e3:.1f}", gflops])
    print(f"\nshapes: d_model={D} d_ff={Fh} experts={E} tokens={T} fp32 threads={args.threads} rounds={args.rounds}\n")
    print(table(rows, ["candidate", "median ms", "expert GFLOP/s"]))
    ds_t = train["DeepSpeed MoE top-2 (capacity 1.25)"]
    dense_t = min(t for name, t in train.items() if name.startswith("dense"))
    best_impl = min(backends, key=lambda i: train[f"experts only, impl={i}"])
    ratios = [
        [
            "S2MoE train step / DeepSpeed top-2 train step",
            f"{train['S2MoE train step (2 pathways x top-1, fused)'] / ds_t:.2f}",
            "<= 0.85",
        ],
        ["SMoE top-2 (ours) / DeepSpeed top-2 train step", f"{train['SMoE top-2 (ours, dropless)'] / ds_t:.2f}", ""],
        [
            "S2MoE train step / SMoE top-2 (ours) train step (S2MoE's own overhead)",
            f"{train['S2MoE train step (2 pathways x top-1, fused)'] / train['SMoE top-2 (ours, dropless)']:.2f}",
            "<= 1.05",
        ],
        [
            f"expert GFLOP/s ({best_impl}) / best dense GFLOP/s",
            f"{dense_t / train[f'experts only, impl={best_impl}']:.2f}",
            ">= 0.85",
        ],
        [
            "S2MoE eval throughput / DeepSpeed top-2 eval throughput",
            f"{infer['DeepSpeed MoE top-2 eval'] / infer['S2MoE eval (clean, top-1)']:.2f}",
            ">= 2.5",
        ],
    ]
    print()
    print(table(ratios, ["ratio", "measured", "target"]))
    print(f"\nfastest local implementation on {x.device.type}: {best_impl}")


if __name__ == "__main__":
    main()
