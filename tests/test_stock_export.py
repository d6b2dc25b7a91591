"""Train it here, serve it anywhere (issue 26): a llama-style S2MoE trained through the deepspeed launcher
(two processes, experts sharded over them) exports as a stock transformers MoE model, which loads and
generates where s2moe_ds cannot be imported, without trust_remote_code, with the trained model's logits;
its tokenizer loads with AutoTokenizer."""

import json
import subprocess
import sys

import pytest
import torch
from e2e import REPO, assert_ok, cli, deepspeed_train, single_train

pytestmark = pytest.mark.slow
COMMON = ["train.log_interval=2", "train.eval_iters=2", "train.progress=false", "train.eval_interval=4",
          "train.steps=4", "train.save_interval=4"]  # fmt: skip
PROMPT = "def main():\n    return "
TEXT = "class Point:\n    def __init__(self, x):\n        self.x = x\n"

# run where s2moe_ds cannot be imported: transformers' own classes only
CLEAN = r"""
import importlib.abc, json, sys
class NoS2MoE(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "s2moe_ds":
            raise ImportError("s2moe_ds is not installed here")
sys.meta_path.insert(0, NoS2MoE())
try:
    import s2moe_ds
    raise SystemExit("s2moe_ds imported")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, text = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = tok(prompt)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
    gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0].tolist()
print(json.dumps({"model_type": model.config.model_type, "class": type(model).__name__, "ids": ids,
                  "logits": logits.tolist(), "generated": gen, "roundtrip": tok.decode(tok(text)["input_ids"]),
                  "loaded": sorted(m for m in sys.modules if m.startswith("s2moe_ds"))}))
"""


def clean_load(folder, tmp_path) -> dict:
    script = tmp_path / "clean_load.py"
    script.write_text(CLEAN)
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), PROMPT, TEXT],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    data = root / "data"
    assert_ok(cli("prepare", "--config", "configs/tiny_llama.yaml", f"data.data_dir={data}"))
    qwen = root / "qwen-run"
    overrides = [f"data.data_dir={data}", f"train.out_dir={qwen}", "model.moe.backend=deepspeed",
                 "model.moe.ep_size=2", *COMMON]  # fmt: skip
    assert_ok(deepspeed_train(2, overrides, config="configs/tiny_llama.yaml", timeout=600))
    # S2MoE with the authors' top-1 weight (renormalised: weight 1) and no QK-norm: Mixtral
    mixtral = root / "mixtral-run"
    overrides = [f"data.data_dir={data}", f"train.out_dir={mixtral}", "model.qk_norm=false",
                 "model.moe.router_args.weights=renorm", *COMMON]  # fmt: skip
    assert_ok(single_train(overrides, config="configs/tiny_llama.yaml"))
    return root, data, {"qwen3_moe": qwen, "mixtral": mixtral}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_a_stock_export_loads_and_generates_without_s2moe_ds(trained, model_type, tmp_path):
    root, data, runs = trained
    from s2moe_ds import load_pretrained
    from s2moe_ds.evaluate import load_model

    ours, _, info = load_model(str(runs[model_type]), device="cpu")
    out = tmp_path / "export"
    proc = cli("export", str(runs[model_type]), "--out", str(out))
    assert_ok(proc)
    assert f"as {model_type} (stock transformers architecture)" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and "auto_map" not in config
    assert not any(p.suffix == ".py" for p in out.iterdir())  # no modeling code: transformers' own

    got = clean_load(out, tmp_path)
    assert got["loaded"] == [] and got["model_type"] == model_type
    tok = info["tokenizer"]
    assert got["ids"] == tok.encode(PROMPT)
    with torch.no_grad():
        reference = ours(torch.tensor([got["ids"]])).logits[0]
    assert (torch.tensor(got["logits"]) - reference).abs().max().item() <= 1e-5
    greedy = ours.generate(torch.tensor([got["ids"]]), 24, greedy=True)[0].tolist()
    assert got["generated"] == greedy
    assert got["roundtrip"] == TEXT
    # the same folder is ours too: s2moe_ds loads it back exactly (S2MoE's noise and gate included)
    model, _ = load_pretrained(out)
    for name, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_s2moe_sample_greedy_equals_the_stock_models_generate(trained, tmp_path):
    root, data, runs = trained
    out = tmp_path / "export"
    assert_ok(cli("export", str(runs["qwen3_moe"]), "--out", str(out)))
    got = clean_load(out, tmp_path)
    proc = cli("sample", str(out), "--prompt", PROMPT, "--tokens", "24", "--greedy", "--device", "cpu")
    assert_ok(proc)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert proc.stdout.rstrip("\n") == tok.decode(got["generated"]).rstrip("\n")


