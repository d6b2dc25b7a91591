"""Shared experts (``moe.num_shared_experts``, issue 26 §1): every token's output is the routed experts'
plus the shared FFN's; under S2MoE both pathways run them, in the fused dispatch as in the separate one;
FLOPs and active parameters count them; no stock export claims them."""

import pytest
import torch

from s2moe_ds.config import ModelConfig
from s2moe_ds.flops import expert_flops, moe_layer_flops
from s2moe_ds.model import MoELanguageModel
from s2moe_ds.moe import MoEConfig, S2MoEConfig, build_moe_layer


def cfg(activation="swiglu", s2moe=False, **kw) -> MoEConfig:
    kw.setdefault("num_shared_experts", 2)
    return MoEConfig(num_experts=4, k=2, d_ff=8, activation=activation,
                     s2moe=S2MoEConfig(enabled=s2moe, uncertainty_coef=0.0), **kw)  # fmt: skip


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_the_output_is_the_routed_experts_plus_the_shared_ffn(activation):
    torch.manual_seed(0)
    layer = build_moe_layer(cfg(activation), 16).eval()
    x = torch.randn(3, 5, 16)
    x_TD = x.reshape(-1, 16)
    route = layer.route(x_TD)
    routed = layer.experts(x_TD, route.expert_ids_TK, route.weights_TK)
    w = layer.shared
    h = w.fc(x_TD)
    h = torch.nn.functional.gelu(h) if activation == "gelu" else torch.nn.functional.silu(h) * w.up(x_TD)
    torch.testing.assert_close(layer(x).y.reshape(-1, 16), routed + h @ w.proj.weight.t())
    assert w.fc.weight.shape == (2 * 8, 16) and w.fc.bias is None


@pytest.mark.parametrize("uncertainty_on", ["inputs", "outputs"])
def test_s2moe_fused_dispatch_with_shared_experts_equals_the_separate_pathways(uncertainty_on):
    torch.manual_seed(0)
    c = cfg(s2moe=True)
    c.s2moe.uncertainty_on = uncertainty_on
    fused = build_moe_layer(c, 16)
    separate = build_moe_layer(c, 16)
    separate.load_state_dict(fused.state_dict())
    separate.fused_dispatch = False
    x = torch.randn(2, 7, 16)
    outs = []
    for layer in (fused, separate):
        torch.manual_seed(5)  # the same noise
        xi = x.clone().requires_grad_()
        y = layer(xi).y
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, layer.shared.fc.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flops_and_active_parameters_count_the_shared_experts():
    m = ModelConfig(vocab_size=30, n_layer=1, d_model=16, n_head=2, context=8, moe=cfg())
    plain = ModelConfig(vocab_size=30, n_layer=1, d_model=16, n_head=2, context=8, moe=cfg(num_shared_experts=0))
    assert moe_layer_flops(m, False) - moe_layer_flops(plain, False) == 2 * expert_flops(16, 8, "swiglu")
    a, b = MoELanguageModel(m).param_counts(), MoELanguageModel(plain).param_counts()
    assert a["total"] - b["total"] == a["active_per_token"] - b["active_per_token"] == 3 * 16 * 16


def test_no_stock_export_claims_shared_experts():
    from s2moe_ds.checkpoint.stock import stock_fit

    m = ModelConfig(vocab_size=30, arch="llama", qk_norm=True, n_layer=1, d_model=16, n_head=2, context=8,
                    moe=cfg(router_args={"bias": False}))  # fmt: skip
    model_type, why = stock_fit(MoELanguageModel(m).eval())
    assert model_type is None and "shared experts" in why
