"""Helpers for end-to-end tests that run the real `deepspeed` launcher and CLI in subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{e.get('PYTHONPATH', '')}"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(
    cmd: list[str], timeout: int = 300, cwd: Path = REPO, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command; a hang fails the test at ``timeout`` instead of hanging CI."""
    proc = subprocess.run(
        cmd, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout
    )
    return proc


FAULT_TRAIN = "tests/fault_train.py"
"""The training entry point with fault-injection hooks (S2MOE_INJECT_* variables) installed."""


def deepspeed_cmd(
    nproc: int, overrides: list[str], config: str = "configs/tiny.yaml", faults: bool = False
) -> list[str]:
    """The ``deepspeed`` launcher command for ``s2moe_ds.train`` (or, with ``faults``, the fault-injecting
    entry point) on a free port."""
    entry = [FAULT_TRAIN] if faults else ["--module", "s2moe_ds.train"]
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
            *entry, "--config", config, *overrides]  # fmt: skip


def deepspeed_train(nproc: int, overrides: list[str], config: str = "configs/tiny.yaml", timeout: int = 300):
    cmd = deepspeed_cmd(nproc, overrides, config)
    return run(cmd, timeout=timeout)


def single_train(
    overrides: list[str], config: str = "configs/tiny.yaml", timeout: int = 300, extra_env: dict | None = None
):
    """One plain process; with S2MOE_INJECT_* in ``extra_env``, the fault-injecting entry point."""
    faults = any(k.startswith("S2MOE_INJECT_") for k in extra_env or {})
    entry = [FAULT_TRAIN] if faults else ["-m", "s2moe_ds.train"]
    return run([sys.executable, *entry, "--config", config, *overrides], timeout=timeout, extra_env=extra_env)


def cli(*args: str, timeout: int = 300):
    return run([sys.executable, "-m", "s2moe_ds.cli", *args], timeout=timeout)


def train_losses(out_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            losses[rec["step"]] = rec["train/loss"]
    return losses


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )


def snapshot(root: Path) -> dict:
    """sha256 of every file under ``root`` by relative path: compare before and after to show nothing changed.
    The run directory's lock file (``.s2moe.lock``: who holds, or last held, the directory) is left out."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".s2moe.lock"
    }
