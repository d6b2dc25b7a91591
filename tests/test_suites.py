"""Every suite file loads, and every run it describes is a valid config (no training)."""

import re
from pathlib import Path

import pytest

from s2moe_ds.config import load_config
from s2moe_ds.configtools import ConfigError
from s2moe_ds.experiments.suite import SUITE_DIR, find_suite, load_suite, run_spec

SUITES = sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def test_the_published_suites_are_there():
    assert {"cpu-shakespeare", "cpu-shakespeare-smoke", "cpu-pydoc", "text8", "enwik8", "wikitext103"} <= set(SUITES)


@pytest.mark.parametrize("name", SUITES)
def test_every_run_of_every_suite_is_a_valid_config(name):
    suite = load_suite(find_suite(name))
    assert len(suite.seeds) >= (1 if "smoke" in name else 2 if "sweep" in name else 3)
    for variant in suite.variants:  # (a `tuned` variant's own overrides; the tuned point adds lr/init)
        spec = run_spec(suite, variant, suite.seeds[0], None)
        cfg = load_config(spec.config, spec.overrides)
        moe = bool(cfg.model.moe_layer_ids())
        method = variant.method or variant.name  # a grid point is named <method>-<labels>
        assert moe == (not method.startswith("dense")), variant
        if method.startswith("s2moe"):
            assert cfg.model.moe.s2moe.enabled and cfg.model.moe.k == 1 and cfg.model.moe.eval_k == 1
        elif method.startswith("vqmoe"):  # top-1 plus the codebook's expert: two per token, as top-2
            assert cfg.model.moe.router == "vqmoe" and cfg.model.moe.k == 1 and not cfg.model.moe.s2moe.enabled
        elif method == "smoe-top1":  # the control for S2MoE: SMoE trained top-1, no second pathway
            assert cfg.model.moe.router == "smoe" and cfg.model.moe.k == 1 and not cfg.model.moe.s2moe.enabled
        elif moe:  # baselines: top-2, the same expert FLOPs per training token as S2MoE's two top-1 pathways
            assert not cfg.model.moe.s2moe.enabled and cfg.model.moe.k == 2


def test_cpu_suite_is_the_issue_recipe():
    from s2moe_ds.flops import flops_per_token
    from s2moe_ds.model import MoELanguageModel

    suite = load_suite(find_suite("cpu-shakespeare"))
    by_name = {v.name: v for v in suite.variants}
    cfgs = {}
    for name, v in by_name.items():
        spec = run_spec(suite, v, 0, None)
        cfgs[name] = load_config(spec.config, spec.overrides)
        cfgs[name].model.vocab_size = 65
    m, t = cfgs["s2moe-top1"].model, cfgs["s2moe-top1"].train
    assert (m.n_layer, m.n_head, m.d_model, m.context, m.moe.num_experts) == (4, 4, 128, 64, 8)
    assert (t.micro_batch_size, t.steps, cfgs["s2moe-top1"].data.dataset) == (12, 2000, "shakespeare")
    assert {
        "dense",
        "dense-wide",
        "smoe-top2",
        "xmoe-top2",
        "stablemoe-top2",
        "competesmoe-top2",
        "vqmoe-top1",
        "smoe-top2-auxfree",
        "s2moe-top1",
        "s2moe-nonoise",
        "s2moe-noinfonce",
        "s2moe-gate05",
        "s2moe-learnable",
        "smoe-top1",
    } == set(by_name)
    # the headline pair has 10 paired seeds, every other variant at least 3
    seeds = suite.variant_seeds
    assert seeds(by_name["s2moe-top1"]) == seeds(by_name["smoe-top2"]) == list(range(10))
    assert all(len(seeds(v)) >= 3 for v in suite.variants)
    # VQMoE at the same expert FLOPs per training token as SMoE top-2 (it had a third expert before)
    bt = 12 * 64
    assert flops_per_token(cfgs["vqmoe-top1"].model, True, batch_tokens=bt) == pytest.approx(
        flops_per_token(cfgs["smoe-top2"].model, True, batch_tokens=bt), rel=0.02
    )
    # the wide dense model has the MoE models' total parameters (within 1%)
    wide = MoELanguageModel(cfgs["dense-wide"].model).param_counts()["total"]
    moe = MoELanguageModel(cfgs["smoe-top2"].model).param_counts()["total"]
    assert wide == pytest.approx(moe, rel=0.01)


def test_bad_suite_files_are_named(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: [{name: a}, {name: a}]\n")
    with pytest.raises(ConfigError, match="unique 'name'"):
        load_suite(bad)
    # the training config's loader: the dotted field, a suggestion, the valid keys, and the suite file
    bad.write_text("variantz: []\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config field 'variantz' \(did you mean 'variants'\?\)"):
        load_suite(bad)
    bad.write_text("variants: [{name: a, overides: []}]\n")
    with pytest.raises(ConfigError, match=r"unknown config field 'variants\[0\].overides' \(did you mean 'overrides'"):
        load_suite(bad)
    bad.write_text("seeds: [0, one]\nvariants: [{name: a}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: config field 'seeds\[1\]': expected an integer, got 'one'"):
        load_suite(bad)
    bad.write_text("variants: [{name: a}\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_suite(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        find_suite(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "claim, needle",
    [
        (
            "{kind: parity, candidate: a, baseline: nope}",
            r"\(parity\) names variant 'nope', which the suite does not have; its variants: a, b",
        ),
        ("{kind: parity, candidate: a}", r"\(parity\): needs 'baseline'"),
        (
            "{kind: rank, candidate: a, baseline: b}",
            r"'baseline' is not used by this kind; it takes candidate, baselines",
        ),
        ("{kind: paritty, candidate: a, baseline: b}", r"kind 'paritty' is not one of parity, compute"),
        ("{kind: gap, candidate: a, baseline: b, name: '{metrc}'}", r"name '\{metrc\}' has a bad placeholder"),
    ],
)
def test_a_claim_naming_what_the_suite_lacks_is_refused_with_the_file(tmp_path: Path, claim, needle):
    bad = tmp_path / "claims.yaml"
    bad.write_text(f"variants: [{{name: a}}, {{name: b}}]\nclaims: [{claim}]\n")
    with pytest.raises(ConfigError, match=rf"suite {re.escape(str(bad))}: claims\[0\].*" + needle):
        load_suite(bad)


def test_where_the_corpus_sits_is_not_part_of_a_runs_spec():
    """Runs made while the suite file named a data.source still match the suite without it (the
    cpu-shakespeare rerun of commit cec5c81 did), and no suite file names a path outside the repository."""
    from s2moe_ds.experiments.suite import RunSpec

    suite = load_suite(find_suite("cpu-shakespeare"))
    variant = next(v for v in suite.variants if v.name == "s2moe-top1")
    spec = run_spec(suite, variant, 3, None)
    old = {**spec.to_dict(), "overrides": ["data.source=../shared/data/tinyshakespeare.txt", *spec.overrides]}
    assert spec.same_run(old) and spec.same_run(RunSpec.from_record(old))
    other = {**spec.to_dict(), "overrides": [*spec.overrides, "train.steps=9"]}
    assert not spec.same_run(other)
    for name in SUITES:
        text = find_suite(name).read_text()
        assert "../" not in text and "shared/" not in text, name
