"""No lost runs, no silently wrong results, no silent hang: the cases of the adversarial pass (each on a
copy of a real 20-step run, with the sha256 of every file taken before and after where nothing may
change). ``T`` below is a single-process training of configs/tiny.yaml."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import REPO, assert_ok, cli, env, run, single_train, snapshot

pytestmark = pytest.mark.slow
COMMON = ["train.log_interval=1", "train.eval_iters=2", "train.progress=false", "train.eval_interval=100"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    data = root / "pydoc"
    assert_ok(cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={data}"))
    base = root / "base"
    assert_ok(T(data, base, "train.steps=20", "train.save_interval=10"))
    return root, data, base


def T(data: Path, out: Path, *extra: str, timeout: int = 300):
    return single_train([f"data.data_dir={data}", f"train.out_dir={out}", *COMMON, *extra], timeout=timeout)


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    return dest


def lrs(out: Path) -> dict[int, float]:
    return {
        r["step"]: r["train/lr"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    }


# --- lost runs ---


def test_fresh_start_refuses_a_run_whose_latest_is_gone(world, tmp_path):
    root, data, base = world
    c1 = copy_run(base, tmp_path / "c1")
    shutil.rmtree(c1 / "checkpoints" / "step0000020")  # `latest` now names nothing
    before = snapshot(c1)
    proc = T(data, c1, "train.steps=10", "train.save_interval=10", "train.seed=7")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "step0000010" in proc.stderr
    assert snapshot(c1) == before
    logs_only = tmp_path / "logs_only"  # a run that died before its first checkpoint
    logs_only.mkdir()
    (logs_only / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    proc = T(data, logs_only, "train.steps=2")
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr


def test_auto_resume_without_a_checkpoint_sets_the_dead_runs_logs_aside(world, tmp_path):
    root, data, _ = world
    out = tmp_path / "died"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "train/loss": 9.0}\n')
    proc = T(data, out, "train.steps=2", "train.resume=auto")
    assert_ok(proc)
    assert "moved them to" in proc.stdout
    assert (out / "abandoned-1" / "metrics.jsonl").read_text().count("\n") == 1
    assert '"train/loss": 9.0' not in (out / "metrics.jsonl").read_text()


# (the comm op's build locks: tests/test_first_start.py)


# --- silently wrong ---


def test_auto_resume_follows_latest_after_a_branch_and_never_a_foreign_tag(world, tmp_path):
    root, data, base = world
    c = copy_run(base, tmp_path / "branch")
    # branch from step 10 inside the same run: latest becomes step 15, step 20 is the abandoned branch
    assert_ok(
        T(
            data,
            c,
            "train.steps=20",
            "train.save_interval=5",
            "train.stop_at_step=15",
            f"train.resume={c / 'checkpoints' / 'step0000010'}",
        )
    )
    assert (c / "checkpoints" / "latest").read_text().strip() == "step0000015"
    proc = T(data, c, "train.steps=20", "train.save_interval=5", "train.resume=auto")
    assert_ok(proc)
    assert "resumed from" in proc.stdout and "step0000015" in proc.stdout and "steps 15->20" in proc.stdout
    assert (c / "checkpoints" / "replaced-step0000020-1").is_dir()  # the abandoned branch is kept, not deleted
    # a checkpoint copied in from another run (another run id) is never chosen, even when newest
    other = tmp_path / "other"
    assert_ok(T(data, other, "train.steps=30", "train.save_interval=30"))
    shutil.copytree(other / "checkpoints" / "step0000030", c / "checkpoints" / "step0000030")
    (c / "checkpoints" / "latest").unlink()
    proc = T(data, c, "train.steps=25", "train.resume=auto")
    assert_ok(proc)
    assert "belongs to another run" in proc.stdout and "steps 20->25" in proc.stdout


def test_a_new_lr_on_resume_is_the_lr_applied(world, tmp_path):
    root, data, _ = world
    out = tmp_path / "lr"
    assert_ok(
        T(
            data,
            out,
            "train.steps=4",
            "train.save_interval=4",
            "train.lr=2e-3",
            "train.min_lr=2e-4",
            "train.warmup_steps=0",
        )
    )
    proc = T(
        data, out, "train.steps=8", "train.resume=auto", "train.lr=2e-4", "train.min_lr=1e-5", "train.warmup_steps=0"
    )
    assert_ok(proc)
    assert "train.lr 0.002 -> 0.0002" in proc.stdout  # the difference is reported
    import math

    # the lr logged after step s is the schedule's at step s: cosine from 2e-4 to 1e-5 over 8 steps
    expected = {s: 1e-5 + 0.5 * (1 + math.cos(math.pi * s / 8)) * (2e-4 - 1e-5) for s in range(5, 9)}
    got = lrs(out)
    for s in range(5, 9):
        assert got[s] == pytest.approx(expected[s], rel=1e-6), (s, got[s], expected[s])
    assert "lr: 0.0002" in (out / "config.yaml").read_text()
    assert "lr: 0.002" in (out / "config.before-step0000004.yaml").read_text()  # what the run was trained with


RUNNER = """
import sys, torch
from s2moe_ds.cli.train import main
real = torch.optim.AdamW.step
def step(self, *a, **k):  # a finite gradient with a non-finite update, from the third step on
    out = real(self, *a, **k)
    for group in self.param_groups:
        for p in group["params"]:
            if int(self.state.get(p, {}).get("step", 0)) >= 3:
                with torch.no_grad():
                    p.fill_(float("inf"))
    return out
