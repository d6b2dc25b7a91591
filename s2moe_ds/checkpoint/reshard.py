"""``s2moe reshard SRC DST``: a checkpoint converted into another parallel layout ahead of time.

It loads SRC's checkpoint into a run with the new layout (through its portable copy, ``portable.py``) and
saves it at once into DST, a native checkpoint of that layout (for DeepSpeed's own tools, or to stop
relying on the portable copy), without training a step.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from ..configtools import ConfigError
from .portable import read_layout, require_portable
from .store import (
    CheckpointError,
    checkpoint_tags,
    find_checkpoint,
    read_client_state,
    verify_checkpoint,
    write_config,
)


def _train_command(nproc: int, args: list[str]) -> list[str]:
    """The training command for ``nproc`` processes (the ``deepspeed`` launcher beside this Python)."""
    from ..distributed import free_port

    if nproc == 1:
        return [sys.executable, "-m", "s2moe_ds.train", *args]
    launcher = Path(sys.executable).parent / "deepspeed"
    return [
        str(launcher) if launcher.exists() else "deepspeed",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        "--module",
        "s2moe_ds.train",
        *args,
    ]


def reshard_run(src: str, dst: str, nproc: int, overrides: list[str]) -> Path:
    """Write SRC's newest checkpoint (a run dir, checkpoints dir or tag dir) into the new run dir DST in
    the layout ``nproc`` processes and ``overrides`` (``model.moe.ep_size``, ``model.moe.backend``,
    ``train.ds_config``, ``train.grad_accum`` ...) give, model and optimizer state; returns DST's tag."""
    ckpt = find_checkpoint(src)
    verify_checkpoint(ckpt)
    client = read_client_state(ckpt)
    if "config" not in client or "step" not in client:
        raise CheckpointError(f"{ckpt} is not an s2moe_ds training checkpoint (no step/config in its client state)")
    require_portable(ckpt)
    out = Path(dst)
    if checkpoint_tags(out / "checkpoints"):
        raise ConfigError(f"{out} already holds checkpoints; give s2moe reshard a new run directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = "a file" if not out.is_dir() else ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ConfigError(
            f"{out} already holds something ({held}); s2moe reshard writes a new run: give a new or empty folder"
        )
    source_run = ckpt.resolve().parent.parent if ckpt.resolve().parent.name == "checkpoints" else ckpt.resolve()
    if out.resolve().is_relative_to(source_run):
        raise ConfigError(f"{out} is inside the source run {source_run}; give a folder outside it")
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    out.mkdir(parents=True, exist_ok=True)
    source_cfg = out / "source_config.yaml"
    source_cfg.write_text(yaml.safe_dump(client["config"], sort_keys=False))
    step = int(client["step"])
    args = [
        "--config",
        str(source_cfg),
        *overrides,
        f"train.out_dir={out}",
        f"train.resume={ckpt}",
        f"train.stop_at_step={step}",
        "train.progress=false",
    ]
    cmd = _train_command(nproc, args)
    print("+ " + shlex.join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise CheckpointError(f"resharding {ckpt} into {out} failed (see the messages above); {ckpt} is unchanged")
    new = out / "checkpoints" / f"step{step:07d}"
    if not new.is_dir():
        raise CheckpointError(f"resharding wrote no checkpoint {new}; {ckpt} is unchanged")
    # DST continues the run: same config, the new layout, resumed automatically, no stop step
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["train"].update(resume="auto", stop_at_step=0)
    write_config(out, cfg)
    source_cfg.unlink()
    launch = "python -m s2moe_ds.train" if nproc == 1 else f"deepspeed --num_gpus {nproc} --module s2moe_ds.train"
    print(
        f"[s2moe reshard] {ckpt} ({read_layout(ckpt, client)}) -> {new} ({read_layout(new)}) at step {step}; "
        f"continue the run with: {launch} --config {out / 'config.yaml'}",
        flush=True,
    )
    return new
