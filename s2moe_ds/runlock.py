"""One job per run directory: an exclusive OS lock on ``{out_dir}/.s2moe.lock`` for the job's lifetime.

Two jobs on one ``train.out_dir`` (a requeued job starting while the old one still runs, a command run
twice) would interleave their logs and write into the same checkpoint tags. Rank 0 of a job takes an
``flock`` on the lock file before anything is written; the kernel releases it when the process exits,
however it exits (SIGKILL included), so a crash never leaves a stale lock. A second job fails at once
with the holder's host, pid and start time, and writes nothing. (``flock`` on a network file system
works where the file system supports it: NFSv4, Lustre with ``flock`` mounts; not on NFSv3.)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import IO

from .configtools import ConfigError

LOCK_FILE = ".s2moe.lock"


def acquire_run_lock(out_dir: str | Path) -> IO:
    """Take the run directory's lock (creating the directory); returns the open file that holds it
    (keep it open: closing it releases the lock). Raises ConfigError naming the holder if held."""
    import fcntl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = _describe(fh.read())
        fh.close()
        raise ConfigError(
            f"train.out_dir {str(out_dir)!r} is in use by another job ({holder}); wait for it to "
            f"finish or stop it, or choose another train.out_dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
        )
    )
    fh.flush()
    return fh


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def lock_run_dir(out_dir: str | Path, rank: int) -> IO | None:
    """Rank 0 takes the lock; every rank learns the outcome, so a refused job stops on all ranks."""
    import torch.distributed as dist

    from .distributed import broadcast_str

    fh, error = None, ""
    if rank == 0:
        try:
            fh = acquire_run_lock(out_dir)
        except (ConfigError, OSError) as e:
            error = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        error = broadcast_str(error)
    if error:
        raise ConfigError(error)
    return fh
