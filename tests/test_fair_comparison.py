"""What makes the router comparison fair: the combine-weight rule at another inference k, expert
initialisation like the dense FFN, S2MoE's uncertainty loss acting on the noise, its ablation switches,
and the smaller accounting fixes (InfoNCE FLOPs with all negatives, capacity priority of the two
pathways, metrics of separately dispatched pathways)."""

import math

import pytest
import torch

from s2moe_ds.config import ModelConfig
from s2moe_ds.configtools import to_dict
from s2moe_ds.flops import flops_per_token
from s2moe_ds.model import MoELanguageModel
from s2moe_ds.moe.dispatch.deepspeed import slot_locations
from s2moe_ds.moe.layer import MoEConfig, S2MoEConfig
from s2moe_ds.moe.routers import build_router
from s2moe_ds.moe.s2moe import build_moe_layer

# --- 1. weights at an inference k other than the training k ---


def test_top2_trained_router_at_top1_gives_its_expert_weight_one():
    torch.manual_seed(0)
    r = build_router("smoe", {}, 8, 4, train_k=2)
    r.eval()
    x = torch.randn(10, 8)
    out = r(x, 1)
    torch.testing.assert_close(out.weights_TK, torch.ones(10, 1))  # the training rule: renormalised
    r.eval_weights = "per_k"  # the old convention: its probability under the softmax over all experts
    old = r(x, 1)
    torch.testing.assert_close(old.weights_TK, r.proj(x).softmax(-1).gather(-1, old.expert_ids_TK))
    assert (old.weights_TK < 1).all()


def test_top1_trained_router_keeps_probabilities_at_top2():
    torch.manual_seed(0)
    r = build_router("smoe", {}, 8, 4, train_k=1)
    x = torch.randn(10, 8)
    r.train()
    w1 = r(x, 1).weights_TK
    torch.testing.assert_close(w1, r.proj(x).softmax(-1).max(-1, keepdim=True).values)  # 'auto' at k=1: prob
    r.eval()
    out = r(x, 2)
    torch.testing.assert_close(out.weights_TK, r.proj(x).softmax(-1).gather(-1, out.expert_ids_TK))
    r.eval_weights = "per_k"
    torch.testing.assert_close(r(x, 2).weights_TK.sum(-1), torch.ones(10))


def test_top1_training_weight_gives_the_router_a_task_gradient():
    for rule, expect in (("auto", True), ("renorm", False)):
        r = build_router("smoe", {"weights": rule, "balance_coef": 0.0}, 8, 4, train_k=1)
        r.train()
        r(torch.randn(10, 8), 1).weights_TK.sum().backward()
        grad = r.proj.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect, rule


def test_model_set_inference_switches_the_convention_on_every_layer():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, n_layer=2, n_head=2, d_model=8, context=8)
    cfg.moe.num_experts, cfg.moe.k, cfg.moe.eval_k = 4, 2, 2
    model = MoELanguageModel(cfg).eval()
    idx = torch.randint(0, 16, (2, 8))
    model.set_inference(k=1, weights="train")
    a = model(idx, idx).loss
    model.set_inference(weights="per_k")
    b = model(idx, idx).loss
    assert all(layer.router.eval_weights == "per_k" for _, layer in model.moe_layers())
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="'train' or 'per_k'"):
        model.set_inference(weights="renorm")


def test_set_inference_lives_on_the_layers_and_leaves_the_config_alone():
    """Evaluation settings are the modules' (the config is shared by every layer and saved with the run);
    the FLOPs figure takes them as arguments."""
    cfg = ModelConfig(vocab_size=16, n_layer=2, n_head=2, d_model=8, context=8)
    cfg.moe.num_experts, cfg.moe.k, cfg.moe.eval_k = 4, 1, 1
    cfg.moe.s2moe.enabled = True
    before = to_dict(cfg)
    model = MoELanguageModel(cfg).eval()
    model.set_inference(k=2, pathways="both", weights="per_k")
    assert to_dict(cfg) == before
    assert model.inference() == (2, "both")
    assert all(layer.router.eval_weights == "per_k" for _, layer in model.moe_layers())
    both_k2 = flops_per_token(cfg, training=False, k=2, pathways="both")
    assert both_k2 > flops_per_token(cfg, training=False, k=2) > flops_per_token(cfg, training=False)
    with pytest.raises(ValueError, match="'clean' or 'both'"):
        model.set_inference(pathways="noisy")


