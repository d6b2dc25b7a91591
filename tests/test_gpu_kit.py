"""The GPU check kit (gpu/, docs/gpu.md) kept working on a CPU machine: the scripts lint clean and refuse bad
input clearly; gpu/prepare.sh downloads the real kit (PyPI) under 64 MiB; gpu/check.sh --cpu-dry-run installs
it without network and runs every step that needs no CUDA, writing the report a GPU run writes; a failing
step makes it exit non-zero and the report name the step.

The end-to-end test installs the kit into S2MOE_GPU_CHECK_CACHE (default ~/.cache/s2moe-gpu-check), where
DeepSpeed's CPU comm op is compiled once per machine (1-2 minutes the first time)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from e2e import REPO, env

LIMIT = 64 * 1024 * 1024
SCRIPTS = ["gpu/prepare.sh", "gpu/check.sh"]


def sh(args: list[str], timeout: int, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args],
        cwd=REPO,
        env={**env(), "PYTHON": sys.executable, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_gpu_scripts_parse_and_pass_shellcheck():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    if not shutil.which("shellcheck"):
        if os.environ.get("S2MOE_REQUIRE_CLUSTER_TOOLS") == "1":
            pytest.fail("shellcheck not installed (apt-get install shellcheck)")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_check_refuses_a_missing_folder_or_kit_clearly(tmp_path):
    proc = sh(["gpu/check.sh", "--cpu-dry-run"], 60, {"OUT": ""})
    assert proc.returncode == 2 and "name the folder for the report" in proc.stderr
    proc = sh(["gpu/check.sh", "--cpu-dry-run", str(tmp_path / "out"), "--kit", str(tmp_path / "nokit")], 60)
    assert proc.returncode == 2 and "gpu/prepare.sh" in proc.stderr and "nokit" in proc.stderr
    proc = sh(["gpu/check.sh", "--cpu-dry-run", str(tmp_path / "out"), "--budget", "soon"], 60)
    assert proc.returncode == 2 and "--budget must be whole seconds" in proc.stderr
    proc = sh(["gpu/prepare.sh", "--data", str(tmp_path / "missing.txt"), "--kit", str(tmp_path / "kit")], 60)
    assert proc.returncode == 2 and "missing.txt' does not exist" in proc.stderr and not (tmp_path / "kit").exists()


def test_kit_folder_is_ignored_by_git():
    if not (REPO / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout (e.g. the working tree copied to the GPU machine)")
    proc = subprocess.run(["git", "check-ignore", "-q", ".gpu-kit/kit.json"], cwd=REPO)
    assert proc.returncode == 0, ".gpu-kit/ must be git-ignored: it holds downloaded wheels and the corpus"


@pytest.mark.slow
def test_prepare_then_check_dry_run_writes_the_report(tmp_path, shakespeare_path):
    kit, out = tmp_path / "kit", tmp_path / "out"
    prep = sh(["gpu/prepare.sh", "--kit", str(kit), "--data", str(shakespeare_path)], 600)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    assert size < LIMIT
    assert re.search(rf"kit .*: \d+ files, {size} bytes", prep.stdout), prep.stdout
    manifest = json.loads((kit / "kit.json").read_text())
    assert manifest["target_python"] == "3.12"
    names = {f["path"] for f in manifest["files"]}
    assert "data/tinyshakespeare.txt" in names and "wheels/deepspeed-0.19.8-py3-none-any.whl" in names
    assert any(re.match(r"wheels/pydantic_core-.*-cp312-cp312-manylinux.*x86_64\.whl$", n) for n in names)
    assert {
        "sdists/grouped_gemm-0.3.0.tar.gz",
        "sdists/megablocks-0.10.0.tar.gz",
        "sdists/stanford_stk-0.7.1.tar.gz",
    } <= names

    # the 450 s default budget is sized for the GPU machine; on a loaded CPU machine the dry run's install and
    # 20-step CPU trainings alone can spend it (seen in CI with experiment workers running), and the test
    # checks what the steps do, not how fast this machine is
    check = sh(["gpu/check.sh", "--cpu-dry-run", str(out), "--kit", str(kit), "--budget", "840"], 1000)
    assert check.returncode == 0, check.stdout[-6000:] + check.stderr[-3000:]
    report = (out / "gpu-report.md").read_text()
    assert "DRY RUN" in report and "nothing here ran on a GPU" in report
    steps = {s["name"]: s for s in json.loads((out / "check.json").read_text())["steps"]}
    expected = {
        "kit": "PASS",
        "install": "PASS",
        "build-grouped_gemm": "SKIP",
        "build-megablocks": "SKIP",
        "data": "PASS",
        "unit-tests": "PASS",
        "train-s2moe-local": "PASS",
        "train-smoe-top2-local": "PASS",
        "gpu-tests": "PASS",
        "train-s2moe-megablocks": "SKIP",
        "train-smoe-top2-megablocks": "SKIP",
        "bench": "PASS",
    }
    assert {n: s["status"] for n, s in steps.items()} == expected
    for name, status in expected.items():  # every step in the report's table with its result
        assert re.search(rf"^\| {re.escape(name)} \| {status} \| \d+ \|", report, re.M), name
    assert "needs CUDA" in steps["build-grouped_gemm"]["note"] and "is intact" in steps["build-grouped_gemm"]["note"]
    assert "in 20 steps on cpu" in steps["train-s2moe-local"]["note"]
    for row in ("| torch | ", "| DeepSpeed | 0.19.8 (", "| Python | ", "| GPU | none", "| NVIDIA driver | "):
        assert row in report, row
    assert "site-py" in report  # DeepSpeed came from the kit, not from this environment
    assert "| s2moe-local | 20 |" in report and "| smoe-top2-local | 20 |" in report
    assert "DeepSpeed MoE top-2 (capacity 1.25)" in report
    assert "not measured: MegaBlocks dMoE top-2 (grouped): needs CUDA" in report
    proc = subprocess.run(["tar", "-tzf", str(out / "check-logs.tar.gz")], capture_output=True, text=True)
    assert "logs/train-s2moe-local.log" in proc.stdout and "runs/s2moe-local/metrics.jsonl" in proc.stdout
    assert len(list(out.iterdir())) <= 8  # what a device run can bring back: 8 files at most

    # a step that fails: the others still run, the exit status says so and the report names it
    bad = sh(
        [
            "gpu/check.sh",
            "--cpu-dry-run",
            str(tmp_path / "bad"),
            "--kit",
            str(kit),
            "--only",
            "unit-tests",
            "--unit-tests",
            "tests/test_no_such_module.py",
        ],
        300,
    )
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    bad_report = (tmp_path / "bad" / "gpu-report.md").read_text()
    assert "FAILED: unit-tests" in bad_report and "### unit-tests" in bad_report
    assert re.search(r"^\| bench \| SKIP \| 0 \| not selected", bad_report, re.M)

    # a kit changed after it was prepared is refused before anything runs
    wheel = kit / "wheels" / "hjson-3.1.0-py3-none-any.whl"
    wheel.write_bytes(wheel.read_bytes()[:-10])
    broken = sh(["gpu/check.sh", "--cpu-dry-run", str(tmp_path / "broken"), "--kit", str(kit)], 120)
    assert broken.returncode == 2 and "cannot be used" in broken.stderr
    assert "hjson-3.1.0-py3-none-any.whl differs from kit.json" in (tmp_path / "broken" / "gpu-report.md").read_text()
