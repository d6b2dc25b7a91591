"""docker/ for real: a private Docker engine builds the CPU image from Debian's archive, runs the demo
through launch/docker_run.sh with data and runs mounted from the host, resumes it in a second container,
and runs DeepSpeed's default multi-node launch (pdsh over ssh) between two containers with expert
parallelism, compared with a one-host two-process run. Needs root (the engine is started here); CI has
it (S2MOE_REQUIRE_CLUSTER_TOOLS=1 makes a missing engine a failure).

The engine's data (base image, build cache, about 5 GB) is kept between runs in S2MOE_DOCKER_ROOT
(default /var/tmp/s2moe-docker-cache; S2MOE_DOCKER_ROOT=tmp uses a fresh folder removed afterwards), so a
rerun rebuilds only the layers whose inputs changed. A second test session that finds the folder in use
(an exclusive lock) takes a fresh one instead of sharing the daemon's data."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from docker_engine import DockerEngine
from e2e import REPO, assert_ok, cli, env, free_port, train_losses

pytestmark = pytest.mark.slow
IMAGE = "s2moe_ds:cpu"
TINY = [
    "train.log_interval=1",
    "train.eval_iters=2",
    "train.progress=false",
    "train.eval_interval=3",
    "train.save_interval=3",
    "model.moe.num_experts=4",
]
# what CI and this network need to build: the host's CA bundle (a TLS-inspecting proxy) and, when the
# machine has one, a local CPU torch wheel (else pip takes PyPI's multi-GB CUDA build of the pin)
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
WHEELHOUSE = Path(os.environ.get("S2MOE_WHEELHOUSE", "/opt/wheels"))


def need(reason: str) -> None:
    if reason:
        if os.environ.get("S2MOE_REQUIRE_CLUSTER_TOOLS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def engine():
    need(DockerEngine.unavailable())
    keep = os.environ.get("S2MOE_DOCKER_ROOT", "/var/tmp/s2moe-docker-cache")
    lock = None
    if keep != "tmp":
        Path(keep).mkdir(parents=True, exist_ok=True)
        lock = open(Path(keep) / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another session's daemon owns that data root
            lock.close()
            lock, keep = None, "tmp"
    root = Path(keep) if keep != "tmp" else Path(tempfile.mkdtemp(prefix="s2moe-docker-", dir="/var/tmp"))
    try:
        with DockerEngine(root) as d:
            yield d
            d.docker("image", "prune", "-f", check=False)  # earlier builds' layers, no longer tagged
    finally:
        if lock is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            lock.close()


def build_context(dest: Path) -> Path:
    """The repository's files (tracked, and untracked ones git does not ignore) plus the build inputs."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    inputs = dest / "docker" / "build-inputs"
    if HOST_CA.is_file():
        shutil.copy(HOST_CA, inputs / "host-ca.crt")
    for wheel in WHEELHOUSE.glob("torch-*+cpu-cp311-*.whl") if WHEELHOUSE.is_dir() else []:
        shutil.copy(wheel, inputs / wheel.name)
    return dest


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory):
    t0 = time.time()
    engine.ensure_base_image()
    t1 = time.time()
    ctx = build_context(tmp_path_factory.mktemp("context"))
    engine.docker(
        "build", "--network", "host", "-f", str(ctx / "docker" / "Dockerfile.cpu"), "-t", IMAGE, str(ctx), timeout=1800
    )
    print(f"[docker] base image {t1 - t0:.0f} s, CPU image build {time.time() - t1:.0f} s")
    return IMAGE


def docker_run(engine: DockerEngine, data: Path, runs: Path, *cmd: str, timeout: int = 600):
    """launch/docker_run.sh as a user runs it, against the test's engine; TensorBoard's port on loopback."""
    e = {
        **env(),
        "DOCKER_HOST": engine.env["DOCKER_HOST"],
        "IMAGE": IMAGE,
        "DATA": str(data),
        "RUNS": str(runs),
        "TB_PORT": str(free_port()),
        "TB_ADDR": "127.0.0.1",
    }
    return subprocess.run(
        ["bash", "launch/docker_run.sh", *cmd], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout
    )


def scalar_steps(tb_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tb_dir))
    ev.Reload()
    return [s.step for s in ev.Scalars(tag)]


