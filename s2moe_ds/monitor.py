"""Rank-0 logging: TensorBoard scalars/histograms/text and a metrics.jsonl file with the same numbers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import yaml


def quality(loss_nats: float, tokenizer: str) -> tuple[str, float]:
    """Bits per character for character/byte models, perplexity for subword models."""
    if tokenizer == "sentencepiece":
        return "ppl", math.exp(min(loss_nats, 50.0))
    return "bpc", loss_nats / math.log(2)


class Monitor:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, config: dict):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)

    def scalars(self, step: int, values: dict, record: str = "train") -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": record, "step": step, **values}) + "\n")
        if self.writer:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def moe(self, step: int, aux_losses: dict, metrics: dict) -> None:
        """Per-layer MoE diagnostics: each auxiliary loss, imbalance, entropy, gate, noise; expert load.

        TensorBoard gets scalars and a load histogram; metrics.jsonl gets one ``moe`` record with the
        same numbers (expert loads as lists) for the experiment report."""
        if not self.enabled:
            return
        record = {"kind": "moe", "step": step, **{f"aux/{n}": float(v) for n, v in aux_losses.items()}}
        for name, v in metrics.items():
            v = v.detach().float().cpu()
            record[name] = v.tolist() if v.numel() > 1 else float(v)
        self.jsonl.write(json.dumps(record) + "\n")
        if not self.writer:
            return
        for name, v in aux_losses.items():
            self.writer.add_scalar(f"moe/{name.replace('/', '/aux_')}", float(v), step)
        for name, v in metrics.items():
            v = v.detach().float().cpu()
            if name.endswith("tokens_per_expert"):
                counts = v.round().long().numpy()
                self.writer.add_histogram(f"moe/{name}", np.repeat(np.arange(len(counts)), counts), step,
                                          bins=np.arange(len(counts) + 1) - 0.5)
            else:
                self.writer.add_scalar(f"moe/{name}", float(v), step)

    def flush(self) -> None:
        if self.enabled:
            self.jsonl.flush()
            if self.writer:
                self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer:
                self.writer.close()


def reduce_metrics(metrics: dict) -> dict:
    """Average MoE metrics over data-parallel ranks (token counts summed) with one all-reduce."""
    import torch.distributed as dist

    if not metrics or not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    names = sorted(metrics)
    flat = torch.cat([metrics[n].detach().float().reshape(-1) for n in names])
    dist.all_reduce(flat)
    out, i = {}, 0
    for n in names:
        size = metrics[n].numel()
        v = flat[i:i + size].view_as(metrics[n].float())
        out[n] = v if n.endswith("tokens_per_expert") else v / dist.get_world_size()
        i += size
    return out
