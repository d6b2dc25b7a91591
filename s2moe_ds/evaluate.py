"""Evaluate a trained run: loss, bits per character (or perplexity), FLOPs per token, on val or test.

    s2moe eval runs/tiny                         # latest checkpoint, val split, the trained eval_k
    s2moe eval runs/tiny --split test --k 2      # inference top-k override
    s2moe eval runs/tiny --pathways both         # S2MoE: noisy pathway too at inference
    s2moe eval runs/tiny --k 1 --weights per_k   # the old combine-weight convention at another k
    s2moe sample runs/tiny --prompt "def " --tokens 200

The split is walked in consecutive non-overlapping windows of the model's context (every token
scored once, each with between 1 and ``context`` tokens of history).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint.export import export_config, load_for_eval, run_tokenizer
from .checkpoint.resume import check_compatible
from .config import config_from_dict
from .configtools import ConfigError
from .data.errors import DataError
from .data.loader import WindowSampler
from .data.store import load_split, read_meta
from .flops import flops_per_token
from .model import MoELanguageModel


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """A ``--device`` this machine has, or one line saying why not and what to give instead."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device; give cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = (
            "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        )
        raise ConfigError(
            f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}, {build}); use --device cpu"
        )
    return device


def note_other_corpus(trained_on: dict, meta: dict, data_dir: str) -> None:
    """The vocabulary fits but the corpus is not the one the run was trained on: say so (evaluating on
    another corpus is allowed; the numbers are that corpus's)."""
    import sys

    for key in ("dataset", "source_sha256"):
        if trained_on.get(key) and meta.get(key) and trained_on[key] != meta[key]:
            print(
                f"[s2moe] note: {data_dir} is not the corpus this run was trained on ({key} {meta[key]!r}, the run's "
                f"{trained_on[key]!r}); the vocabulary fits, so it is evaluated, and the numbers are that corpus's",
                file=sys.stderr,
                flush=True,
            )
            return


def load_model(
    run: str, data_dir: str | None = None, device: str | None = None
) -> tuple[MoELanguageModel, dict | None, dict]:
    """(model in eval mode on ``device``, the data's meta.json or None, info) from a run, a checkpoint, an
    exported folder or a single exported file. ``info['tokenizer']`` is the tokenizer when it is at hand
    (an exported folder carries its own; a run's comes from its prepared data folder)."""
    from .checkpoint.export import is_export, load_pretrained

    device = check_device(device or default_device())
    if is_export(run):
        model, tokenizer = load_pretrained(run, device)
        config = export_config(run)
        meta = None
        if data_dir:
            meta = read_meta(data_dir)
            check_compatible({"vocab_fingerprint": config.get("s2moe_vocab_fingerprint")}, meta, str(run))
        info = {
            "checkpoint": str(run),
            "step": config.get("s2moe_step"),
            "config": None,
            "tokenizer": tokenizer,
            "tokenizer_kind": config.get("s2moe_tokenizer", "char"),
            "data_dir": data_dir,
        }
        return model, meta, info
    state, client, path = load_for_eval(run)
    cfg = config_from_dict(client["config"])
    # evaluation runs in one process: experts of any expert-parallel layout are loaded stacked, locally
    cfg.model.moe.backend, cfg.model.moe.ep_size = "local", 1
    tokenizer, meta = run_tokenizer(client, data_dir, path)
    if data_dir:
        cfg.data.data_dir = data_dir
    if meta is not None:
        note_other_corpus(client.get("data") or {}, meta, cfg.data.data_dir)
    model = MoELanguageModel(cfg.model)
    model.load_state_dict(state)
    model.eval().to(device)
    return (
        model,
        meta,
        {
            "checkpoint": str(path),
            "step": client.get("step"),
            "config": cfg,
            "tokenizer": tokenizer,
            "tokenizer_kind": tokenizer.kind,
            "data_dir": cfg.data.data_dir if meta is not None else None,
        },
    )


@dataclass
class EvalResult:
    split: str
    tokens: int
    loss: float
    metric: str
    value: float
    k: int
    pathways: str
    inference_gflops_per_token: float
    tokens_per_sec: float
    params_total: int
    params_active: int

    def line(self) -> str:
        return (
            f"{self.split}: loss {self.loss:.4f} nats/token, {self.metric} {self.value:.4f} over {self.tokens:,} tokens | "
            f"inference top-{self.k} ({self.pathways} pathway{'s' if self.pathways == 'both' else ''}): "
            f"{self.inference_gflops_per_token * 1e3:.3f} MFLOPs/token, {self.tokens_per_sec:,.0f} tokens/s, "
            f"params {self.params_active:,} active of {self.params_total:,}"
        )


