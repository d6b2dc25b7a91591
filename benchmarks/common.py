"""Side-by-side timing helpers: candidates are run in interleaved rounds and the median is reported,
so slow drifts of a shared machine hit every candidate alike. Compare ratios, not absolute times."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def init_single_process_dist(port: int = 29631, backend: str = "gloo") -> None:
    """DeepSpeed's MoE layer needs a process group even for one process: gloo on loopback (``nccl`` for a
    layer on a GPU, whose collectives gloo cannot run on CUDA tensors)."""
    for key, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
    ):
        os.environ.setdefault(key, value)
    import deepspeed

    from s2moe_ds.distributed import release_shm_name

    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    release_shm_name()


def interleaved_medians(candidates: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def deepspeed_moe_peer(d_model: int, d_ff: int, num_experts: int):
    """DeepSpeed's own MoE top-2 as the benchmarks' peer: GELU experts, capacity factor 1.25, tokens dropped
    above capacity (its defaults for training), one process (ep_size 1)."""
    import torch
    from deepspeed.moe.layer import MoE

    expert = torch.nn.Sequential(torch.nn.Linear(d_model, d_ff), torch.nn.GELU(), torch.nn.Linear(d_ff, d_model))
    return MoE(
        hidden_size=d_model,
        expert=expert,
        num_experts=num_experts,
        ep_size=1,
        k=2,
        capacity_factor=1.25,
        eval_capacity_factor=1.25,
        min_capacity=4,
        drop_tokens=True,
    )
