"""``s2moe prepare``: tokenise a corpus into data.data_dir."""

from __future__ import annotations

import argparse

HELP = "tokenise a corpus into data.data_dir"
DESCRIPTION = (
    "Tokenise a corpus into data.data_dir (data.dataset=corpus streams files, folders or globs of "
    ".txt/.jsonl/.gz; see docs/data.md)."
)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="config whose data section to use: a file, or a shipped config by name (tiny)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines on stderr")
    ap.add_argument(
        "--force",
        action="store_true",
        help="replace a data.data_dir that holds other prepared data (runs trained on it depend on it)",
    )
    ap.add_argument("overrides", nargs="*", help="e.g. data.dataset=shakespeare data.source=PATH data.data_dir=DIR")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data.prepare import prepare_config

    cfg = load_config(args.config, args.overrides).data
    cfg.check_tokenizer_file()
    meta = prepare_config(cfg, progress=not args.no_progress, force=args.force)
    docs = (
        f" ({', '.join(f'{s} {n:,}' for s, n in meta['documents'].items())} documents)" if "documents" in meta else ""
    )
    print(
        f"[s2moe prepare] {cfg.dataset} -> {cfg.data_dir}: vocab {meta['vocab_size']} ({meta['tokenizer']}, "
        f"{meta['dtype']}), " + ", ".join(f"{s} {n:,}" for s, n in meta["splits"].items()) + f" tokens{docs}"
    )
    return 0