# --- 5. experts start like the dense FFN ---


def test_moe_ffn_output_starts_at_the_dense_ffn_scale():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, n_layer=4, n_head=4, d_model=128, context=8)
    cfg.moe.num_experts, cfg.moe.k = 8, 2
    moe = MoELanguageModel(cfg)
    dense_cfg = ModelConfig(vocab_size=16, n_layer=4, n_head=4, d_model=128, context=8, moe_layers="none")
    dense = MoELanguageModel(dense_cfg)
    h = torch.randn(512, 128)  # a LayerNorm output
    with torch.no_grad():
        moe_std = moe.blocks[0].ffn(h).y.std().item()
        dense_std = dense.blocks[0].ffn(h).std().item()
    assert 0.5 < moe_std / dense_std < 2.0, (moe_std, dense_std)  # was ~25x with 1/sqrt(fan_in) experts


# --- 6. S2MoE: the uncertainty loss's handle on the noise; the ablation switches ---


def _s2moe(**s2):
    cfg = MoEConfig(num_experts=4, k=1, eval_k=1, d_ff=32, s2moe=S2MoEConfig(enabled=True, **s2))
    return build_moe_layer(cfg, 16)


def test_fixed_sigmas_give_the_uncertainty_loss_no_parameter_of_the_noise():
    torch.manual_seed(0)
    layer = _s2moe()
    layer.train()
    assert not any("sigma" in n for n, _ in layer.named_parameters())
    out = layer(torch.randn(64, 16))
    assert "uncertainty" in out.aux_losses and 0.97 < out.metrics["noise_cos"] < 1.0


@pytest.mark.parametrize("sigma,direction", [(0.02, -1), (0.5, +1)])
def test_learnable_noise_is_held_at_the_target_similarity(sigma, direction):
    """Below the target's noise the noise-level term grows the sigmas (negative gradient on log sigma),
    above it shrinks them; InfoNCE alone would always shrink them."""
    torch.manual_seed(0)
    layer = _s2moe(noise="learnable", sigma1=sigma, sigma2=sigma, target_similarity=0.99, uncertainty_coef=1.0)
    layer.train()
    x = torch.randn(256, 16)
    out = layer(x)
    out.aux_losses["uncertainty"].backward()
    g = layer.noise.log_sigma1.grad.sum() + layer.noise.log_sigma2.grad.sum()
    assert math.copysign(1, g.item()) == direction, g
    layer.zero_grad()
    layer.cfg.s2moe.noise_target_coef = 0.0  # InfoNCE alone
    layer(x).aux_losses["uncertainty"].backward()
    assert layer.noise.log_sigma1.grad.sum() + layer.noise.log_sigma2.grad.sum() > 0


def test_fixed_gate_ablation_mixes_the_pathways_half_and_half():
    torch.manual_seed(0)
    layer = _s2moe(gate="fixed", gate_value=0.5)
    layer.train()
    assert layer.gate is None
    x = torch.randn(12, 16)
    torch.manual_seed(1)
    fused = layer(x).y
    layer.fused_dispatch = False  # two dispatches: f(x) and f(x_hat) separately
    torch.manual_seed(1)
    layer.cfg.s2moe.uncertainty_on = "outputs"  # returns the pathway outputs separately
    y = layer(x).y
    torch.testing.assert_close(fused, y, rtol=1e-5, atol=1e-6)
    assert layer.gate_values(x).eq(0.5).all()


def test_unfused_pathways_report_both_pathways_routing():
    torch.manual_seed(0)
    layer = _s2moe()
    layer.fused_dispatch = False
    layer.train()
    out = layer(torch.randn(12, 16))
    assert out.metrics["tokens_per_expert"].sum().item() == 2 * 12  # both pathways, top-1 each