def quality(loss_nats: float, tokenizer: str) -> tuple[str, float]:
    """Bits per character for character/byte models, perplexity for subword models (SentencePiece or a
    Hugging Face tokenizer)."""
    if tokenizer != "char":
        return "ppl", math.exp(min(loss_nats, 50.0))
    return "bpc", loss_nats / math.log(2)


@torch.no_grad()
def summed_loss(forward, windows, device) -> torch.Tensor:
    """``[sum of token losses, token count]`` (float64) of ``forward`` (a model or a DeepSpeed engine) over
    ``windows`` (x, y batches): the one evaluation loop, used by ``s2moe eval`` over a whole split and by
    the trainer's periodic validation over the first batches of the same walk."""
    acc = torch.zeros(2, dtype=torch.float64)
    for x, y in windows:
        out = forward(x.to(device), y.to(device))
        acc += torch.tensor([float(out.loss) * y.numel(), y.numel()], dtype=torch.float64)
    return acc


@torch.no_grad()
def evaluate_model(
    model: MoELanguageModel,
    meta: dict | None,
    data_dir: str | None,
    split: str = "val",
    k: int | None = None,
    pathways: str | None = None,
    batch_size: int = 32,
    max_batches: int = 0,
    weights: str | None = None,
    tokens=None,
    tokenizer_kind: str | None = None,
) -> EvalResult:
    """Loss and bits per character (perplexity for subwords) over a split of prepared data, or over
    ``tokens`` (e.g. a text file encoded with the model's tokenizer)."""
    model.set_inference(k=k, pathways=pathways, weights=weights)
    eff_k, eff_pathways = model.inference()
    mcfg = model.cfg
    dev = next(model.parameters()).device
    sampler = WindowSampler(load_split(data_dir, split, meta) if tokens is None else tokens, mcfg.context)
    t0 = time.perf_counter()
    total, count = summed_loss(model, sampler.sequential(batch_size, max_batches), dev).tolist()
    count = int(count)
    elapsed = time.perf_counter() - t0
    loss = total / max(count, 1)
    metric, value = quality(loss, tokenizer_kind or meta["tokenizer"])
    counts = model.param_counts()
    return EvalResult(
        split,
        count,
        loss,
        metric,
        value,
        eff_k,
        eff_pathways if mcfg.moe.s2moe.enabled else "clean",
        flops_per_token(mcfg, training=False, k=eff_k, pathways=eff_pathways) / 1e9,
        count / max(elapsed, 1e-9),
        counts["total"],
        counts["active_per_token"],
    )


def evaluate_checkpoint(
    run: str,
    split: str = "val",
    k: int | None = None,
    pathways: str | None = None,
    weights: str | None = None,
    batch_size: int = 32,
    max_batches: int = 0,
    data_dir: str | None = None,
    text: str | None = None,
    device: str | None = None,
) -> tuple[EvalResult, dict]:
    """``evaluate_model`` of a run, checkpoint or exported folder (``load_model``) on a split of its data or
    on a UTF-8 text ``file``; (the result, ``load_model``'s info)."""
    torch.manual_seed(0)
    model, meta, info = load_model(run, data_dir, device)
    tokens, label = None, split
    if text:
        try:
            content = Path(text).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--text {text} is not UTF-8 text ({e})") from None
        tokens = np.asarray(info["tokenizer"].encode(content), dtype=np.int64)
        label = f"text {text}"
    elif meta is None:
        what = "an exported model" if info["config"] is None else "a run whose prepared data folder is not there"
        raise DataError(
            f"{run} is {what}: evaluate it on a text file (--text FILE) or a prepared data folder with its "
            f"vocabulary (--data-dir DIR)"
        )
    res = evaluate_model(
        model,
        meta,
        info["data_dir"],
        split,
        k,
        pathways,
        batch_size,
        max_batches,
        weights,
        tokens=tokens,
        tokenizer_kind=info["tokenizer_kind"],
    )
    res.split = label
    if res.tokens == 0:
        raise DataError(
            f"the {label} split gave no window of {model.cfg.context + 1} tokens to score; evaluate "
            f"another split or more text"
        )
    return res, info


def sample_text(
    run: str, prompt: str, tokens: int, k: int | None = None, device: str | None = None, seed: int = 0, **generate
) -> str:
    """``prompt`` continued by ``tokens`` tokens of a run, checkpoint or exported folder; ``generate``:
    ``MoELanguageModel.generate``'s sampling options (temperature, top_k, top_p, greedy, use_cache)."""
    torch.manual_seed(seed)
    model, _, info = load_model(run, device=device)
    model.set_inference(k=k)
    tok = info["tokenizer"]
    idx = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=next(model.parameters()).device)
    out = model.generate(idx, tokens, **generate)
    return tok.decode(out[0].tolist())
