"""The one place that turns how a command ended into its message and exit code (docs/reliability.md):

    0          finished
    2          the project's own input errors (ConfigError, DataError, CheckpointError) and OSError (a file
               or disk): one line that names the problem and the fix, no traceback
    3          NonFiniteLoss: training diverged, or ``eval`` found a non-finite loss
    4          a peer rank died or stopped answering (training under a launcher)
    128 + N    Stopped: a run saved a checkpoint and stopped on signal N (143 for SIGTERM)

Anything else is a bug, not a user error: it says "failed with an unexpected ..." and keeps its
traceback (exit code 1). A bare ``ValueError`` is such a bug; input errors are raised as the types above.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch.distributed as dist

from ..checkpoint.store import CheckpointError
from ..configtools import ConfigError
from ..data.errors import DataError
from ..train.hooks import NonFiniteLoss, Stopped

BAD_INPUT, DIVERGED, PEER_FAILED = 2, 3, 4

EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((ConfigError, DataError, CheckpointError, OSError), BAD_INPUT),
    ((NonFiniteLoss,), DIVERGED),
)
"""The project's error types (and OSError) and their exit codes; the first entry that matches wins."""

# the error types torch.distributed raises when a peer is lost or does not answer in time
PEER_ERRORS = tuple(
    getattr(dist, name)
    for name in ("DistError", "DistNetworkError", "DistBackendError", "DistStoreError")
    if hasattr(dist, name)
)
# gloo still reports some losses as a plain RuntimeError, recognised by these words (the fallback)
PEER_TEXT = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "NCCL", "gloo")


def is_comm_failure(e: BaseException) -> bool:
    """A collective failed because of the other ranks: torch's own distributed error types; a
    RuntimeError naming a lost connection only where there are other ranks to lose (WORLD_SIZE > 1)."""
    if isinstance(e, PEER_ERRORS):
        return True
    if not isinstance(e, RuntimeError) or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return any(s in str(e) for s in PEER_TEXT)


def exit_code(e: BaseException) -> int | None:
    """The exit code of an error the user can act on; None for a bug."""
    if isinstance(e, Stopped):
        return 128 + e.signum
    code = next((code for types, code in EXIT_CODES if isinstance(e, types)), None)
    return PEER_FAILED if code is None and is_comm_failure(e) else code


def describe(e: BaseException, os_note: str = "") -> str:
    """One line: the message, or an OSError's cause and file (plus ``os_note``: what was being written)."""
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return f"{e.strerror or e}{where}{os_note}"
    if exit_code(e) == PEER_FAILED:
        return (
            "a collective operation with the other ranks failed: another rank died or did not answer within "
            "train.dist_timeout_s; see the other ranks' messages above "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
        )
    return str(e)


def run_command(prog: str, fn: Callable[[], int], os_note: str = "") -> int:
    """``fn()``'s exit code, or the one ``exit_code`` gives its error, after one message on stderr (a stop
    on stdout, from rank 0). ``prog`` names the command (and the rank) in the message."""
    try:
        return fn()
    except Exception as e:
        code = exit_code(e)
        if code is None:
            print(f"{prog}: failed with an unexpected {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise
        if isinstance(e, Stopped):
            if os.environ.get("RANK", "0") == "0":
                print(f"[s2moe] {e} (exit code {code})", flush=True)
            return code
        print(f"{prog}: error: {describe(e, os_note)}", file=sys.stderr, flush=True)
        if code == PEER_FAILED:
            # The process group is now wedged: tearing it down at interpreter exit can block on the lost peer
            # or abort in gloo's destructors ("terminate called without an active exception"). Logs were
            # closed by fit(); flush what is buffered and leave without running that teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(PEER_FAILED)
        return code