# --- 8. smaller accounting fixes ---


def test_infonce_flops_with_every_token_as_a_negative():
    cfg = ModelConfig(vocab_size=65, n_layer=4, n_head=4, d_model=128, context=64)
    cfg.moe.k, cfg.moe.s2moe.enabled = 1, True
    cfg.moe.s2moe.num_negatives = 64
    sampled = flops_per_token(cfg, training=True, batch_tokens=768)
    cfg.moe.s2moe.num_negatives = 0
    every = flops_per_token(cfg, training=True, batch_tokens=768)
    assert every - sampled == pytest.approx(3 * 4 * 2 * (768 - 64) * 128)  # 3x fwd, 4 layers, 2 M d
    with pytest.raises(ValueError, match="batch_tokens"):
        flops_per_token(cfg, training=True)


def test_capacity_priority_alternates_the_two_pathways():
    # 4 clean then 4 noisy rows, all to expert 0; a capacity of 4 must keep 2 of each, not the 4 clean
    ids_KT = torch.zeros(1, 8, dtype=torch.long)
    loc, _ = slot_locations(ids_KT, 2, num_out=4)
    kept = (loc < 4)[0]
    assert kept[:4].sum() == 2 and kept[4:].sum() == 2
    assert slot_locations(ids_KT, 2)[0].tolist() == [list(range(8))]  # one pathway: token order


@pytest.mark.parametrize("sigma1,sigma2", [(0.0, 0.0), (0.1, 0.0)])
def test_zero_sigmas_give_finite_gradients(sigma1, sigma2):
    """The no-noise ablation: sqrt's gradient at 0 made every gradient NaN (and ZeRO skipped every step)."""
    torch.manual_seed(0)
    layer = _s2moe(sigma1=sigma1, sigma2=sigma2)
    layer.train()
    x = torch.randn(16, 16)
    x[0] = 0.0
    x.requires_grad_(True)
    out = layer(x)
    (out.y.sum() + sum(out.aux_losses.values())).backward()
    assert torch.isfinite(x.grad).all() and all(
        torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None
    )
    if sigma1 == sigma2 == 0:
        assert torch.equal(layer.noise(x.detach()), x.detach())


# --- aux-loss-free balancing ---


def test_selection_bias_changes_the_choice_not_the_weights():
    r = build_router("smoe", {"bias_update_rate": 0.1, "bias": False}, 2, 4, train_k=1)
    with torch.no_grad():
        r.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.9, 0.0], [0.0, 1.0], [0.0, 0.5]]))
    x = torch.tensor([[1.0, 0.0]])
    scores = r.proj(x)
    assert r(x, 1).expert_ids_TK.item() == 0
    r.selection_bias_E.copy_(torch.tensor([0.0, 0.2, 0.0, 0.0]))  # pushes expert 1 above expert 0
    out = r(x, 1)
    assert out.expert_ids_TK.item() == 1
    torch.testing.assert_close(out.weights_TK, scores.softmax(-1)[:, 1:2])  # the unbiased probability ('auto' at k=1)
    r.update_selection_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # overloaded down, underloaded up
    torch.testing.assert_close(r.selection_bias_E, torch.tensor([-0.1, 0.3, 0.0, 0.0]))
    plain = build_router("smoe", {}, 2, 4)
    assert plain.selection_bias_E is None and "selection_bias_E" not in plain.state_dict()


def test_selection_bias_lowers_imbalance_over_steps():
    torch.manual_seed(0)
    r = build_router("smoe", {"bias_update_rate": 0.05}, 8, 4, train_k=2)
    with torch.no_grad():
        r.proj.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))  # expert 0 preferred by everyone
    x = torch.randn(256, 8)
    before = r(x, 2).metrics["load_imbalance"].item()
    for _ in range(100):
        r.update_selection_bias(r(x, 2).metrics["tokens_per_expert"])
    assert r(x, 2).metrics["load_imbalance"].item() < before - 0.3
