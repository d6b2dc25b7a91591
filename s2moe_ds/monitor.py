"""Rank-0 logging: TensorBoard scalars/histograms/text and a metrics.jsonl file with the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from .configtools import ConfigError

TRACKERS = ("tensorboard", "csv", "wandb")


class TensorBoardTracker:
    def __init__(self, out_dir: Path, config: dict, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)

    def scalars(self, step: int, values: dict) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def histogram(self, step: int, tag: str, counts: np.ndarray) -> None:
        self.writer.add_histogram(
            tag, np.repeat(np.arange(len(counts)), counts), step, bins=np.arange(len(counts) + 1) - 0.5
        )

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CSVTracker:
    """``metrics.csv``: one ``step,name,value`` row per number (a long table any tool reads)."""

    def __init__(self, out_dir: Path, **_):
        path = out_dir / "metrics.csv"
        new = not path.exists()
        self.f = open(path, "a", buffering=1)
        if new:
            self.f.write("step,name,value\n")

    def scalars(self, step: int, values: dict) -> None:
        self.f.writelines(f"{step},{tag},{float(v)!r}\n" for tag, v in values.items())

    def histogram(self, step: int, tag: str, counts: np.ndarray) -> None:
        self.f.writelines(f"{step},{tag}/{i},{int(c)}\n" for i, c in enumerate(counts))

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class WandbTracker:
    """Weights & Biases through the ``wandb`` package (``pip install wandb``); ``WANDB_MODE=offline``
    writes the run under ``{out_dir}/wandb`` for ``wandb sync`` later. The W&B run id is the run's id, so
    a resumed or requeued job continues the same W&B run."""

    def __init__(self, out_dir: Path, config: dict, run_id: str = "", **_):
        check_trackers(["wandb"])
        import wandb

        self.wandb = wandb
        t = config.get("train", {})
        self.run = wandb.init(
            project=t.get("wandb_project") or "s2moe",
            entity=t.get("wandb_entity") or None,
            name=out_dir.name,
            dir=str(out_dir),
            config=config,
            id=run_id or None,
            resume="allow" if run_id else None,
        )

    def scalars(self, step: int, values: dict) -> None:
        self.run.log({k: float(v) for k, v in values.items()}, step=step)

    def histogram(self, step: int, tag: str, counts: np.ndarray) -> None:
        edges = np.arange(len(counts) + 1) - 0.5
        self.run.log({tag: self.wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "csv": CSVTracker, "wandb": WandbTracker}
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(trackers) -> None:
    """Refuse, before anything is built, a tracker whose package is not installed."""
    import importlib.util

    for name in trackers:
        package = TRACKER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"train.trackers lists {name!r} but the {package} package is not installed: "
                f"pip install {package} (or drop {name!r} from train.trackers)"
            )


class Monitor:
    """Rank 0's record of a run: ``metrics.jsonl`` always (the report reads it), plus the trackers named
    in ``train.trackers``, all given the same numbers."""

    def __init__(self, out_dir: Path, enabled: bool, trackers: list, config: dict, run_id: str = ""):
        self.enabled = enabled
        self.trackers = []
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        self.trackers = [TRACKER_CLASSES[name](out_dir=out_dir, config=config, run_id=run_id) for name in trackers]

    def scalars(self, step: int, values: dict, record: str = "train") -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": record, "step": step, **values}) + "\n")
        for tr in self.trackers:
            tr.scalars(step, values)

    def moe(self, step: int, aux_losses: dict, metrics: dict) -> None:
        """Per-layer MoE diagnostics: each auxiliary loss, imbalance, entropy, gate, noise; expert load.

        Trackers get ``moe/layer{i}/aux_{name}`` and ``moe/layer{i}/{metric}`` scalars and a load histogram;
        metrics.jsonl gets one ``moe`` record with the same numbers (expert loads as lists)."""
        if not self.enabled:
            return
        record = {"kind": "moe", "step": step, **{f"aux/{n}": float(v) for n, v in aux_losses.items()}}
        scalars = {f"moe/{n.replace('/', '/aux_')}": float(v) for n, v in aux_losses.items()}
        histograms = {}
        for name, v in metrics.items():
            v = v.detach().float().cpu()
            record[name] = v.tolist() if v.numel() > 1 else float(v)
            if name.endswith("tokens_per_expert"):
                histograms[f"moe/{name}"] = v.round().long().numpy()
            else:
                scalars[f"moe/{name}"] = float(v)
        self.jsonl.write(json.dumps(record) + "\n")
        for tr in self.trackers:
            tr.scalars(step, scalars)
            for tag, counts in histograms.items():
                tr.histogram(step, tag, counts)

    def flush(self) -> None:
        if self.enabled:
            self.jsonl.flush()
            for tr in self.trackers:
                tr.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            for tr in self.trackers:
                tr.close()


COUNT_METRICS = ("tokens_per_expert", "dropped_slots")
"""Metrics that are counts: summed over micro-batches and ranks (every other metric is averaged)."""


class StepMoEMetrics:
    """The MoE losses and metrics of one optimizer step over **all** its micro-batches and, once
    reduced, all data-parallel ranks: counts summed, everything else averaged, and each layer's
    ``load_imbalance`` recomputed from the global token counts (a mean of per-rank ratios is not the
    ratio of the global load)."""

    def __init__(self):
        self.sums: dict = {}
        self.micro = 0

    def add(self, aux_losses: dict, metrics: dict) -> None:
        self.micro += 1
        items = [(f"aux:{n}", v) for n, v in aux_losses.items()] + [(f"m:{n}", v) for n, v in metrics.items()]
        for key, v in items:
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()

    def reduce(self) -> tuple[dict, dict]:
        """(aux losses name -> float, metrics name -> tensor) for the step, over every rank (one all-reduce)."""
        import torch.distributed as dist

        names = sorted(self.sums)
        flat = torch.cat([torch.tensor([float(self.micro)])] + [self.sums[n].reshape(-1) for n in names])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        total = max(float(flat[0]), 1.0)
        aux, metrics, i = {}, {}, 1
        for n in names:
            size = self.sums[n].numel()
            v = flat[i : i + size].view_as(self.sums[n])
            i += size
            kind, name = n.split(":", 1)
            if kind == "aux":
                aux[name] = float(v) / total
            else:
                metrics[name] = v if name.endswith(COUNT_METRICS) else v / total
        for name, counts in list(metrics.items()):
            if name.endswith("tokens_per_expert"):
                layer = name[: -len("tokens_per_expert")]
                metrics[layer + "load_imbalance"] = counts.max() / counts.mean().clamp_min(1e-12)
        return aux, metrics