def test_cpu_image_runs_the_demo_and_a_resume_with_the_outputs_on_the_host(engine, image, tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    data.mkdir()
    p = docker_run(engine, data, runs, "bash", "launch/demo_cpu.sh", "train.steps=6", *TINY)
    assert_ok(p)
    assert "+ docker run --rm --ipc=host" in p.stderr and "-p 127.0.0.1:" in p.stderr
    run = runs / "tiny"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step0000006"
    assert "val bpc" in p.stdout and (run / "metrics.jsonl").is_file()
    assert scalar_steps(run / "tensorboard", "train/loss") == list(range(1, 7))
    # the host reads what the container wrote (data_dir: the host path of the mounted data folder)
    ev = json.loads(
        cli("eval", str(run), "--json", "--max-batches", "2", "--data-dir", str(data / "pydoc")).stdout.splitlines()[-1]
    )
    assert ev["step"] == 6 and ev["loss"] > 0
    # a second container resumes the first one's run from its checkpoint
    p = docker_run(
        engine,
        data,
        runs,
        "bash",
        "launch/single_node.sh",
        "train.out_dir=runs/tiny",
        "train.steps=9",
        "train.resume=auto",
        *TINY,
    )
    assert_ok(p)
    assert "resumed from" in p.stdout and "steps 6->9" in p.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step0000009"
    assert scalar_steps(run / "tensorboard", "train/loss") == list(range(1, 10))


def test_two_containers_train_expert_parallel_over_ssh_as_one_host_does(engine, image, tmp_path):
    """DeepSpeed's default multi-node mode: launch/multi_node.sh without NO_SSH on one container starts the
    other node over pdsh/ssh; ep_size=2 puts half the experts in each container. The losses equal a
    one-host two-process run of the same config."""
    tag = f"s2moe-test-{os.getpid()}"
    data, runs, keys = tmp_path / "data", tmp_path / "runs", tmp_path / "ssh"
    runs.mkdir()
    keys.mkdir(mode=0o700)
    assert_ok(cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={data / 'pydoc'}"))
    # a key pair made for this test; the containers trust only it and talk only to each other
    engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{keys}:/keys",
        image,
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        "/keys/id_ed25519",
    )
    shutil.copy(keys / "id_ed25519.pub", keys / "authorized_keys")
    (keys / "config").write_text(
        "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )
    for f in keys.iterdir():
        f.chmod(0o600)
    nodes = [f"{tag}-node0", f"{tag}-node1"]
    (runs / "hostfile").write_text("".join(f"{n} slots=1\n" for n in nodes))
    engine.docker("network", "create", "--internal", tag)
    try:
        for n in nodes:
            engine.docker(
                "run",
                "-d",
                "--rm",
                "--name",
                n,
                "--hostname",
                n,
                "--network",
                tag,
                "--shm-size=1g",
                "-v",
                f"{data}:/workspace/s2moe_ds/data_cache",
                "-v",
                f"{runs}:/workspace/s2moe_ds/runs",
                "-v",
                f"{keys}:/root/.ssh:ro",
                image,
                "/usr/sbin/sshd",
                "-D",
                "-e",
            )
        common = ["model.moe.backend=deepspeed", "model.moe.ep_size=2", "train.steps=6", *TINY]
        p = engine.docker(
            "exec",
            "-e",
            "HOSTFILE=runs/hostfile",
            "-e",
            f"MASTER_ADDR={nodes[0]}",
            "-e",
            "DIST_TIMEOUT=120",
            nodes[0],
            "bash",
            "launch/multi_node.sh",
            "train.out_dir=runs/ssh",
            *common,
            check=False,
        )
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-4000:]
        assert "--no_ssh" not in out and "Running on the following workers" in out
        assert f"{nodes[1]}: " in out and "world=2" in out  # pdsh prefixes the other node's lines with its name
        ckpt = runs / "ssh" / "checkpoints" / "step0000006"
        assert sorted(p.name for p in ckpt.glob("layer_0_expert_*_model_states.pt")) == [
            f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)
        ]
        p = engine.docker(
            "exec",
            "-e",
            "NPROC=2",
            "-e",
            "DIST_TIMEOUT=120",
            nodes[0],
            "bash",
            "launch/single_node.sh",
            "train.out_dir=runs/one",
            *common,
            check=False,
        )
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        ssh, one = train_losses(runs / "ssh"), train_losses(runs / "one")
        assert sorted(ssh) == list(range(1, 7)) and ssh.keys() == one.keys()
        assert all(abs(ssh[s] - one[s]) <= 1e-5 for s in ssh), (ssh, one)
    finally:
        engine.docker("rm", "-f", *nodes, check=False)
        engine.docker("network", "rm", tag, check=False)
