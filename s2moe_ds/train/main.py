"""``python -m s2moe_ds.train`` / ``s2moe train``: load the config, fit, and turn each way a run can end
into one clear message and an exit code (0 done, 2 bad input/disk/checkpoint, 3 diverged, 4 a peer
failed, 128 + signal stopped)."""

from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from ..checkpoint import CheckpointError
from ..config import load_config
from ..configtools import ConfigError
from ..data.prepare import DataError
from .hooks import NonFiniteLoss, Stopped
from .trainer import train

USAGE = """Train an MoE language model under the DeepSpeed engine.

    # 2 CPU processes (gloo) or 2 GPUs (nccl), ZeRO from the config's ds_config
    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml train.steps=200
    # one plain process
    python -m s2moe_ds.train --config configs/tiny.yaml
    # resume the latest checkpoint of a run
    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml train.resume=auto
"""

# the error types torch.distributed raises when a peer is lost or does not answer in time
PEER_ERRORS = tuple(
    getattr(dist, name)
    for name in ("DistError", "DistNetworkError", "DistBackendError", "DistStoreError")
    if hasattr(dist, name)
)


def is_comm_failure(e: BaseException) -> bool:
    """A collective failed because of the other ranks. torch's own distributed error types first; gloo
    still reports some losses as a plain RuntimeError, recognised by its text as a fallback."""
    if isinstance(e, PEER_ERRORS):
        return True
    text = str(e)
    return any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "NCCL", "gloo")
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML/JSON config (configs/*.yaml); built-in defaults if omitted")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.moe.router=xmoe")
    return ap.parse_args(argv)


def _error(msg: str) -> None:
    print(f"s2moe train [rank {os.environ.get('RANK', '0')}]: error: {msg}", file=sys.stderr, flush=True)


def main(argv=None, hooks=()) -> int:
    """Run one training job; ``hooks`` are extra ``Hook`` objects for the loop (the tests' fault injection)."""
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides), hooks=hooks)
    except Stopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"[s2moe] {e} (exit code {128 + e.signum})", flush=True)
        return 128 + e.signum
    except (ConfigError, DataError, CheckpointError, NonFiniteLoss, OSError) as e:
        # a problem with the inputs, the disk or the run itself: one clear message per rank, no traceback
        where = (
            " (while writing logs or checkpoints; published checkpoints are intact)" if isinstance(e, OSError) else ""
        )
        _error(f"{e}{where}")
        return 3 if isinstance(e, NonFiniteLoss) else 2
    except RuntimeError as e:
        if not is_comm_failure(e):
            raise
        # a peer died (its connection closed) or stopped answering (train.dist_timeout_s passed)
        _error(
            "a collective operation with the other ranks failed: another rank died or did not answer within "
            "train.dist_timeout_s; see the other ranks' messages above "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        )
        # The process group is now wedged: tearing it down at interpreter exit can block on the lost peer or
        # abort in gloo's destructors ("terminate called without an active exception"). Logs were closed by
        # fit(); flush what is buffered and leave without running that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(4)
    except Exception as e:
        rank = os.environ.get("RANK", "0")
        print(
            f"s2moe train [rank {rank}]: failed with an unexpected {type(e).__name__}: {e}", file=sys.stderr, flush=True
        )
        raise
    return 0