torch.optim.AdamW.step = step
sys.exit(main(sys.argv[1:]))
"""


def test_a_diverged_state_is_never_saved_as_good(world, tmp_path):
    root, data, _ = world
    out = tmp_path / "div"
    proc = run(
        [
            sys.executable,
            "-c",
            RUNNER,
            "--config",
            "configs/tiny.yaml",
            f"data.data_dir={data}",
            f"train.out_dir={out}",
            "train.steps=10",
            "train.save_interval=2",
            "train.max_skipped_steps=2",
            *COMMON,
        ]
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "weights are not finite" in proc.stderr and "not saved" in proc.stderr
    # the published checkpoints are all from before the divergence, and evaluate to a finite loss
    assert (out / "checkpoints" / "latest").read_text().strip() == "step0000002"
    assert_ok(cli("eval", str(out), "--max-batches", "2"))


def test_eval_fails_on_a_non_finite_result(world, tmp_path):
    import torch

    from s2moe_ds.checkpoint import write_manifest

    root, data, base = world
    c = copy_run(base, tmp_path / "nanrun")
    tag = c / "checkpoints" / "step0000020"
    f = tag / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=False)
    state["module"]["tok_emb.weight"].fill_(float("nan"))
    torch.save(state, f)
    write_manifest(tag, json.loads((tag / "manifest.json").read_text())["run_id"])
    proc = cli("eval", str(c), "--max-batches", "2")
    assert proc.returncode == 3 and "not finite" in proc.stderr


def test_resume_refuses_what_cannot_be_right_and_reports_the_rest(world, tmp_path):
    root, data, base = world
    c = copy_run(base, tmp_path / "compat")
    before = snapshot(c)
    src = tmp_path / "other.txt"  # another corpus with the same characters: same vocabulary, other data
    text = (data.parent / "pydoc" / "meta.json").read_text()
    symbols = "".join(chr(s) for s in json.loads(text)["symbols"])
    src.write_text((symbols * 400)[::-1])
    other = tmp_path / "otherdata"
    assert_ok(cli("prepare", "data.dataset=text", f"data.source={src}", f"data.data_dir={other}"))
    cases = [
        ([f"data.data_dir={other}"], "another dataset"),
        (["model.moe.router=xmoe"], "model.moe.router 'smoe' -> 'xmoe'"),
        (["model.d_model=32", "model.n_head=2"], "model.d_model 64 -> 32"),
        (["train.steps=15"], "already at step 20"),
    ]
    for extra, needle in cases:
        overrides = [f"data.data_dir={data}", f"train.out_dir={c}", *COMMON, "train.resume=auto", *extra]
        proc = single_train(overrides)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, (
            extra,
            proc.stderr[-800:],
        )
    assert snapshot(c) == before
    # a finished run resumed with nothing to train: a no-op that leaves its record alone
    proc = T(data, c, "train.steps=20", "train.resume=auto", "train.seed=5")
    assert_ok(proc)
    assert "nothing to train" in proc.stdout and "train.seed 1337 -> 5" in proc.stdout
    assert snapshot(c) == {
        **before,
        **{k: v for k, v in snapshot(c).items() if k.startswith(("metrics", "tensorboard"))},
    }
    assert (c / "config.yaml").read_text() == (base / "config.yaml").read_text()


# --- honest messages ---


def test_a_port_in_use_is_named_not_blamed_on_a_dead_rank(world, tmp_path):
    root, data, _ = world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "s2moe_ds.train",
                "--config",
                "configs/tiny.yaml",
                f"data.data_dir={data}",
                f"train.out_dir={tmp_path / 'port'}",
                *COMMON,
            ],
            cwd=REPO,
            env={**env(), "MASTER_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 2 and f"port {port}" in proc.stderr and "already in use" in proc.stderr
    assert "another rank died" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_preempted_run_exits_with_the_signal_code(world, tmp_path):
    root, data, _ = world
    out = tmp_path / "pre"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "s2moe_ds.train",
            "--config",
            "configs/tiny.yaml",
            f"data.data_dir={data}",
            f"train.out_dir={out}",
            "train.steps=5000",
            "train.save_interval=0",
            *COMMON,
        ],
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count('"kind": "train"') >= 2
    ):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, (stdout[-1500:], stderr[-1500:])
    assert "SIGTERM received: saved checkpoint" in stdout and "exit code 143" in stdout
    assert (out / "checkpoints" / "latest").exists()


def test_checkpoint_rotated_away_while_read_is_named_so(tmp_path):
    from s2moe_ds.checkpoint.store import CheckpointError, read_manifest, read_state_file

    gone = tmp_path / "checkpoints" / "step0000004"
    with pytest.raises(CheckpointError, match="removed while being read"):
        read_state_file(gone / "mp_rank_00_model_states.pt")
    gone.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="never completed"):
        read_manifest(gone)


def test_write_failures_name_their_cause():
    import errno

    from s2moe_ds.train import describe_os_error

    assert "permission denied" in describe_os_error(OSError(errno.EACCES, "Permission denied"), Path("/tmp"))
    assert "permission denied" in describe_os_error(OSError(errno.EROFS, "Read-only file system"), Path("/tmp"))
    assert "no space left" in describe_os_error(OSError(errno.ENOSPC, "No space left on device"), Path("/tmp"))


def _small_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_full_during_prepare_and_export_leaves_nothing_half_written(world, tmp_path):
    root, data, base = world
    small = tmp_path / "small"
    if not _small_tmpfs(small, "200k"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        proc = cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={small / 'pydoc'}")
        assert proc.returncode == 2 and "bytes free" in proc.stderr and "Traceback" not in proc.stderr
        assert not list((small / "pydoc").glob("*.tmp")) and not (small / "pydoc" / "meta.json").exists()
        proc = cli("export", str(base), "--out", str(small / "model.safetensors"))
        assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr
        assert not list(small.glob("*.tmp")) and not (small / "model.safetensors").exists()
        proc = cli("export", str(base), "--out", str(small / "folder"))  # the folder export too
        assert proc.returncode == 2 and "cannot write the export" in proc.stderr and "Traceback" not in proc.stderr
        assert "nothing was left half-written" in proc.stderr and sorted(q.name for q in small.iterdir()) == ["pydoc"]
    finally:
        subprocess.run(["umount", str(small)])
    proc = cli("export", str(base), "--out", str(base / "config.yaml" / "model.safetensors"))
    assert proc.returncode == 2 and "cannot create the folder" in proc.stderr


@pytest.mark.parametrize(
    "hostfile,needle",
    [
        ("node0 slots=1\nnode1 slots=0\n", "node1 slots=0"),
        ("node0 slots=1\nnode0 slots=1\n", "lists node0 twice"),
        ("node0 slot=1\n", "line 1 is 'node0 slot=1'"),
        ("# nothing\n", "no '<host> slots=<N>' line"),
    ],
)
def test_bad_hostfiles_are_refused(tmp_path, hostfile, needle):
    hf = tmp_path / "hostfile"
    hf.write_text(hostfile)
    proc = subprocess.run(
        ["bash", "launch/multi_node.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env(), "HOSTFILE": str(hf), "MASTER_ADDR": "127.0.0.1", "DRY_RUN": "1"},
    )
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "RUN", "--max-batches", "-1"], "--max-batches: must be >= 0"),
        (["eval", "RUN", "--batch-size", "0"], "--batch-size: must be >= 1"),
        (["eval", "RUN", "--k", "0"], "--k: must be >= 1"),
        (["eval", "RUN", "--k", "9"], "inference top-k must be in [1, 4]"),
        (["eval", "NOWHERE"], "does not exist"),
        (["sample", "RUN", "--tokens", "0"], "--tokens: must be >= 1"),
        (["sample", "RUN", "--temperature", "0"], "--temperature: must be a finite number > 0"),
        (["sample", "RUN", "--top-k", "-2"], "--top-k: must be >= 0"),
        (["experiment", "cpu-shakespeare", "--steps", "0"], "--steps: must be >= 1"),
        (["experiment", "cpu-shakespeare", "--shard", "3/2"], "--shard must be I/N"),
        (["reshard", "RUN", "NEW", "--nproc", "0"], "--nproc: must be >= 1"),
        (["report", "NOWHERE"], "not an experiment folder"),
        (["export", "NOWHERE", "--out", "x.safetensors"], "does not exist"),
        (["export", "RUN", "--out", ""], "--out must name a folder"),
        (["sample", "RUN", "--prompt", ""], "--prompt must hold at least one character"),
        (["experiment", "cpu-shakespeare", "--seeds", ""], "--seeds must be comma-separated integers"),
        (["experiment", "cpu-shakespeare", "--only", ""], "--only must name at least one variant"),
    ],
)
def test_every_command_line_number_is_checked(world, tmp_path, args, needle):
    root, data, base = world
    args = [
        str(base)
        if a == "RUN"
        else str(tmp_path / "nowhere")
        if a == "NOWHERE"
        else str(tmp_path / "new")
        if a == "NEW"
        else a
        for a in args
    ]
    proc = cli(*args, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-800:]


HOLD = """
import sys, time
from s2moe_ds.runlock import acquire_run_lock
fh = acquire_run_lock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_one_job_per_run_directory(world, tmp_path):
    """A second job on a held run directory fails at once, names the holder and writes nothing; once the
    holder is SIGKILLed the directory is free again (the kernel drops the lock)."""
    from e2e import deepspeed_train

    root, data, base = world
    c = copy_run(base, tmp_path / "locked")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(c)], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(c)
        t0 = time.time()
        proc = deepspeed_train(
            2,
            [f"data.data_dir={data}", f"train.out_dir={c}", "train.steps=30", "train.resume=auto", *COMMON],
            timeout=240,
        )
        assert proc.returncode != 0 and time.time() - t0 < 120
        err = proc.stdout + proc.stderr
        assert "is in use by another job" in err and f"pid {holder.pid}" in err and "started" in err
        assert snapshot(c) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert_ok(T(data, c, "train.steps=22", "train.resume=auto"))


def test_resume_reports_a_changed_global_batch_and_the_grad_accum_that_keeps_it():
    from s2moe_ds.config import load_config
    from s2moe_ds.train import global_batch_change

    client = {"config": {"train": {"micro_batch_size": 8, "grad_accum": 1}}, "layout": {"world": 2}}
    t = load_config(None, ["train.micro_batch_size=8"]).train
    (line,) = global_batch_change(client, t, world=1)
    assert "global batch 16 -> 8" in line and "train.grad_accum=2 keeps it" in line
    assert (
        global_batch_change(client, load_config(None, ["train.micro_batch_size=8", "train.grad_accum=2"]).train, 1)
        == []
    )
    t3 = load_config(None, ["train.micro_batch_size=3"]).train
    assert "no train.grad_accum keeps it" in global_batch_change(client, t3, world=1)[0]
