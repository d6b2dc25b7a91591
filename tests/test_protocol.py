"""The evidence protocol's parts (issue 23), without training: the expert-initialisation option, the
uniformity loss on any FFN's input (and that it is S2MoE's no-noise L_u), the noise's effect on routing,
the clean-path collapse figures, Tiny Shakespeare's test split, grid expansion of a sweep suite and the
selection rule that tuned suites take their settings from."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from s2moe_ds.analysis import analyse
from s2moe_ds.config import ModelConfig, load_config
from s2moe_ds.configtools import ConfigError
from s2moe_ds.data import DataError, prepare_config, read_meta
from s2moe_ds.experiments.results import code_version, record_command
from s2moe_ds.experiments.suite import find_suite, load_suite, run_spec, suite_from_dict
from s2moe_ds.experiments.tuning import resolve_tuned, selections
from s2moe_ds.experiments.tuning_report import sweep_section, tuned_section
from s2moe_ds.flops import flops_per_token
from s2moe_ds.model import MoELanguageModel
from s2moe_ds.moe.experts import ExpertSpec, init_expert
from s2moe_ds.moe.layer import MoEConfig, S2MoEConfig
from s2moe_ds.moe.s2moe import build_moe_layer
from s2moe_ds.moe.uncertainty import info_nce

# --- the expert initialisation option ---


def test_fan_in_init_draws_the_same_normals_at_the_fan_in_scale():
    dense = init_expert(ExpertSpec(4, 64, 256, "swiglu", 0.02, 0.005), base_seed=7, expert=3)
    fan_in = init_expert(ExpertSpec(4, 64, 256, "swiglu", 0.02, 0.005, init="fan_in"), base_seed=7, expert=3)
    torch.testing.assert_close(fan_in["w1"], dense["w1"] / 0.02 / 8)  # 1/sqrt(64)
    torch.testing.assert_close(fan_in["w3"], dense["w3"] / 0.02 / 8)
    torch.testing.assert_close(fan_in["w2"], dense["w2"] / 0.005 / 16)  # 1/sqrt(256)


def test_expert_init_is_a_validated_config_field():
    cfg = load_config("configs/shakespeare_s2moe.yaml", ["model.moe.expert_init=fan_in"])
    model = MoELanguageModel(_vocab(cfg.model))
    w1 = model.blocks[0].ffn.experts.w1
    assert abs(w1.std().item() * math.sqrt(128) - 1) < 0.05
    with pytest.raises(ConfigError, match=r"model.moe.expert_init.*'dense', 'fan_in'"):
        load_config("configs/shakespeare_s2moe.yaml", ["model.moe.expert_init=xavier"])


def _vocab(m: ModelConfig) -> ModelConfig:
    m.vocab_size = 16
    return m


# --- the uniformity loss: S2MoE's InfoNCE on any FFN's input, without the noisy pathway ---


def _model(moe: bool, coef: float) -> MoELanguageModel:
    cfg = ModelConfig(vocab_size=16, n_layer=2, n_head=2, d_model=32, context=8)
    cfg.moe_layers = "all" if moe else "none"
    cfg.moe.num_experts, cfg.moe.k, cfg.moe.d_ff = 4, 2, 32
    cfg.uniformity.coef = coef
    return MoELanguageModel(cfg)


@pytest.mark.parametrize("moe", [False, True])
def test_uniformity_loss_is_infonce_of_each_ffn_input_with_itself(moe):
    torch.manual_seed(0)
    model = _model(moe, 0.1)
    idx = torch.randint(16, (3, 8))
    inputs = []
    hooks = [b.ffn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in model.blocks]
    torch.manual_seed(5)
    out = model(idx, idx)
    for h in hooks:
        h.remove()
    assert {k for k in out.aux_losses if k.endswith("uniformity")} == {"layer0/uniformity", "layer1/uniformity"}
    # the same negatives: replay the RNG (the MoE layers draw nothing else in between)
    torch.manual_seed(5)
    for i, h in enumerate(inputs):
        h = h.reshape(-1, 32)
        expected = 0.1 * info_nce(h, h, 0.1, 64)
        torch.testing.assert_close(out.aux_losses[f"layer{i}/uniformity"], expected)
    out.aux_loss.backward()  # it trains the layers below the FFN (the attention's projections)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    assert not any("uniformity" in k for k in model(idx, idx).aux_losses)
    assert not any("uniformity" in k for k in _model(moe, 0.0)(idx, idx).aux_losses)


def test_uniformity_loss_is_what_s2moe_without_noise_trains_with():
    """s2moe-nonoise's L_u is InfoNCE(x, x): the control gives the baselines that same term."""
    layer = build_moe_layer(
        MoEConfig(num_experts=4, k=1, d_ff=32, s2moe=S2MoEConfig(enabled=True, sigma1=0, sigma2=0)), 32
    )
    layer.train()
    x = torch.randn(40, 32)
    torch.manual_seed(3)
    got = layer(x).aux_losses["uncertainty"]
    torch.manual_seed(3)
    torch.testing.assert_close(got, 0.1 * info_nce(x, x, 0.1, 64))


