"""DeepSpeed's CPU shared-memory comm op: built only for jobs that need it, in a folder of this environment's
own, under a lock that is never taken from another builder.

DeepSpeed's CPU backend JIT-compiles the op (``deepspeed_shm_comm``) the first time a process group starts
and loads it on every start after. What went wrong before, and the rule for each:

- **A one-process job waited for it.** The op only speeds up collectives between processes; a job of one
  process skips it (``skip_shm_comm_op``) and starts in seconds on a fresh install.
- **Two environments waited on each other.** Every build shared ``~/.cache/torch_extensions``; now, unless
  ``TORCH_EXTENSIONS_DIR`` is set, the build folder is this interpreter's own (``extensions_root``), keyed by
  its prefix and the torch and DeepSpeed versions.
- **A killed build hung every later start, or a start removed another builder's lock.** torch guards each
  build (and each load) with a ``lock`` file it waits on forever, silently. s2moe builds under an ``flock`` of
  its own (released by the kernel when its holder dies) and marks the build it starts; a torch lock found
  with that mark, while holding the flock, was left by a killed s2moe build and is removed. A torch lock
  without the mark belongs to some other process: it is waited for, reported after a few seconds with what
  would skip the wait, and never removed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from .configtools import ConfigError

BUILD_LOCK = "s2moe-build.lock"
BUILD_MARK = "s2moe-building"  # present while an s2moe process builds or loads the op
OP_NAME = "deepspeed_shm_comm"
BUILD_WAIT_S = 1200
NOTE_AFTER_S = 3.0


def job_world_size() -> int:
    """The number of processes in this job, from what the launcher exported (1 for a plain process)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def environment_key() -> str:
    import deepspeed
    import torch

    text = f"{sys.prefix}\0{torch.__version__}\0{deepspeed.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def extensions_root() -> Path:
    """``TORCH_EXTENSIONS_DIR`` when set; else a folder of this environment's own: inside a virtual
    environment (deleted with it), else under ``~/.cache/torch_extensions/s2moe-<key>``; set into the
    environment so torch's builder, and every process this one starts, use the same folder."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import deepspeed
    import torch

    versions = f"torch{torch.__version__}-deepspeed{deepspeed.__version__}".replace("+", "_")
    in_venv = sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK)
    root = (
        Path(sys.prefix) / "torch_extensions" / versions
        if in_venv
        else Path.home() / ".cache" / "torch_extensions" / f"s2moe-{environment_key()}"
    )
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    return root


def needs_comm_op(world_size: int) -> bool:
    from deepspeed.accelerator import get_accelerator

    return world_size > 1 and get_accelerator().device_name() == "cpu"


def prepare_comm_op(world_size: int | None = None, wait_s: float = BUILD_WAIT_S, log=print) -> list:
    """Make DeepSpeed's CPU comm op ready for a process group of ``world_size`` (default: this job's): a
    job of one process, or one on an accelerator, skips it; else build or load it under our lock. Returns
    the torch locks of killed s2moe builds it removed."""
    from .checkpoint.deepspeed_private import skip_shm_comm_op

    world_size = job_world_size() if world_size is None else world_size
    if not needs_comm_op(world_size):
        if world_size == 1:
            skip_shm_comm_op()
        return []
    import fcntl

    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    lock_path, mark = root / BUILD_LOCK, root / BUILD_MARK
    with open(lock_path, "a") as fh:
        wait_for(lambda: not _try_flock(fh, fcntl), wait_s, log, f"another s2moe process building it ({lock_path})")
        try:
            removed = _clear_killed_build(root, mark, log)
            torch_lock = root / OP_NAME / "lock"
            wait_for(
                torch_lock.exists,
                wait_s,
                log,
                f"a build that is not s2moe's: torch's lock {torch_lock}",
                f"if no process is building it (a build killed outside s2moe leaves the file), remove {torch_lock}",
            )
            mark.write_text(str(os.getpid()))
            from deepspeed.comm.torch import build_shm_op

            build_shm_op()
            mark.unlink(missing_ok=True)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return removed


def _try_flock(fh, fcntl) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _clear_killed_build(root: Path, mark: Path, log) -> list:
    """With our flock held, a mark left behind means its s2moe builder died mid-build: the torch lock it
    left is its own, so it goes."""
    if not mark.exists():
        return []
    stale = root / OP_NAME / "lock"
    removed = []
    if stale.exists():
        stale.unlink()
        removed.append(stale)
        log(f"[s2moe] removed the torch build lock a killed s2moe build left behind: {stale}", flush=True)
    mark.unlink(missing_ok=True)
    return removed


def wait_for(busy, wait_s: float, log, what: str, fix: str = "check that process (`fuser` on the file)") -> None:
    """Poll ``busy()`` until it is false: say what is awaited (and how to skip it) after a few seconds and
    every 30 s after, give up with a ConfigError (saying ``fix``) after ``wait_s``."""
    start, last_note = time.monotonic(), None
    while busy():
        waited = time.monotonic() - start
        skip = "a single-process job needs no comm op; or point TORCH_EXTENSIONS_DIR to a folder of its own"
        if waited > wait_s:
            raise ConfigError(
                f"waited {waited:.0f} s for {what} to finish building DeepSpeed's CPU comm op; {fix}; or {skip}"
            )
        if waited >= min(NOTE_AFTER_S, wait_s / 2) and (last_note is None or time.monotonic() - last_note >= 30):
            log(
                f"[s2moe] waiting for {what} to finish building DeepSpeed's CPU comm op ({waited:.0f} s so far, "
                f"giving up after {wait_s:.0f} s; {skip})",
                flush=True,
            )
            last_note = time.monotonic()
        time.sleep(0.2)
