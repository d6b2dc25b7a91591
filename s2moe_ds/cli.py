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
from pathlib import Path

from .configtools import ConfigError, arg_int


def main_prepare(argv=None) -> int:
    from .config import load_config
    from .data.prepare import prepare

    ap = argparse.ArgumentParser(prog="s2moe prepare", description="Tokenise a corpus into data.data_dir.")
    ap.add_argument("--config", help="config whose data section to use (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="e.g. data.dataset=shakespeare data.source=PATH data.data_dir=DIR")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides).data
    meta = prepare(cfg.dataset, cfg.data_dir, cfg.source, cfg.tokenizer, cfg.vocab_size)
    print(f"[s2moe prepare] {cfg.dataset} -> {cfg.data_dir}: vocab {meta['vocab_size']} ({meta['tokenizer']}), "
          + ", ".join(f"{s} {n:,}" for s, n in meta["splits"].items()) + " tokens")
    return 0


def main_export(argv=None) -> int:
    from .checkpoint import export_safetensors

    ap = argparse.ArgumentParser(prog="s2moe export", description="Write a checkpoint (any parallel layout) as one "
                                 "consolidated .safetensors file with its config; `s2moe eval FILE` reads it.")
    ap.add_argument("run", help="run directory, checkpoints/ folder or checkpoint tag folder")
    ap.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    args = ap.parse_args(argv)
    if not args.out or args.out.endswith("/") or Path(args.out).is_dir():
        raise ConfigError(f"--out must name a file to write, e.g. model.safetensors; got {args.out!r}")
    out = export_safetensors(args.run, args.out)
    print(f"[s2moe export] wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


def main_reshard(argv=None) -> int:
    from .reshard import reshard_run

    ap = argparse.ArgumentParser(prog="s2moe reshard", description="Write a checkpoint (model and optimizer state) "
                                 "into a new run directory in another parallel layout: world size, expert-parallel "
                                 "size, backend or ZeRO stage. (train.resume=auto does this by itself when a run is "
                                 "resumed under another layout; this writes the converted checkpoint ahead of time.)")
    ap.add_argument("src", help="run directory, checkpoints/ folder or checkpoint tag folder")
    ap.add_argument("dst", help="new run directory")
    ap.add_argument("--nproc", type=arg_int(1), default=1, help="processes of the new layout (>1: the deepspeed launcher)")
    ap.add_argument("overrides", nargs="*", help="the new layout, e.g. model.moe.ep_size=1 model.moe.backend=local "
                                                 "train.grad_accum=2 (keep the global batch)")
    args = ap.parse_intermixed_args(argv)  # overrides may follow --nproc
    reshard_run(args.src, args.dst, args.nproc, args.overrides)
    return 0


def main_train(argv=None) -> int:
    from .train import main

    return main(argv)


COMMANDS = {"prepare": main_prepare, "train": main_train, "export": main_export, "reshard": main_reshard}


def main(argv=None) -> int:
    from .evaluate import main_eval, main_sample

    from .experiment import main_experiment
    from .report import main_report

    commands = {**COMMANDS, "eval": main_eval, "sample": main_sample, "experiment": main_experiment,
                "report": main_report}
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
