"""``s2moe sample``: generate text from a trained run or an exported folder."""

from __future__ import annotations

import argparse

from ..configtools import ConfigError
from .argtypes import arg_float, arg_int

HELP = "generate text from a run, checkpoint or exported folder"
DESCRIPTION = "Generate text from a trained run or an exported folder."


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("run", help="a run directory, a checkpoint folder in it, or an exported folder")
    ap.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    ap.add_argument("--tokens", type=arg_int(1), default=200, help="how many tokens to generate (default: 200)")
    ap.add_argument(
        "--temperature",
        type=arg_float(0.0, inclusive=False),
        default=0.8,
        help="divide the logits by this before sampling: lower is more conservative (default: 0.8)",
    )
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
    ap.add_argument("--seed", type=arg_int(0), default=0, help="the sampling seed: the same seed, the same text")


def run(args: argparse.Namespace) -> int:
    from ..evaluate import sample_text

    if not args.prompt:
        raise ConfigError("--prompt must hold at least one character (the text to continue); e.g. --prompt 'def '")
    if args.top_p > 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    text = sample_text(
        args.run, args.prompt, args.tokens, k=args.k, device=args.device, seed=args.seed,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
        use_cache=not args.no_cache,
    )  # fmt: skip
    print(text)
    return 0