def test_uniformity_loss_flops_are_counted_in_training_only():
    cfg = ModelConfig(vocab_size=65, n_layer=4, d_model=128, context=64, moe_layers="none")
    base_train, base_eval = flops_per_token(cfg, True), flops_per_token(cfg, False)
    cfg.uniformity.coef = 0.1
    assert flops_per_token(cfg, True) == pytest.approx(base_train + 3 * 4 * (2 * 64 * 128 + 2 * 128))
    assert flops_per_token(cfg, False) == base_eval


# --- what the noise does to routing; collapse figures of the path inference runs ---


def _s2moe(sigma: float):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, k=1, eval_k=1, d_ff=32, s2moe=S2MoEConfig(enabled=True, sigma1=sigma, sigma2=sigma))
    layer = build_moe_layer(cfg, 32)
    layer.train()
    return layer


def test_pathway_disagreement_grows_with_the_noise():
    x = torch.nn.functional.layer_norm(torch.randn(512, 32), (32,))
    share = {s: _s2moe(s)(x).metrics["pathway_disagreement"].item() for s in (0.0, 0.1, 1.0)}
    assert share[0.0] == 0.0 and 0.0 < share[0.1] < share[1.0] <= 1.0, share


def test_s2moe_analysis_has_the_clean_path_and_the_noise_figures():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, n_layer=2, n_head=2, d_model=32, context=8)
    cfg.moe.num_experts, cfg.moe.k, cfg.moe.eval_k, cfg.moe.d_ff = 4, 1, 1, 32
    cfg.moe.s2moe.enabled = True
    layers = analyse(MoELanguageModel(cfg), torch.randint(16, (4, 8)), jacobian_tokens=8)
    for rec in layers:
        assert 1 <= rec["clean_jacobian_effective_rank"] <= 32
        assert 1 <= rec["clean_routing_jacobian_effective_rank"] <= 32
        assert 0.9 < rec["noise_cos"] < 1.0 and 0.0 <= rec["pathway_disagreement"] <= 1.0
        # both pathways mixed by the gate is another function than the clean one
        assert rec["clean_jacobian_effective_rank"] != rec["jacobian_effective_rank"]
    cfg.moe.s2moe.enabled = False
    assert "noise_cos" not in analyse(MoELanguageModel(cfg), torch.randint(16, (4, 8)), jacobian_tokens=8)[0]


# --- Tiny Shakespeare gets a test split ---


def test_shakespeare_splits_90_5_5_and_an_old_folder_is_refused(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(10_000))
    (tmp_path / "ts.txt").write_text(text)
    cfg = load_config(
        "configs/shakespeare_s2moe.yaml", [f"data.source={tmp_path / 'ts.txt'}", f"data.data_dir={tmp_path / 'd'}"]
    ).data
    prepare_config(cfg)
    meta = read_meta(tmp_path / "d")
    assert meta["splits"] == {"train": 9000, "val": 500, "test": 500}
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=meta["dtype"])
    assert len(train) == 9000  # the train part of the old 90/10 split, unchanged
    old = {**meta, "splits": {"train": 9000, "val": 1000}}
    (tmp_path / "d" / "meta.json").write_text(json.dumps(old))
    with pytest.raises(DataError, match="old 90/10 train/val split.*run `s2moe prepare` again"):
        read_meta(tmp_path / "d")


# --- sweep grids and the selection rule ---

SWEEP = {
    "base": "configs/tiny.yaml",
    "seeds": [0, 1],
    "variants": [
        {"name": "a", "grid": {"train.lr": {"lr1": 1.0e-3, "lr2": 2.0e-3}, "model.moe.expert_init": {"d": "dense"}}},
        {"name": "plain", "overrides": ["train.lr=5.0e-4"]},
    ],
}


def test_a_grid_expands_into_named_points_of_one_method():
    suite = suite_from_dict(SWEEP, "sweep.yaml")
    assert [v.name for v in suite.variants] == ["a-lr1-d", "a-lr2-d", "plain"]
    assert [v.method for v in suite.variants] == ["a", "a", ""]
    assert suite.variants[1].overrides == ["train.lr=0.002", "model.moe.expert_init=dense"]
    with pytest.raises(ConfigError, match=r"grid key 'train.lr' must map labels to values"):
        suite_from_dict({"variants": [{"name": "a", "grid": {"train.lr": [1, 2]}}]}, "bad.yaml")
    with pytest.raises(ConfigError, match=r"name a 'tuned' method but the suite has no 'tuning"):
        suite_from_dict({"variants": [{"name": "a", "tuned": "x"}]}, "bad.yaml")


