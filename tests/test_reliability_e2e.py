"""Faults survived, tested for real through the deepspeed launcher: SIGKILL at an arbitrary step and
during a checkpoint write, SIGTERM (pre-emption), truncated checkpoint files, retention."""

import os
import signal
import subprocess
import sys
import time

import pytest
from e2e import FAULT_TRAIN, REPO, assert_ok, cli, deepspeed_cmd, deepspeed_train, env, free_port, run, train_losses

pytestmark = pytest.mark.slow
COMMON = ["train.log_interval=1", "train.eval_iters=2", "train.progress=false", "train.eval_interval=100"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "pydoc"
    assert_ok(cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={d}"))
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert_ok(
        deepspeed_train(
            2, [f"data.data_dir={data_dir}", f"train.out_dir={out}", "train.steps=12", "train.save_interval=0", *COMMON]
        )
    )
    return train_losses(out)


def start(out, data_dir, extra):
    cmd = deepspeed_cmd(2, [f"data.data_dir={data_dir}", f"train.out_dir={out}", "train.steps=12", *COMMON, *extra])
    return subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def logged_steps(out):
    f = out / "metrics.jsonl"
    return len(train_losses(out)) if f.exists() else 0


def kill_all(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, data_dir, reference):
    out = tmp_path / "run"
    proc = start(out, data_dir, ["train.save_interval=3"])
    assert wait_for(lambda: logged_steps(out) >= 7, proc)
    kill_all(proc)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step0000006", "step0000003")
    assert_ok(
        deepspeed_train(
            2,
            [
                f"data.data_dir={data_dir}",
                f"train.out_dir={out}",
                "train.steps=12",
                "train.save_interval=3",
                "train.resume=auto",
                *COMMON,
            ],
        )
    )
    resumed = train_losses(out)  # later records of a step (after the resume) win
    assert [resumed[s] for s in range(1, 13)] == [reference[s] for s in range(1, 13)]


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, data_dir, reference):
    out = tmp_path / "run"
    proc = start(out, data_dir, ["train.save_interval=2"])
    ckpts = out / "checkpoints"
    # kill the moment the second checkpoint starts being written
    assert wait_for(lambda: (ckpts / "step0000004.partial").exists(), proc)
    kill_all(proc)
    assert (ckpts / "latest").read_text().strip() == "step0000002"
    assert not (ckpts / "step0000004").exists()
    proc2 = deepspeed_train(
        2,
        [
            f"data.data_dir={data_dir}",
            f"train.out_dir={out}",
            "train.steps=12",
            "train.save_interval=2",
            "train.resume=auto",
            *COMMON,
        ],
    )
    assert_ok(proc2)
    assert "steps 2->12" in proc2.stdout and "removing" in proc2.stdout
    assert not list(ckpts.glob("*.partial"))
    resumed = train_losses(out)
    assert [resumed[s] for s in range(3, 13)] == [reference[s] for s in range(3, 13)]


def test_sigterm_saves_and_exits_cleanly_on_every_rank(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = start(out, data_dir, ["train.steps=400", "train.save_interval=0"])
    assert wait_for(lambda: logged_steps(out) >= 3, proc)
    # SLURM signals every process of the job step; the single-node `deepspeed` runner alone would not
    # forward it (DeepSpeed installs its forwarding handler only for multi-node pdsh runs)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "SIGTERM received: saved checkpoint" in output, output[-3000:]
    assert proc.returncode != 0  # stopped, not finished: `train && export` must not go on (each rank exits 143)
    tag = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag[len("step") :])
    assert 3 <= stopped_at < 400 and stopped_at == max(train_losses(out))
    assert "Traceback" not in output


def test_corrupt_checkpoint_is_named_and_resume_falls_back(tmp_path, data_dir):
    out = tmp_path / "run"
    base = [f"data.data_dir={data_dir}", f"train.out_dir={out}", "train.steps=6", "train.save_interval=2", *COMMON]
    assert_ok(deepspeed_train(2, base + ["train.keep_last=2"]))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step0000004", "step0000006"]  # keep_last
    victim = ckpts / "step0000006" / "mp_rank_00_model_states.pt"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    ev = cli("eval", str(out))
    assert ev.returncode == 2 and str(victim) in ev.stderr and "truncated" in ev.stderr
    proc = deepspeed_train(2, base + ["train.steps=8", "train.resume=auto"])
    assert_ok(proc)
    assert "resuming from the newest verified checkpoint of this run, 'step0000004'" in proc.stdout
    assert "steps 4->8" in proc.stdout


def test_nonfinite_steps_are_skipped_counted_and_training_continues(tmp_path, data_dir):

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    overrides = [f"data.data_dir={data_dir}", f"train.out_dir={out}", "train.steps=8", "train.save_interval=0", *COMMON]
    # NaN losses on two steps (0-based), injected on every rank
    proc = run(deepspeed_cmd(2, overrides, faults=True), extra_env={"S2MOE_INJECT_NONFINITE_AT": "3,4"})
    assert_ok(proc)
    assert "step 4: non-finite loss/gradient, step skipped (1 in a row" in proc.stdout
    assert "step 5: non-finite loss/gradient, step skipped (2 in a row, 2 in total)" in proc.stdout
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 6, 7, 8]
    assert all(v == v for v in losses.values())  # finite after the skipped steps
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [ev.value for ev in acc.Scalars("train/skipped_steps")] == [1.0, 2.0]


def _two_ranks_without_launcher(tmp_path, data_dir, fault, timeout_s):
    """Two ranks started by hand (as mpirun or a scheduler would, no deepspeed launcher to kill
    survivors): rank 1 fails; rank 0 must exit on its own within a bounded time, saying why."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        e = env()
        e.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            S2MOE_INJECT_FAULT=fault,
        )
        cmd = [
            sys.executable,
            FAULT_TRAIN,
            "--config",
            "configs/tiny.yaml",
            f"data.data_dir={data_dir}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.steps=50",
            f"train.dist_timeout_s={timeout_s}",
            *COMMON,
        ]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    try:
        out0 = procs[0].communicate(timeout=timeout_s + 90)  # the survivor must exit by itself
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
        raise AssertionError("rank 0 hung past the process-group timeout") from None
    elapsed = time.time() - t0
    try:
        out1 = procs[1].communicate(timeout=60)
    except subprocess.TimeoutExpired:  # the stuck rank stays stuck; that is the fault being simulated
        procs[1].kill()
        out1 = procs[1].communicate()
    return [p.returncode for p in procs], [out0, out1], elapsed


def test_a_rank_that_raises_does_not_leave_the_others_hanging(tmp_path, data_dir):
    codes, outs, _ = _two_ranks_without_launcher(tmp_path, data_dir, "raise@1:3", timeout_s=30)
    assert codes[1] != 0 and "injected fault on rank 1 at step 3" in outs[1][1]
    assert codes[0] == 4 and "another rank died or did not answer" in outs[0][1]


def test_a_rank_that_hangs_is_bounded_by_the_process_group_timeout(tmp_path, data_dir):
    codes, outs, elapsed = _two_ranks_without_launcher(tmp_path, data_dir, "hang@1:3", timeout_s=20)
    assert codes[0] == 4 and "did not answer within train.dist_timeout_s" in outs[0][1], outs[0][1][-2000:]
    assert "Timed out" in outs[0][1]