def test_format_stock_says_why_a_model_does_not_fit_and_writes_nothing(trained, tmp_path):
    root, data, runs = trained
    out = tmp_path / "export"
    # the gpt2 block: no stock architecture; auto writes ours, stock is refused with the reason
    gpt2 = root / "gpt2-run"
    assert_ok(single_train([f"data.data_dir={data}", f"train.out_dir={gpt2}", *COMMON]))
    bad = cli("export", str(gpt2), "--out", str(out), "--format", "stock")
    assert bad.returncode == 2 and "no stock transformers architecture fits" in bad.stderr
    assert "model.arch is 'gpt2'" in bad.stderr and not out.exists()
    assert_ok(cli("export", str(gpt2), "--out", str(out)))
    assert json.loads((out / "config.json").read_text())["model_type"] == "s2moe"


def test_every_tokenizer_kind_loads_with_auto_tokenizer(tmp_path, shakespeare_path):
    from transformers import AutoTokenizer

    from s2moe_ds.data.hf_tokenizer import write_auto_tokenizer
    from s2moe_ds.data.prepare import prepare
    from s2moe_ds.data.store import load_tokenizer

    text = shakespeare_path.read_text()[:3000]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": text[i : i + 300]}) + "\n" for i in range(0, 3000, 300)))
    enwik = tmp_path / "enwik8"
    enwik.write_bytes(("<page>caf\u00e9 \u65e5\u672c</page>\n" * 300).encode())
    cases = {
        "char": ("text", str(shakespeare_path), "char", "First Citizen:\nBefore we proceed"),
        "char+eod": ("corpus", str(src), "char", "Speak, speak."),
        "bytes": ("enwik8", str(enwik), "char", "<page>caf\u00e9</page>"),
        "sentencepiece": ("text", str(shakespeare_path), "sentencepiece", "We are accounted poor citizens"),
    }
    for name, (dataset, source, kind, sample) in cases.items():
        d = tmp_path / name
        prepare(dataset, d, source=source, tokenizer=kind, vocab_size=200, progress=False)
        ours = load_tokenizer(d)
        folder = tmp_path / f"{name}-tok"
        folder.mkdir()
        write_auto_tokenizer(ours, folder, 64)
        hf = AutoTokenizer.from_pretrained(str(folder))
        ids = hf(sample)["input_ids"]
        assert hf.decode(ids) == sample, name
        if kind == "char":  # one id per character: the very ids of ours
            assert ids == ours.encode(sample), name
        if ours.eod_id is not None:
            assert hf.eos_token_id == ours.eod_id, name


def test_the_config_names_what_is_wrong_with_a_llama_option_on_the_gpt2_block():
    from s2moe_ds.config import load_config
    from s2moe_ds.configtools import ConfigError

    with pytest.raises(ConfigError, match="model.qk_norm.*option of model.arch 'llama'"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.qk_norm=true"])
    with pytest.raises(ConfigError, match="model.n_kv_head.*must divide model.n_head"):
        load_config(REPO / "configs" / "tiny_llama.yaml", ["model.n_kv_head=3"])
