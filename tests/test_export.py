"""A model you can take away: export a run, delete its data and run folder, then sample, evaluate and load
it from another directory, in our code and through transformers' Auto classes."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from e2e import assert_ok, cli, env, single_train

pytestmark = pytest.mark.slow
COMMON = [
    "train.log_interval=2",
    "train.eval_iters=2",
    "train.progress=false",
    "train.eval_interval=4",
    "train.steps=4",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data, run = root / "data", root / "run"
    assert_ok(cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={data}"))
    assert_ok(single_train([f"data.data_dir={data}", f"train.out_dir={run}", *COMMON]))
    text = root / "heldout.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    from s2moe_ds.evaluate import load_model

    model, _, info = load_model(str(run), device="cpu")
    probe = torch.tensor([info["tokenizer"].encode("def main():\n    return ")])
    with torch.no_grad():
        reference = model(probe).logits
    out = root / "tiny-export"
    proc = cli("export", str(run), "--out", str(out))
    assert_ok(proc)
    shards = root / "sharded"
    assert_ok(cli("export", str(run), "--out", str(shards), "--max-shard-size", "200KB"))
    shutil.rmtree(data)  # nothing of the run or its data is left
    shutil.rmtree(run)
    return root, out, shards, text, probe, reference


def test_the_folder_is_in_the_hugging_face_layout(exported):
    root, out, shards, *_ = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_s2moe.py", "modeling_s2moe.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "s2moe" and config["architectures"] == ["S2MoEForCausalLM"]
    assert config["s2moe"]["moe"]["s2moe"]["enabled"] and config["hidden_size"] == 64
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((shards / f).exists() for f in files)
    assert not (shards / "model.safetensors").exists()


def test_sample_and_eval_from_another_directory_with_nothing_else_present(exported, tmp_path):
    root, out, _, text, *_ = exported
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "s2moe_ds.cli", *a],
        cwd=elsewhere,
        env=env(),  # noqa: E731
        capture_output=True,
        text=True,
        timeout=300,
    )
    s = run("sample", str(out), "--prompt", "def ", "--tokens", "40", "--device", "cpu")
    assert_ok(s)
    assert s.stdout.startswith("def ") and len(s.stdout) >= 30
    e = run("eval", str(out), "--text", str(text), "--json")
    assert_ok(e)
    res = json.loads(e.stdout.strip().splitlines()[-1])
    assert res["metric"] == "bpc" and 0 < res["value"] < 10 and res["tokens"] > 500
    bad = run("eval", str(out))
    assert bad.returncode == 2 and "--text FILE" in bad.stderr


def test_load_in_three_lines_gives_the_trained_models_logits(exported):
    root, out, shards, _, probe, reference = exported
    from s2moe_ds import load_pretrained

    for folder in (out, shards):
        model, tok = load_pretrained(folder)
        with torch.no_grad():
            torch.testing.assert_close(model(probe).logits, reference, rtol=0, atol=0)
        text = tok.decode(model.generate(torch.tensor([tok.encode("def ")]), 20, greedy=True)[0].tolist())
        assert text.startswith("def ") and len(text) > 4


def test_transformers_auto_classes_load_the_folder(exported):
    transformers = pytest.importorskip("transformers")
    root, out, shards, _, probe, reference = exported
    for folder in (out, shards):
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
        hf.eval()
        with torch.no_grad():
            logits = hf(probe).logits
        assert (logits - reference).abs().max().item() <= 1e-5


def test_export_refuses_an_existing_folder(exported, tmp_path):
    root, out, *_ = exported
    before = sorted(p.name for p in out.iterdir())
    bad = cli("export", str(out), "--out", str(out))
    assert bad.returncode == 2 and "already exists" in bad.stderr
    assert sorted(p.name for p in out.iterdir()) == before
