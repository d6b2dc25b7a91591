"""The `s2moe` command line: one thin module per command on argparse subparsers, and one table from the
project's error types to exit codes, under which a bug is never passed off as a user error."""

import subprocess
import sys

import pytest
import torch.distributed as dist
from e2e import REPO, env

from s2moe_ds.checkpoint import CheckpointError
from s2moe_ds.cli import COMMANDS, main
from s2moe_ds.cli.errors import exit_code
from s2moe_ds.configtools import ConfigError
from s2moe_ds.data import DataError
from s2moe_ds.train import NonFiniteLoss, Stopped


def test_every_command_is_a_thin_module_and_no_library_module_parses_a_command_line():
    assert set(COMMANDS) == {"prepare", "train", "eval", "sample", "export", "reshard", "experiment", "report"}
    for name, module in COMMANDS.items():
        assert module.__name__.startswith("s2moe_ds.cli.") and callable(module.run), name
        assert callable(module.add_arguments) and module.HELP, name
    library = [p for p in (REPO / "s2moe_ds").rglob("*.py") if "cli" not in p.relative_to(REPO / "s2moe_ds").parts]
    parsing = [str(p.relative_to(REPO)) for p in library if "argparse" in p.read_text()]
    assert not parsing, f"argparse outside s2moe_ds/cli: {parsing}"


def test_train_help_lists_the_config_sections_and_points_to_the_field_docs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for section in ("model ", "model.moe ", "model.moe.s2moe ", "data ", "train "):
        assert f"\n  {section}" in text, section
    assert "MoEConfig in s2moe_ds/moe/layer.py" in text and "docs/training.md" in text and "dist_timeout_s" in text
    # the module entry points (python -m s2moe_ds.train, deepspeed --module s2moe_ds.train) print the same
    proc = subprocess.run([sys.executable, "-m", "s2moe_ds.train", "--help"], capture_output=True, text=True, env=env())
    assert proc.returncode == 0 and proc.stdout == text


def test_the_exit_code_table(monkeypatch):
    for error, code in [
        (ConfigError("x"), 2),
        (DataError("x"), 2),
        (CheckpointError("x"), 2),
        (PermissionError(13, "Permission denied"), 2),
        (NonFiniteLoss("x"), 3),
        (Stopped("x", 15), 143),
        (ValueError("a bug"), None),
        (KeyError("a bug"), None),
        (RuntimeError("gloo: Connection closed by peer"), None),  # one process has no peer to lose
    ]:
        assert exit_code(error) == code, error
    if hasattr(dist, "DistNetworkError"):
        assert exit_code(dist.DistNetworkError("x")) == 4  # torch's own type: no text needed
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert exit_code(RuntimeError("[gloo] Connection closed by peer")) == 4  # the fallback, under a launcher
    assert exit_code(RuntimeError("shape mismatch")) is None


def test_a_programming_error_is_not_disguised_as_a_user_error(monkeypatch, capsys):
    import s2moe_ds.data.prepare as prepare

    def bug(*args, **kwargs):
        raise ValueError("invalid literal for int() with base 10: 'x'")  # a bug deep inside

    monkeypatch.setattr(prepare, "prepare_config", bug)
    with pytest.raises(ValueError, match="invalid literal"):  # its traceback reaches the user (exit 1)
        main(["prepare", "--config", "tiny", "data.data_dir=/nonexistent"])
    err = capsys.readouterr().err
    assert "s2moe prepare: failed with an unexpected ValueError" in err and "error: invalid" not in err

    def user_error(*args, **kwargs):
        raise DataError("no corpus at /nowhere; set data.source")

    monkeypatch.setattr(prepare, "prepare_config", user_error)
    assert main(["prepare", "--config", "tiny", "data.data_dir=/nonexistent"]) == 2
    assert capsys.readouterr().err == "s2moe prepare: error: no corpus at /nowhere; set data.source\n"


def test_an_unknown_command_and_no_command():
    proc = subprocess.run([sys.executable, "-m", "s2moe_ds.cli", "trian"], capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and "invalid choice: 'trian'" in proc.stderr and "train" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "s2moe_ds.cli"], capture_output=True, text=True, env=env())
    assert proc.returncode == 0 and "COMMAND" in proc.stdout and "experiment" in proc.stdout