def _finish(folder: Path, suite, name: str, seed: int, bpc: float) -> None:
    v = suite.variant(name)
    d = folder / "runs" / f"{name}-seed{seed}"
    d.mkdir(parents=True)
    row = {"inference": "train_k", "metric": "bpc", "bpc": bpc, "split": "val"}
    record = {**run_spec(suite, v, seed, None).to_dict(), "code": code_version(), "train_wall_s": 1.0}
    (d / "result.json").write_text(json.dumps({**record, "resumed": False, "rows": [row], "analysis": []}))


def test_tuned_variants_take_the_point_with_the_lowest_mean_and_refuse_a_partial_sweep(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps(SWEEP))
    sweep = load_suite(sweep_file)
    folder = tmp_path / "results"
    folder.mkdir()
    record_command(folder, sweep, None, "s2moe experiment sweep")
    tuned = {
        "base": "configs/tiny.yaml",
        "seeds": [100],
        "tuning": {"suite": str(sweep_file), "folder": str(folder)},
        "variants": [{"name": "a-final", "tuned": "a", "overrides": ["train.steps=7"]}, {"name": "other"}],
    }
    suite = suite_from_dict(tuned, tmp_path / "final.yaml")
    _finish(folder, sweep, "a-lr1-d", 0, 2.0)
    _finish(folder, sweep, "a-lr1-d", 1, 2.2)
    _finish(folder, sweep, "a-lr2-d", 0, 2.05)
    with pytest.raises(ConfigError, match=r"'a-final' takes 'a''s tuned point, but the sweep .* has 3 of its 4 runs"):
        resolve_tuned(suite)
    _finish(folder, sweep, "a-lr2-d", 1, 2.1)  # mean 2.075 < 2.1
    sel = selections(sweep, folder)["a"]
    assert [round(p.mean, 3) for p in sel.points] == [2.1, 2.075] and sel.best.variant == "a-lr2-d"
    resolved = resolve_tuned(suite)
    final = resolved.variant("a-final")
    assert final.overrides == ["train.lr=0.002", "model.moe.expert_init=dense", "train.steps=7"]
    assert final.tuned_point == "a-lr2-d" and resolved.variant("other").overrides == []
    assert suite.variant("a-final").overrides == ["train.steps=7"]  # the loaded suite is not changed
    # the reports say it: the sweep's grid with its pick, the final suite's setting and the sweep's code
    grid = "\n".join(sweep_section(sweep, folder))
    assert (
        "| a | a-lr2-d | `train.lr=0.002 model.moe.expert_init=dense` | 2.0750 ± 0.0354 | 2/2 | **selected** |" in grid
    )
    assert "| a | a-lr1-d | `train.lr=0.001 model.moe.expert_init=dense` | 2.1000 ± 0.1414 | 2/2 |  |" in grid
    setting = "\n".join(tuned_section(suite, resolved))
    assert "| a-final | a | a-lr2-d | `train.lr=0.002 model.moe.expert_init=dense` |" in setting
    assert f"made by code {code_version()['commit']}" in setting and "other" not in setting.split("|---|")[-1]
    cfg = load_config(*(lambda s: (s.config, s.overrides))(run_spec(resolved, final, 100, None)))
    assert cfg.train.lr == 0.002 and cfg.train.steps == 7 and cfg.train.seed == 100
    bad = suite_from_dict({**tuned, "variants": [{"name": "x", "tuned": "plain"}]}, tmp_path / "bad.yaml")
    with pytest.raises(
        ConfigError, match=r"tuned as 'plain', which sweep 'sweep' does not grid; its gridded methods: a"
    ):
        resolve_tuned(bad)


def test_the_protocols_test_suites_take_every_tuned_method_from_the_sweep():
    sweep = load_suite(find_suite("shakespeare-sweep"))
    methods = {v.method for v in sweep.variants if v.method}
    assert methods == {"dense", "smoe-top2", "smoe-top1", "s2moe-top1", "smoe-top2-nobias"}
    assert sweep.eval.split == "val" and sum(len(sweep.variant_seeds(v)) for v in sweep.variants) == 46
    for name in ("shakespeare-test", "shakespeare-long", "pydoc-test"):
        suite = load_suite(find_suite(name))
        assert suite.eval.split == "test" and suite.tuning.suite == "shakespeare-sweep"
        assert all(v.tuned in methods - {"smoe-top2-nobias"} for v in suite.variants), name
        assert not set(suite.seeds) & set(sweep.seeds)  # fresh seeds: not the ones selection looked at
    test = load_suite(find_suite("shakespeare-test"))
    assert (
        len(test.variant_seeds(test.variant("s2moe-top1"))) == len(test.variant_seeds(test.variant("smoe-top2"))) == 10
    )
    assert all(
        len(test.variant_seeds(v)) >= 5
        for v in test.variants
        if not v.name.startswith(("s2moe-sigma", "xmoe", "stablemoe", "vqmoe"))
    )
