"""The MoE layer at GPU scale: S2MoE, SMoE top-2 (ours), DeepSpeed's MoE top-2, MegaBlocks' dMoE top-2 and a
dense matmul of the same FLOPs, side by side, training step (forward + backward) and inference.

    python benchmarks/bench_moe_layer_gpu.py          # CUDA, bf16, d_model 2048, FFN 8192, 8 and 64 experts, 16k tokens
    python benchmarks/bench_moe_layer_gpu.py --device cpu --dtype fp32 --d-model 64 --d-ff 128 \\
        --experts 4 --tokens 256 --rounds 2           # a smoke run anywhere (gpu/check.sh --cpu-dry-run)

For each expert count it prints one Markdown table: median ms over interleaved rounds, TFLOP/s of the
routed expert work, that as a fraction of the dense matmul's TFLOP/s in the same mode, and peak memory of
one call above what was resident before it (activations, gradients, workspaces; CUDA only). ``--json``
writes the same numbers for gpu/check.sh's report.

FLOPs counted are the *useful* expert FLOPs: 2 routed slots per token (top-2, and S2MoE's two pathways of
top-1 in training) x 2 matmuls x 2·d·F, x3 for forward + backward; S2MoE inference runs the clean pathway
top-1, i.e. half of that. DeepSpeed's layer at capacity 1.25 computes 2.5 slots per token including its
padding; it is credited with the 2 useful ones, as are the dropless layers. Routers, S2MoE's noise and
InfoNCE, and the load-balancing losses are in every MoE candidate's time but not in its FLOPs. The dense
matmul is ``gelu(x @ w1) @ w2`` over 2T rows: the FLOPs of top-2 experts with none of the routing.
Candidates whose framework is missing (MegaBlocks without CUDA or without grouped_gemm) are listed as not
measured with the reason; one that fails to build or run (an error, out of memory) is listed as FAILED, the
others are still measured, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import deepspeed_moe_peer, init_single_process_dist, table  # noqa: E402
from s2moe_ds.moe import MoEConfig, S2MoEConfig, build_moe_layer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DENSE = "dense matmul, same FLOPs as top-2"


class Candidate:
    """One layer under test: a training step and an inference call, and the routed slots per token each
    does useful expert work for."""

    def __init__(
        self,
        name: str,
        train: Callable[[], None],
        infer: Callable[[], None],
        slots_train: float,
        slots_infer: float,
        params: torch.nn.Module | None = None,
    ):
        self.name, self.train, self.infer = name, train, infer
        self.slots = {"train": slots_train, "infer": slots_infer}
        self.param_mib = sum(p.numel() * p.element_size() for p in params.parameters()) / 2**20 if params else 0.0


def synced(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def peak_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory one call allocates above what was resident before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def megablocks_missing(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    for module in ("grouped_gemm", "megablocks"):
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - an import that fails in any way means "not available here"
            return f"{module} not importable ({type(e).__name__}: {e})"
    return None


def build_candidates(E: int, args, device: torch.device, dtype: torch.dtype) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates for E experts, and those left out with the reason (a missing framework, or one that
    failed to build: the others are still measured)."""
    D, Fh, T = args.d_model, args.d_ff, args.tokens
    x = torch.randn(T, D, device=device, dtype=dtype)
    grad_out = torch.randn(T, D, device=device, dtype=dtype)  # a non-uniform upstream gradient, as in training
    cands: list[Candidate] = []
    skipped: dict[str, str] = {}

    def step(module: torch.nn.Module, forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        def train():
            module.train()
            xi = x.clone().requires_grad_()
            y, aux = forward(xi)
            ((y * grad_out).sum() + aux).backward()
            for p in module.parameters():  # gradients are part of a step's memory, not carried between steps
                p.grad = None

        @torch.no_grad()
        def infer():
            module.eval()
            forward(x)

        return train, infer

    def ours(name: str, s2: bool, k: int, backend: str) -> Candidate:
        cfg = MoEConfig(
            num_experts=E,
            k=k,
            eval_k=1 if s2 else k,
            d_ff=Fh,
            router="smoe",
            backend=backend,
            s2moe=S2MoEConfig(enabled=s2),
        )
        layer = build_moe_layer(cfg, D).to(device=device, dtype=dtype)

        def forward(xi):
            out = layer(xi)
            return out.y, sum(out.aux_losses.values())

        return Candidate(name, *step(layer, forward), 2, 1 if s2 else 2, layer)

    def deepspeed_moe(name: str) -> Candidate:
        ds = deepspeed_moe_peer(D, Fh, E).to(device=device, dtype=dtype)

        def forward(xi):
            y, l_aux, _ = ds(xi.unsqueeze(0))
            return y.squeeze(0), 0.01 * l_aux

        return Candidate(name, *step(ds, forward), 2, 2, ds)

    def megablocks_dmoe(name: str) -> Candidate:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
        from megablocks.layers.moe import batched_load_balancing_loss, clear_load_balancing_loss

        mb_args = Arguments(
            hidden_size=D,
            ffn_hidden_size=Fh,
            num_layers=1,
            moe_num_experts=E,
            moe_top_k=2,
            bias=False,
            return_bias=False,
            activation_fn=F.gelu,
            mlp_type="mlp",
            mlp_impl="grouped",
            moe_loss_weight=0.01,
            fp16=False,
            bf16=dtype == torch.bfloat16,
            device=device,
        )
        mb = dMoE(mb_args).to(device=device, dtype=dtype)

        def forward(xi):
            y = mb(xi.view(T, 1, D)).view(T, D)
            if not mb.training:
                return y, None
            aux = batched_load_balancing_loss(mb_args)  # MegaBlocks keeps it in a module-level list: clear it
            clear_load_balancing_loss()
            return y, aux

        return Candidate(name, *step(mb, forward), 2, 2, mb)

    missing_mb = megablocks_missing(device)
    plan = [
        ("S2MoE (2 pathways x top-1, ours, local)", lambda n: ours(n, True, 1, "local"), None),
        ("SMoE top-2 (ours, local)", lambda n: ours(n, False, 2, "local"), None),
        ("S2MoE (2 pathways x top-1, ours, megablocks gmm)", lambda n: ours(n, True, 1, "megablocks"), missing_mb),
        ("SMoE top-2 (ours, megablocks gmm)", lambda n: ours(n, False, 2, "megablocks"), missing_mb),
        ("DeepSpeed MoE top-2 (capacity 1.25)", deepspeed_moe, None),
        ("MegaBlocks dMoE top-2 (grouped)", megablocks_dmoe, missing_mb),
    ]
    for name, build, missing in plan:
        if missing:
            skipped[name] = missing
            continue
        try:
            cands.append(build(name))
        except Exception as e:  # noqa: BLE001 - one framework failing must not cost the other numbers
            skipped[name] = failure(e)

    w1 = torch.randn(D, Fh, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(Fh, D, device=device, dtype=dtype, requires_grad=True)
    x2 = torch.randn(2 * T, D, device=device, dtype=dtype)
    g2 = torch.randn(2 * T, D, device=device, dtype=dtype)

    def dense_train():
        xi = x2.clone().requires_grad_()
        (F.gelu(xi @ w1) @ w2 * g2).sum().backward()
        w1.grad = w2.grad = None

    @torch.no_grad()
    def dense_infer():
        F.gelu(x2 @ w1) @ w2

    dense = Candidate(DENSE, dense_train, dense_infer, 2, 2)
    dense.param_mib = 2 * D * Fh * x2.element_size() / 2**20
    cands.append(dense)
    return cands, skipped


def failure(e: BaseException) -> str:
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return f"FAILED: {type(e).__name__}: {first}"


def measure(E: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    cands, skipped = build_candidates(E, args, device, dtype)
    for c in list(cands):  # one trial of each: a candidate that fails (or runs out of memory) is left out
        try:
            c.train()
            c.infer()
        except Exception as e:  # noqa: BLE001
            if c.name == DENSE:
                raise
            skipped[c.name] = failure(e)
            cands.remove(c)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    expert_flops_per_slot = 2 * 2 * args.d_model * args.d_ff  # two matmuls of 2·D·F per routed slot
    result = {"experts": E, "skipped": skipped, "rows": []}
    for mode, mult in (("train", 3), ("infer", 1)):
        fns = {c.name: synced(getattr(c, mode), device) for c in cands}
        med = interleaved(fns, rounds=args.rounds, warmup=args.warmup)
        peaks = {c.name: peak_mib(fns[c.name], device) for c in cands}
        tflops = {
            c.name: mult * c.slots[mode] * args.tokens * expert_flops_per_slot / med[c.name] / 1e12 for c in cands
        }
        dense = tflops[DENSE]
        for c in cands:
            result["rows"].append(
                {
                    "mode": mode,
                    "name": c.name,
                    "ms": med[c.name] * 1e3,
                    "tflops": tflops[c.name],
                    "of_dense": tflops[c.name] / dense,
                    "peak_mib": peaks[c.name],
                    "param_mib": c.param_mib,
                }
            )
    del cands
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(res: dict, args) -> str:
    rows = []
    for r in res["rows"]:
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        rows.append(
            [
                {"train": "fwd+bwd", "infer": "inference"}[r["mode"]],
                r["name"],
                f"{r['ms']:.2f}",
                f"{r['tflops']:.1f}" if r["tflops"] >= 1 else f"{r['tflops']:.3f}",
                f"{r['of_dense']:.2f}",
                peak,
                f"{r['param_mib']:.1f}",
            ]
        )
    out = [
        f"{res['experts']} experts, d_model {args.d_model}, FFN {args.d_ff}, {args.tokens} tokens, {args.dtype}, "
        f"{args.device}, median of {args.rounds} rounds:",
        "",
        table(rows, ["mode", "candidate", "median ms", "TFLOP/s", "of dense", "step peak MiB", "params MiB"]),
    ]
    if res["skipped"]:
        out.append("")
        out += [f"- not measured: {name}: {why}" for name, why in res["skipped"].items()]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--d-ff", type=int, default=8192)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(
            "--device cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
            "use --device cpu for a smoke run"
        )
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_single_process_dist(backend="nccl" if device.type == "cuda" else "gloo")
    results = []
    for E in args.experts:
        res = measure(E, args, device, dtype)
        res["markdown"] = markdown(res, args)
        results.append(res)
        print(res["markdown"] + "\n", flush=True)
    if args.json:
        meta = {
            "device": args.device,
            "dtype": args.dtype,
            "d_model": args.d_model,
            "d_ff": args.d_ff,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    failed = [
        f"{r['experts']} experts: {n}" for r in results for n, why in r["skipped"].items() if why.startswith("FAILED")
    ]
    if failed:
        print("candidates that failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
