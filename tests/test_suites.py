"""Every suite file loads, and every run it describes is a valid config (no training)."""
from pathlib import Path

import pytest

from s2moe_ds.config import load_config
from s2moe_ds.configtools import ConfigError
from s2moe_ds.experiment import SUITE_DIR, find_suite, load_suite, run_spec

SUITES = sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def test_the_published_suites_are_there():
    assert {"cpu-shakespeare", "cpu-shakespeare-smoke", "text8", "enwik8", "wikitext103"} <= set(SUITES)


@pytest.mark.parametrize("name", SUITES)
def test_every_run_of_every_suite_is_a_valid_config(name):
    suite = load_suite(find_suite(name))
    assert len(suite["seeds"]) >= (1 if "smoke" in name else 3)
    for variant in suite["variants"]:
        spec = run_spec(suite, variant, suite["seeds"][0], None)
        cfg = load_config(spec["config"], spec["overrides"])
        moe = bool(cfg.model.moe_layer_ids())
        assert moe == (variant["name"] != "dense"), variant
        if variant["name"].startswith("s2moe"):
            assert cfg.model.moe.s2moe.enabled and cfg.model.moe.k == 1 and cfg.model.moe.eval_k == 1
        elif moe:  # baselines: top-2, the same expert FLOPs per training token as S2MoE's two top-1 pathways
            assert not cfg.model.moe.s2moe.enabled and cfg.model.moe.k == 2


def test_cpu_suite_is_the_issue_recipe():
    suite = load_suite(find_suite("cpu-shakespeare"))
    spec = run_spec(suite, suite["variants"][-1], 0, None)
    cfg = load_config(spec["config"], spec["overrides"])
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.d_model, m.context, m.moe.num_experts) == (4, 4, 128, 64, 8)
    assert (t.micro_batch_size, t.steps, cfg.data.dataset) == (12, 2000, "shakespeare")
    assert [v["name"] for v in suite["variants"]] == ["dense", "smoe-top2", "xmoe-top2", "stablemoe-top2",
                                                      "competesmoe-top2", "vqmoe-top2", "s2moe-top1"]


def test_bad_suite_files_are_named(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: [{name: a}, {name: a}]\n")
    with pytest.raises(ConfigError, match="unique 'name'"):
        load_suite(bad)
    bad.write_text("variantz: []\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['variantz'\]"):
        load_suite(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        find_suite(str(tmp_path / "missing.yaml"))
