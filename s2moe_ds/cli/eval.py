"""``s2moe eval``: loss, bits per character (or perplexity) and FLOPs per token of a trained model."""

from __future__ import annotations

import argparse
import json
import math

from .. import evaluate
from .argtypes import arg_int

HELP = "evaluate a run, checkpoint or exported folder on a split or a text file"
DESCRIPTION = evaluate.__doc__


def add_arguments(ap: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    from ..train.hooks import NonFiniteLoss

    res, info = evaluate.evaluate_checkpoint(
        args.run, args.split, args.k, args.pathways, args.weights, args.batch_size, args.max_batches,
        args.data_dir, args.text, args.device,
    )  # fmt: skip
    if args.json:
        print(json.dumps({**res.__dict__, "checkpoint": info["checkpoint"], "step": info["step"]}))
    else:
        print(f"[s2moe eval] {info['checkpoint']} (step {info['step']})")
        print(f"[s2moe eval] {res.line()}")
    if not math.isfinite(res.loss):
        raise NonFiniteLoss(
            f"the loss of {info['checkpoint']} is {res.loss}: its weights are not finite (a diverged run); "
            f"evaluate an earlier checkpoint (a tag folder under checkpoints/)"
        )
    return 0
