"""The `s2moe` command: prepare data, train (one process; use the `deepspeed` launcher for more),
evaluate, sample, run experiment suites and write their report.

    s2moe prepare --config configs/tiny.yaml
    s2moe train --config configs/tiny.yaml train.steps=50      # single process
    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml
    s2moe eval runs/tiny
    s2moe sample runs/tiny --prompt "def "
    s2moe export runs/tiny --out tiny.safetensors           # consolidated, any expert-parallel layout
    s2moe reshard runs/ep2 runs/ep1 --nproc 1 model.moe.ep_size=1 train.grad_accum=2   # another layout
    s2moe experiment cpu-shakespeare                         # a suite of runs -> results/cpu-shakespeare
    s2moe report results/cpu-shakespeare                     # -> docs/results.md with plots
"""

from __future__ import annotations

import argparse
import sys

from .configtools import ConfigError, arg_int


def main_prepare(argv=None) -> int:
    from .config import load_config
    from .data.prepare import prepare_config

    ap = argparse.ArgumentParser(
        prog="s2moe prepare",
        description="Tokenise a corpus into data.data_dir "
        "(data.dataset=corpus streams files, folders or globs of .txt/.jsonl/.gz; "
        "see docs/data.md).",
    )
    ap.add_argument("--config", help="config whose data section to use (configs/*.yaml)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines on stderr")
    ap.add_argument("overrides", nargs="*", help="e.g. data.dataset=shakespeare data.source=PATH data.data_dir=DIR")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides).data
    cfg.check_tokenizer_file()
    meta = prepare_config(cfg, progress=not args.no_progress)
    docs = (
        f" ({', '.join(f'{s} {n:,}' for s, n in meta['documents'].items())} documents)" if "documents" in meta else ""
    )
    print(
        f"[s2moe prepare] {cfg.dataset} -> {cfg.data_dir}: vocab {meta['vocab_size']} ({meta['tokenizer']}, "
        f"{meta['dtype']}), " + ", ".join(f"{s} {n:,}" for s, n in meta["splits"].items()) + f" tokens{docs}"
    )
    return 0


def main_export(argv=None) -> int:
    from .checkpoint import export_safetensors
    from .export import export_pretrained, parse_size

    ap = argparse.ArgumentParser(
        prog="s2moe export",
        description="Write a checkpoint (any parallel layout) as a "
        "self-contained folder in the Hugging Face layout: config.json, model.safetensors "
        "(sharded above --max-shard-size), the tokenizer; `s2moe eval/sample FOLDER` and "
        "s2moe_ds.load_pretrained(FOLDER) need nothing else.",
    )
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
        "--max-shard-size",
        default="5GB",
        help="largest weights file; bigger models are sharded with an index file (default 5GB)",
    )
    args = ap.parse_args(argv)
    if not args.out or args.out.endswith("/") and args.out.rstrip("/") == "":
        raise ConfigError(f"--out must name a folder to write, e.g. tiny-export; got {args.out!r}")
    if args.out.endswith(".safetensors"):
        print(
            "[s2moe export] warning: a single .safetensors file is deprecated and will be removed in the next "
            "release: it holds no tokenizer; export into a folder instead (--out DIR)",
            file=sys.stderr,
        )
        out = export_safetensors(args.run, args.out)
        print(f"[s2moe export] wrote {out} ({out.stat().st_size:,} bytes)")
        return 0
    out = export_pretrained(args.run, args.out, args.data_dir, parse_size(args.max_shard_size))
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"[s2moe export] wrote {out}: {', '.join(files)} ({size:,} bytes)")
    return 0


def main_reshard(argv=None) -> int:
    from .reshard import reshard_run

    ap = argparse.ArgumentParser(
        prog="s2moe reshard",
        description="Write a checkpoint (model and optimizer state) "
        "into a new run directory in another parallel layout: world size, expert-parallel "
        "size, backend or ZeRO stage. (train.resume=auto does this by itself when a run is "
        "resumed under another layout; this writes the converted checkpoint ahead of time.)",
    )
    ap.add_argument("src", help="run directory, checkpoints/ folder or checkpoint tag folder")
    ap.add_argument("dst", help="new run directory")
    ap.add_argument(
        "--nproc", type=arg_int(1), default=1, help="processes of the new layout (>1: the deepspeed launcher)"
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        help="the new layout, e.g. model.moe.ep_size=1 model.moe.backend=local "
        "train.grad_accum=2 (keep the global batch)",
    )
    args = ap.parse_intermixed_args(argv)  # overrides may follow --nproc
    reshard_run(args.src, args.dst, args.nproc, args.overrides)
    return 0


def main_train(argv=None) -> int:
    from .train import main

    return main(argv)


COMMANDS = {"prepare": main_prepare, "train": main_train, "export": main_export, "reshard": main_reshard}


def main(argv=None) -> int:
    from .evaluate import main_eval, main_sample
    from .experiments.report import main_report
    from .experiments.runner import main_experiment

    commands = {
        **COMMANDS,
        "eval": main_eval,
        "sample": main_sample,
        "experiment": main_experiment,
        "report": main_report,
    }
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}; valid commands: {', '.join(commands)}", file=sys.stderr)
            return 2
        return 0
    try:
        return commands[argv[0]](argv[1:])
    except (ConfigError, ValueError) as e:
        # configuration and data errors: one clear line, no traceback
        print(f"s2moe {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command reads or writes: name it and the cause
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"s2moe {argv[0]}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
