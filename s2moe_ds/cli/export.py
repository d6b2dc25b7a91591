"""``s2moe export``: a checkpoint of any parallel layout as a self-contained Hugging Face-style folder."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "write a checkpoint as a self-contained folder (Hugging Face layout)"
DESCRIPTION = (
    "Write a checkpoint (any parallel layout) as a self-contained folder in the Hugging Face layout: "
    "config.json, model.safetensors (sharded above --max-shard-size), the tokenizer (AutoTokenizer loads it); "
    "a stock transformers architecture where the model is exactly one (a llama-style block; docs/export.md). "
    "`s2moe eval/sample FOLDER` and s2moe_ds.load_pretrained(FOLDER) need nothing else."
)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("run", help="run directory, checkpoints/ folder or checkpoint tag folder")
    ap.add_argument(
        "--out",
        required=True,
        help="a new folder (an --out ending in .safetensors writes the old single file, deprecated)",
    )
    ap.add_argument(
        "--data-dir",
        default=None,
        help="the run's prepared data folder, for its tokenizer (default: the one in the run's config)",
    )
    ap.add_argument(
        "--format",
        default="auto",
        choices=("auto", "stock", "s2moe"),
        help="auto (default): a stock transformers architecture (Mixtral, Qwen3-MoE) where the model is exactly "
        "one, else this package's own; stock: refuse, saying why, when none fits; s2moe: always our own "
        "(loads in transformers with trust_remote_code and s2moe_ds installed)",
    )
    ap.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest weights file; bigger models are sharded with an index file (default 5GB)",
    )


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.export import export_pretrained, export_safetensors, parse_size
    from ..configtools import ConfigError

    if not args.out.rstrip("/"):
        raise ConfigError(f"--out must name a folder to write, e.g. tiny-export; got {args.out!r}")
    if args.out.endswith(".safetensors"):
        if args.format == "stock":
            raise ConfigError(
                "--format stock writes a folder (config.json, weights, tokenizer); a single .safetensors file is "
                "this package's own format: give --out a folder name"
            )
        print(
            "[s2moe export] warning: a single .safetensors file is deprecated and will be removed in the next "
            "release: it holds no tokenizer; export into a folder instead (--out DIR)",
            file=sys.stderr,
        )
        out = export_safetensors(args.run, args.out)
        print(f"[s2moe export] wrote {out} ({out.stat().st_size:,} bytes)")
        return 0
    out = export_pretrained(args.run, args.out, args.data_dir, parse_size(args.max_shard_size), args.format)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir())
    kind = json.loads((out / "config.json").read_text())["model_type"]
    how = "stock transformers architecture" if kind != "s2moe" else "s2moe's own architecture (trust_remote_code)"
    print(f"[s2moe export] wrote {out} as {kind} ({how}): {', '.join(files)} ({size:,} bytes)")
    return 0
