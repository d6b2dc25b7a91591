"""The progress line: what a long run prints every ``train.log_interval`` steps, in any log.

    [s2moe] step 400/2000 | loss 2.4130 | lr 9.80e-04 | 12,345 tok/s | 0.310 s/step | MFU 1.2% | grad 0.82 |
            rss 1.21 GB | elapsed 0:02:04 (eval 5 s, ckpt 1 s) | eta 0:08:16

Throughput and step time count training only: evaluation and checkpoint writing are timed apart and
shown as totals. MFU = training FLOPs per token (``s2moe_ds/flops.py``: forward + backward) x tokens/s
over the peak of every device: ``train.peak_tflops`` (per device) when set, else a table of GPU peaks by
device name and precision, else (CPU) an estimate: threads x clock x FLOPs per cycle of the vector
unit (AVX-512: 64, AVX2 + FMA: 32 fp32 FLOPs/cycle). The ETA is the remaining steps at this session's
average time per step, evaluation and checkpoints included.
"""

from __future__ import annotations

import datetime
import resource
import time

import torch

# dense peak TFLOP/s per GPU by name fragment: (bf16/fp16 tensor cores, fp32 without tensor cores)
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "A10G": (70.0, 31.2),
    "L4": (121.0, 30.3),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


def cpu_peak_flops(threads: int) -> float:
    """Rough fp32 peak of ``threads`` cores from /proc/cpuinfo: clock x vector FLOPs per cycle."""
    mhz, flags = 0.0, set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":")[1]))
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":")[1].split())
    except OSError:
        pass
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    return threads * (mhz or 2000.0) * 1e6 * per_cycle


def device_peak_flops(precision: str, peak_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, (half, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (fp32 if precision == "fp32" else half) * 1e12, f"{name} table"
        return 0.0, f"{name}: unknown peak, set train.peak_tflops"
    threads = torch.get_num_threads()
    return cpu_peak_flops(threads), f"CPU estimate, {threads} thread(s)"


def peak_memory_bytes() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress:
    """Times training, evaluation and checkpoints apart; builds the progress line and its scalars."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        tokens_per_step: int,
        train_flops_per_token: float,
        peak_flops_total: float,
    ):
        self.total, self.start = total_steps, start_step
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = train_flops_per_token
        self.peak = peak_flops_total
        self.t0 = time.perf_counter()
        self.train_s = self.eval_s = self.ckpt_s = 0.0
        self.window_s, self.window_steps = 0.0, 0

    def add_train(self, seconds: float) -> None:
        self.train_s += seconds
        self.window_s += seconds
        self.window_steps += 1

    def add_eval(self, seconds: float) -> None:
        self.eval_s += seconds

    def add_ckpt(self, seconds: float) -> None:
        self.ckpt_s += seconds

    def report(self, step: int, loss: float, lr: float, grad_norm: float | None) -> tuple[str, dict]:
        """(the line, its numbers as scalars) for the steps since the last report."""
        step_s = self.window_s / max(self.window_steps, 1)
        tok_s = self.tokens_per_step / max(step_s, 1e-12)
        mfu = self.flops_per_token * tok_s / self.peak if self.peak > 0 else None
        mem, mem_kind = peak_memory_bytes()
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        self.window_s, self.window_steps = 0.0, 0
        parts = [
            f"step {step}/{self.total}",
            f"loss {loss:.4f}",
            f"lr {lr:.2e}",
            f"{tok_s:,.0f} tok/s",
            f"{step_s:.3f} s/step",
            f"MFU {100 * mfu:.2f}%" if mfu is not None else "MFU n/a",
            f"grad {grad_norm:.3g}" if grad_norm is not None else "grad n/a",
            f"{mem_kind} {mem / 2**30:.2f} GB",
            f"elapsed {hms(elapsed)} (eval {self.eval_s:.0f} s, ckpt {self.ckpt_s:.0f} s)",
            f"eta {hms(eta)}",
        ]
        scalars = {
            "train/tokens_per_sec": tok_s,
            "train/step_time_s": step_s,
            "train/peak_memory_gb": mem / 2**30,
            "time/eval_s": self.eval_s,
            "time/checkpoint_s": self.ckpt_s,
            "time/elapsed_s": elapsed,
            "time/eta_s": eta,
        }
        if mfu is not None:
            scalars["train/mfu"] = mfu
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        return "[s2moe] " + " | ".join(parts), scalars
