"""The first start never trips (issue 25): a one-process job neither builds nor waits for DeepSpeed's CPU comm
op, each environment builds it in a folder of its own, no lock another builder made is removed, a busy port
fails at once in one line, the cheap checks run before anything is built, and a start that failed before
its first step leaves nothing in the way of a rerun."""

import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from e2e import REPO, assert_ok, cli, env, single_train

from s2moe_ds import comm_op
from s2moe_ds.comm_op import BUILD_LOCK, BUILD_MARK, OP_NAME, extensions_root, prepare_comm_op
from s2moe_ds.configtools import ConfigError

COMMON = ["train.log_interval=1", "train.eval_iters=2", "train.progress=false"]


@pytest.fixture
def data(pydoc_dir):
    return pydoc_dir


def built_ext() -> Path:
    """The folder where this environment's comm op is built (CI builds it before the tests)."""
    ext = Path(env().get("TORCH_EXTENSIONS_DIR") or extensions_root())
    if not (ext / OP_NAME).is_dir():
        pytest.skip(f"DeepSpeed's CPU comm op is not built under {ext} (CI builds it first)")
    return ext


# --- the comm op ---


def test_a_one_process_run_neither_builds_nor_waits_for_the_comm_op(data, tmp_path):
    ext = tmp_path / "ext"  # empty: a build would take a minute and leave deepspeed_shm_comm here
    ext.mkdir()
    with open(ext / BUILD_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a build in progress elsewhere: a one-process job must not wait
        proc = single_train(
            [f"data.data_dir={data}", f"train.out_dir={tmp_path / 'run'}", "train.steps=1", *COMMON],
            timeout=120,
            extra_env={"TORCH_EXTENSIONS_DIR": str(ext)},
        )
    assert_ok(proc)
    assert not (ext / OP_NAME).exists() and "waiting" not in proc.stdout


def test_a_killed_s2moe_builds_lock_is_removed_and_the_op_loads(monkeypatch):
    ext = built_ext()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    (ext / BUILD_MARK).write_text("12345")  # an s2moe build that was killed mid-way ...
    (ext / OP_NAME / "lock").write_text("")  # ... left torch's lock behind
    lines = []
    removed = prepare_comm_op(world_size=2, wait_s=30, log=lambda *a, **k: lines.append(a[0]))
    assert removed == [ext / OP_NAME / "lock"] and not (ext / OP_NAME / "lock").exists()
    assert not (ext / BUILD_MARK).exists()
    assert any("removed the torch build lock a killed s2moe build left behind" in line for line in lines)


def test_a_lock_of_another_builder_is_waited_for_reported_and_never_removed(monkeypatch):
    ext = built_ext()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    lock = ext / OP_NAME / "lock"
    lock.write_text("")  # some other program's build of the op, running now (no s2moe mark)
    lines = []
    try:
        with pytest.raises(ConfigError, match=r"waited \d+ s for a build that is not s2moe's: torch's lock"):
            prepare_comm_op(world_size=2, wait_s=1.0, log=lambda *a, **k: lines.append(a[0]))
        assert lock.exists()
    finally:
        lock.unlink(missing_ok=True)
    assert lines and "giving up after 1 s" in lines[0] and "a single-process job needs no comm op" in lines[0]


def test_waiting_for_a_live_s2moe_builder_is_reported_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lines = []
    with open(tmp_path / BUILD_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another s2moe process building right now
        with pytest.raises(ConfigError, match="waited .* another s2moe process building it"):
            prepare_comm_op(world_size=2, wait_s=1.0, log=lambda *a, **k: lines.append(a[0]))
    assert lines and "waiting for another s2moe process building it" in lines[0]
    assert "point TORCH_EXTENSIONS_DIR to a folder of its own" in lines[0]


def test_each_environment_builds_in_a_folder_of_its_own(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    root = extensions_root()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(root)  # torch's builder and child processes follow it
    if sys.prefix != sys.base_prefix:
        assert root.is_relative_to(sys.prefix)
    else:
        assert root.name == f"s2moe-{comm_op.environment_key()}"
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-env"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extensions_root() != root  # another interpreter prefix: another folder, no shared build lock


# --- ports ---


def test_a_busy_master_port_fails_at_once_naming_it(data, tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = single_train(
            [f"data.data_dir={data}", f"train.out_dir={tmp_path / 'run'}", "train.steps=1", *COMMON],
            timeout=120,
            extra_env={"MASTER_PORT": str(port)},
        )
        launcher = subprocess.run(
            ["bash", str(REPO / "launch" / "single_node.sh")],
            env={**env(), "DRY_RUN": "1", "MASTER_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2 and f"port {port} on 127.0.0.1 (MASTER_PORT) is already in use" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert launcher.returncode == 2 and f"MASTER_PORT {port} is already in use on this machine" in launcher.stderr


def test_the_launchers_pick_a_free_port_when_none_is_set(data):
    environment = {k: v for k, v in env().items() if k != "MASTER_PORT"}
    ports = set()
    for _ in range(2):
        p = subprocess.run(
            ["bash", str(REPO / "launch" / "single_node.sh"), f"data.data_dir={data}"],
            env={**environment, "DRY_RUN": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        word = p.stderr.split("--master_port ")[1].split()[0]
        assert word.isdigit() and word != "29500"
        ports.add(word)
    assert len(ports) == 2  # chosen per start, not a shared default


# --- cheap checks first, and a failed start leaves nothing in the way ---


def test_missing_data_names_the_users_own_prepare_command_before_anything_is_built(tmp_path):
    out = tmp_path / "run"
    proc = cli(
        "train", "--config", "tiny", f"data.data_dir={tmp_path / 'nodata'}", "train.steps=3", f"train.out_dir={out}"
    )
    assert proc.returncode == 2
    assert f"run `s2moe prepare --config tiny data.data_dir={tmp_path / 'nodata'}` first" in proc.stderr
    assert "[s2moe] world=" not in proc.stdout and not out.exists()


def test_the_checks_run_before_the_process_group(data, tmp_path, monkeypatch):
    from s2moe_ds.config import load_config
    from s2moe_ds.monitor import TRACKER_PACKAGES
    from s2moe_ds.train import trainer

    def unreachable(*_):
        raise AssertionError("the process group was started before the checks")

    monkeypatch.setattr(trainer, "init_distributed", unreachable)
    monkeypatch.setitem(TRACKER_PACKAGES, "wandb", "a_package_that_is_not_installed")
    cfg = load_config(
        "configs/tiny.yaml", [f"data.data_dir={data}", f"train.out_dir={tmp_path}", "train.trackers=[wandb]"]
    )
    with pytest.raises(ConfigError, match=r"lists 'wandb' but the a_package_that_is_not_installed package is not"):
        trainer.Trainer.build(cfg)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')  # a run that trained
    cfg = load_config("configs/tiny.yaml", [f"data.data_dir={data}", f"train.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="already holds a run"):
        trainer.Trainer.build(cfg)


def test_a_start_that_never_trained_is_moved_aside_by_a_plain_rerun(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: {}\n")  # what a start writes before its first step
    (out / "run.json").write_text('{"run_id": "abc"}')
    (out / "metrics.jsonl").write_text("")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    proc = single_train([f"data.data_dir={data}", f"train.out_dir={out}", "train.steps=1", *COMMON], timeout=120)
    assert_ok(proc)
    assert f"moved them to {out / 'abandoned-1'}" in proc.stdout
    assert (out / "abandoned-1" / "run.json").read_text() == '{"run_id": "abc"}'
    assert '"kind": "train"' in (out / "metrics.jsonl").read_text()


# --- small things of the first hour ---


def test_extending_a_cosine_run_says_how_far_the_learning_rate_jumps(data, tmp_path):
    out = tmp_path / "run"
    base = [f"data.data_dir={data}", f"train.out_dir={out}", "train.warmup_steps=1", *COMMON]
    assert_ok(single_train([*base, "train.steps=4", "train.save_interval=4"], timeout=120))
    proc = single_train([*base, "train.steps=8", "train.resume=auto"], timeout=120)
    assert_ok(proc)
    from s2moe_ds.config import load_config
    from s2moe_ds.schedule import lr_at

    t = load_config("configs/tiny.yaml", ["train.warmup_steps=1", "train.steps=8"]).train
    assert lr_at(3, t) != t.min_lr  # the end of the 4-step run is mid-way down the 8-step cosine
    assert f"the learning rate at step 4 jumps from {t.min_lr:.3g} to {lr_at(4, t):.3g}" in proc.stdout
    assert "train.lr_schedule=wsd" in proc.stdout


def test_print_config_and_help_show_what_a_run_will_use():
    proc = cli("train", "--config", "tiny", "train.steps=7", "--print-config")
    assert_ok(proc)
    assert "  steps: 7\n" in proc.stdout and "  lr_schedule: cosine\n" in proc.stdout and "model:\n" in proc.stdout
    helped = cli("train", "--help")
    assert "steps=200 (int)" in helped.stdout and "lr_schedule='cosine' (str)" in helped.stdout
    from s2moe_ds.cli import command_parser

    undescribed = [a.dest for a in command_parser("sample")._actions if not a.help]
    assert not undescribed, f"`s2moe sample --help` gives no description for {undescribed}"


def test_train_loss_is_the_mean_over_the_logging_interval(data, tmp_path):
    import json

    out = tmp_path / "run"
    args = [f"data.data_dir={data}", f"train.out_dir={out}", "train.steps=4", "train.eval_iters=2"]
    assert_ok(single_train([*args, "train.log_interval=2", "train.progress=false"], timeout=120))
    every = tmp_path / "every"
    assert_ok(
        single_train([*args, f"train.out_dir={every}", "train.log_interval=1", "train.progress=false"], timeout=120)
    )
    rec = lambda d: {
        r["step"]: r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    }  # noqa: E731
    two, one = rec(out), rec(every)
    assert sorted(two) == [2, 4] and sorted(one) == [1, 2, 3, 4]
    for step in (2, 4):  # the same steps, so the same losses; logged every 2, the record is their mean
        assert two[step]["train/loss"] == pytest.approx((one[step - 1]["train/loss"] + one[step]["train/loss"]) / 2)
        assert two[step]["train/loss_step"] == pytest.approx(one[step]["train/loss"])
