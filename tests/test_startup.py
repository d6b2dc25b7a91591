"""Process start-up on CPU: DeepSpeed's shared-memory all-reduce segments must not pile up in /dev/shm (RAM)
run after run, and local ranks share the cores instead of each taking all of them."""

import os
from pathlib import Path

import pytest
from dist_harness import run_distributed


def _names(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.ones(4) * (rank + 1)
    dist.all_reduce(t)  # the shm path still works after its names are gone
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
    return float(t[0]), sorted(p.name for p in Path("/dev/shm").glob(prefix + "*"))


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
def test_two_ranks_leave_no_allreduce_segment_names_behind():
    # LOCAL_SIZE (set by the deepspeed launcher) is what makes DeepSpeed create the shm segments
    results = run_distributed(_names, world_size=2, env={"LOCAL_SIZE": "2"})
    assert [r[0] for r in results] == [3.0, 3.0]
    assert all(r[1] == [] for r in results), results


def test_cpu_threads_split_between_local_ranks(monkeypatch):
    import os

    import torch

    from s2moe_ds.distributed import set_cpu_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        assert set_cpu_threads() == max(1, cores // 2) == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_SIZE", "1")
        assert set_cpu_threads() == cores == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice wins
        assert set_cpu_threads() is None
    finally:
        torch.set_num_threads(before)
