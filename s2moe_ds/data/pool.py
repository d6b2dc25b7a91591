"""The worker pool of a streamed preparation: a function over tasks, in order, in ``workers`` processes
with a bounded number of tasks in flight, or in this process. A task's function reads the pass's shared
state (tokenizer, options) from ``WORKER_STATE``, set once per worker process."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator

from .errors import DataError

WORKER_STATE: dict = {}


def _init_worker(state: dict, in_pool: bool = True) -> None:
    if in_pool:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    WORKER_STATE.clear()
    WORKER_STATE.update(state)


def resolve_workers(workers: int) -> int:
    """``data.workers``: 0 means one per available core."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def ordered_map(fn, tasks, workers: int, state: dict) -> Iterator:
    """``fn`` over ``tasks`` in order. workers > 1: a process pool with at most 2 x workers tasks in
    flight, so the reader never runs ahead of the tokenisers (bounded memory); 1: in this process.
    A worker that dies (killed, out of memory) fails the prepare with a DataError instead of leaving it
    waiting for a result that will never come (what ``multiprocessing.Pool`` does)."""
    if workers <= 1:
        _init_worker(state, in_pool=False)
        for task in tasks:
            yield fn(task)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(state,))
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise DataError(
            f"a data worker process died (killed, or out of memory) while preparing the data; nothing was "
            f"published. Rerun, or with fewer processes (data.workers=1 runs in this process; now {workers})"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
