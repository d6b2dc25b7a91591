"""The configs and DeepSpeed configs ship inside the package (s2moe_ds/configs, s2moe_ds/ds_configs: the
one source of truth), so an installed package runs from any directory; the repository's top-level
configs/ and ds_configs/ are the user-facing copies and never drift from them."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from e2e import REPO, env

from s2moe_ds.config import CONFIG_DIR, DS_CONFIG_DIR, load_config, resolve_path
from s2moe_ds.configtools import ConfigError
from s2moe_ds.distributed import deepspeed_config


@pytest.mark.parametrize("packaged,copy", [(CONFIG_DIR, "configs"), (DS_CONFIG_DIR, "ds_configs")])
def test_the_top_level_copies_never_drift_from_the_package_data(packaged, copy):
    shipped = {p.name: p.read_bytes() for p in packaged.iterdir() if p.suffix in (".yaml", ".json")}
    user = {p.name: p.read_bytes() for p in (REPO / copy).iterdir() if p.suffix in (".yaml", ".json")}
    assert shipped, packaged
    assert sorted(user) == sorted(shipped), f"{copy}/ and {packaged} list different files"
    drifted = [name for name in shipped if user[name] != shipped[name]]
    assert not drifted, f"{copy}/ differs from the package data for {drifted}: edit {packaged}, then copy it over"


def test_bare_names_and_repository_paths_resolve_to_the_package_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("tiny") == CONFIG_DIR / "tiny.yaml"
    assert resolve_path("configs/tiny.yaml") == CONFIG_DIR / "tiny.yaml"
    assert resolve_path("zero2", DS_CONFIG_DIR) == DS_CONFIG_DIR / "zero2.json"
    assert resolve_path("ds_configs/zero2.json", DS_CONFIG_DIR) == DS_CONFIG_DIR / "zero2.json"
    assert resolve_path("model.py") == Path("model.py")  # a package source is no config
    (tmp_path / "tiny.yaml").write_text("train:\n  steps: 3\n")  # a file here wins over the shipped one
    assert load_config("tiny.yaml").train.steps == 3
    with pytest.raises(ConfigError, match="does not exist.*shipped configs, by name: .*tiny"):
        load_config("nope")


def test_config_tiny_and_its_ds_config_load_from_any_directory(tmp_path):
    code = (
        "import json; from s2moe_ds.config import load_config; from s2moe_ds.distributed import deepspeed_config; "
        "cfg = load_config('tiny'); print(json.dumps([cfg.train.ds_config, deepspeed_config(cfg)['zero_optimization']]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds_config, zero = json.loads(proc.stdout)
    assert ds_config == "ds_configs/zero2.json" and zero["stage"] == 2
    assert deepspeed_config(load_config("tiny", ["train.ds_config=zero0"]))["zero_optimization"]["stage"] == 0


@pytest.mark.slow
def test_s2moe_train_config_tiny_runs_in_an_empty_directory(tmp_path):
    cli = [sys.executable, "-m", "s2moe_ds.cli"]
    data = f"data.data_dir={tmp_path / 'pydoc'}"
    run = lambda *a: subprocess.run([*cli, *a], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)  # noqa: E731
    proc = run("prepare", "--config", "tiny", "--no-progress", data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("train", "--config", "tiny", data, "train.out_dir=out", "train.steps=2", "train.progress=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "step0000002"


@pytest.mark.slow
def test_the_wheel_carries_the_configs(tmp_path):
    src = tmp_path / "src"  # a clean copy: no stale build/ of the checkout goes into the wheel
    shutil.copytree(REPO / "s2moe_ds", src / "s2moe_ds", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("s2moe_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"s2moe_ds/configs/{p.name}" for p in CONFIG_DIR.glob("*.yaml")}
    expected |= {f"s2moe_ds/ds_configs/{p.name}" for p in DS_CONFIG_DIR.glob("*.json")}
    assert "s2moe_ds/configs/tiny.yaml" in expected and expected <= names, sorted(expected - names)
