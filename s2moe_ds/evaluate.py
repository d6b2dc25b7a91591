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

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import check_compatible, load_for_eval
from .config import config_from_dict
from .configtools import arg_float, arg_int
from .data.loader import WindowSampler
from .data.prepare import DataError, load_split, read_meta
from .flops import flops_per_token
from .model import MoELanguageModel


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    run: str, data_dir: str | None = None, device: str | None = None
) -> tuple[MoELanguageModel, dict | None, dict]:
    """(model in eval mode on ``device``, the data's meta.json or None, info) from a run, a checkpoint, an
    exported folder or a single exported file. ``info['tokenizer']`` is the tokenizer when it is at hand
    (an exported folder carries its own; a run's comes from its prepared data folder)."""
    from .export import is_export, load_pretrained

    device = device or default_device()
    if is_export(run):
        model, tokenizer = load_pretrained(run, device)
        config = json.loads((Path(run) / "config.json").read_text())
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
    if data_dir:
        cfg.data.data_dir = data_dir
    meta = read_meta(cfg.data.data_dir)
    check_compatible(client, meta, str(path))
    model = MoELanguageModel(cfg.model)
    model.load_state_dict(state)
    model.eval().to(device)
    from .data.tokenizers import load_tokenizer

    return (
        model,
        meta,
        {
            "checkpoint": str(path),
            "step": client.get("step"),
            "config": cfg,
            "tokenizer": load_tokenizer(cfg.data.data_dir, meta),
            "tokenizer_kind": meta["tokenizer"],
            "data_dir": cfg.data.data_dir,
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


def main_eval(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="s2moe eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "run",
        help="run directory (train.out_dir), its checkpoints/ folder, one checkpoint tag folder, or an exported folder",
    )
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--k", type=arg_int(1), default=None, help="inference top-k (default: the config's eval_k)")
    ap.add_argument("--pathways", choices=["clean", "both"], default=None, help="S2MoE pathways at inference")
    ap.add_argument(
        "--weights",
        choices=["train", "per_k"],
        default=None,
        help="combine weights at an inference k other than the training k: 'train' (default) keeps "
        "the training rule, 'per_k' the old convention (probability at k=1)",
    )
    ap.add_argument("--batch-size", type=arg_int(1), default=32)
    ap.add_argument("--max-batches", type=arg_int(0), default=0, help="stop after this many batches (0: whole split)")
    ap.add_argument(
        "--data-dir",
        default=None,
        help="prepared data folder (default: the one in the run's config; an exported folder needs this or --text)",
    )
    ap.add_argument("--text", default=None, help="evaluate on this UTF-8 text file, encoded with the model's tokenizer")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, meta, info = load_model(args.run, args.data_dir, args.device)
    tokens, split = None, args.split
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
        tokens = np.asarray(info["tokenizer"].encode(text), dtype=np.int64)
        split = f"text {args.text}"
    elif meta is None:
        raise DataError(
            f"{args.run} is an exported model: evaluate it on a text file (--text FILE) or a prepared "
            f"data folder with its vocabulary (--data-dir DIR)"
        )
    res = evaluate_model(
        model,
        meta,
        info["data_dir"],
        args.split,
        args.k,
        args.pathways,
        args.batch_size,
        args.max_batches,
        args.weights,
        tokens=tokens,
        tokenizer_kind=info["tokenizer_kind"],
    )
    res.split = split
    if res.tokens == 0:
        raise DataError(
            f"the {split} split gave no window of {model.cfg.context + 1} tokens to score; evaluate "
            f"another split or more text"
        )
    if args.json:
        print(json.dumps({**res.__dict__, "checkpoint": info["checkpoint"], "step": info["step"]}))
    else:
        print(f"[s2moe eval] {info['checkpoint']} (step {info['step']})")
        print(f"[s2moe eval] {res.line()}")
    if not math.isfinite(res.loss):
        print(
            f"s2moe eval: error: the loss of {info['checkpoint']} is {res.loss}: its weights are not finite (a "
            f"diverged run); evaluate an earlier checkpoint (a tag folder under checkpoints/)",
            file=sys.stderr,
        )
        return 3
    return 0


def main_sample(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="s2moe sample", description="Generate text from a trained run or an exported folder."
    )
    ap.add_argument("run")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--tokens", type=arg_int(1), default=200)
    ap.add_argument("--temperature", type=arg_float(0.0, inclusive=False), default=0.8)
    ap.add_argument("--top-k", type=arg_int(0), default=0, help="sample among the k likeliest tokens (0: all)")
    ap.add_argument(
        "--top-p",
        type=arg_float(0.0, inclusive=False),
        default=1.0,
        help="sample among the likeliest tokens whose probabilities reach this (1: all)",
    )
    ap.add_argument("--greedy", action="store_true", help="always the likeliest token")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    ap.add_argument("--k", type=arg_int(1), default=None, help="inference top-k experts")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    ap.add_argument("--seed", type=arg_int(0), default=0)
    args = ap.parse_args(argv)
    if not args.prompt:
        raise ValueError("--prompt must hold at least one character (the text to continue); e.g. --prompt 'def '")
    if args.top_p > 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    torch.manual_seed(args.seed)
    model, meta, info = load_model(args.run, device=args.device)
    model.set_inference(k=args.k)
    tok = info["tokenizer"]
    dev = next(model.parameters()).device
    idx = torch.tensor([tok.encode(args.prompt)], dtype=torch.long, device=dev)
    out = model.generate(
        idx,
        args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        use_cache=not args.no_cache,
    )
    print(tok.decode(out[0].tolist()))
    return 0
