"""S2MoE layer: fused dispatch, train/eval behaviour, InfoNCE, determinism, gradient flow."""

import pytest
import torch
import torch.nn.functional as F

from s2moe_ds.moe import MoEConfig, S2MoEConfig, build_moe_layer, info_nce
from s2moe_ds.moe.routers import ROUTERS


def s2_cfg(router="smoe", **s2):
    return MoEConfig(num_experts=4, k=1, eval_k=1, d_ff=32, router=router, s2moe=S2MoEConfig(enabled=True, **s2))


def test_info_nce_all_negatives_is_the_textbook_loss():
    torch.manual_seed(0)
    a, p = torch.randn(10, 8), torch.randn(10, 8)
    expected = F.cross_entropy(F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).t() / 0.1, torch.arange(10))
    torch.testing.assert_close(info_nce(a, p, 0.1, num_negatives=0), expected)


def test_info_nce_sampled_negatives_masks_the_positive():
    torch.manual_seed(0)
    a = torch.randn(50, 8)
    # identical anchor/positive: the loss must stay finite and below log(M+1) (positive is the best match)
    loss = info_nce(a, a.clone(), 0.1, num_negatives=8)
    assert torch.isfinite(loss) and loss < torch.log(torch.tensor(9.0))


@pytest.mark.parametrize("uncertainty_on", ["inputs", "outputs"])
def test_fused_single_dispatch_equals_two_separate_calls(uncertainty_on):
    """inputs: the gate-folded single dispatch; outputs: one dispatch split into the two pathways."""
    torch.manual_seed(0)
    fused = build_moe_layer(s2_cfg(uncertainty_on=uncertainty_on, uncertainty_coef=0.0), 16)
    separate = build_moe_layer(s2_cfg(uncertainty_on=uncertainty_on, uncertainty_coef=0.0), 16)
    separate.load_state_dict(fused.state_dict())
    separate.fused_dispatch = False
    x = torch.randn(2, 7, 16)
    ys, grads = [], []
    for layer in (fused, separate):
        torch.manual_seed(5)  # same noise draw
        xi = x.clone().requires_grad_()
        y = layer(xi).y
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        ys.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(ys[0], ys[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_eval_runs_clean_pathway_top1_without_noise():
    torch.manual_seed(0)
    layer = build_moe_layer(s2_cfg(), 16).eval()
    x = torch.randn(3, 5, 16)
    state = torch.get_rng_state()
    out = layer(x)
    assert torch.equal(torch.get_rng_state(), state), "evaluation must not draw noise"
    x_TD = x.reshape(-1, 16)
    route = layer.router(x_TD, 1)
    expected = layer.experts(x_TD, route.expert_ids_TK, route.weights_TK).view_as(x)
    torch.testing.assert_close(out.y, expected)
    assert out.metrics["tokens_per_expert"].sum() == 15  # one expert per token
    assert "uncertainty" not in out.aux_losses


def test_training_routes_both_pathways_and_eval_k_override():
    torch.manual_seed(0)
    layer = build_moe_layer(s2_cfg(), 16).train()
    out = layer(torch.randn(15, 16))
    assert out.metrics["tokens_per_expert"].sum() == 30  # top-1 on each of the two pathways
    assert 0 < out.metrics["gate_mean"] < 1 and "uncertainty" in out.aux_losses
    layer.set_inference(k=2)
    layer.eval()
    assert layer(torch.randn(15, 16)).metrics["tokens_per_expert"].sum() == 30


def test_both_pathways_at_inference_option_is_stochastic():
    torch.manual_seed(0)
    layer = build_moe_layer(s2_cfg(inference="both"), 16).eval()
    x = torch.randn(10, 16)
    assert not torch.allclose(layer(x).y, layer(x).y)


def test_determinism_under_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        layer = build_moe_layer(s2_cfg(noise="learnable"), 16).train()
        outs.append(layer(torch.randn(4, 16)).y)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("s2", [False, True])
def test_gradients_reach_every_learnable_parameter(router, s2):
    args = {"compete_prob": 1.0} if router == "competesmoe" else {}
    cfg = MoEConfig(
        num_experts=4,
        k=2,
        d_ff=32,
        router=router,
        router_args=args,
        s2moe=S2MoEConfig(enabled=s2, noise="learnable", uncertainty_on="inputs"),
    )
    torch.manual_seed(0)
    layer = build_moe_layer(cfg, 16).train()
    out = layer(torch.randn(64, 16))
    (out.y.pow(2).mean() + sum(out.aux_losses.values())).backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_bf16_parameters_with_fp32_noise_buffers():
    """DeepSpeed's bf16 engine converts parameters but may leave buffers in fp32."""
    layer = build_moe_layer(s2_cfg(), 16)
    for p in layer.parameters():
        p.data = p.data.bfloat16()
    out = layer.train()(torch.randn(6, 16, dtype=torch.bfloat16))
    assert out.y.dtype == torch.bfloat16


def test_info_nce_gradient_is_autograd_of_its_forward():
    """InfoNCE's hand-written backward (``_InfoNCE``) against finite differences, and against autograd
    through the plain formula at float32 training size."""
    from s2moe_ds.moe.uncertainty import _InfoNCE

    torch.manual_seed(0)
    for T, M in ((12, 5), (12, 12)):
        a = torch.randn(T, 6, dtype=torch.double, requires_grad=True)
        p = (a.detach() + 0.3 * torch.randn(T, 6, dtype=torch.double)).requires_grad_()
        idx = torch.randperm(T)[:M]
        assert torch.autograd.gradcheck(lambda a, p: _InfoNCE.apply(a, p, idx, 0.1), (a, p))
    a = torch.randn(256, 32, requires_grad=True)
    p = (a.detach() * 1.01 + 0.1 * torch.randn(256, 32)).requires_grad_()
    idx = torch.randperm(256)[:16]
    ga = torch.autograd.grad(_InfoNCE.apply(a, p, idx, 0.1), (a, p))
    inv_a, inv_p = a.norm(dim=-1).reciprocal(), p.norm(dim=-1).reciprocal()
    pos = (a * p).sum(-1) * inv_a * inv_p / 0.1
    neg = (a @ (p[idx] * (inv_p[idx] / 0.1).unsqueeze(-1)).t()) * inv_a.unsqueeze(-1)
    neg = neg.index_put((idx, torch.arange(16)), neg.new_tensor(float("-inf")))
    plain = F.cross_entropy(torch.cat([pos.unsqueeze(1), neg], 1), torch.zeros(256, dtype=torch.long))
    for g, g_ref in zip(ga, torch.autograd.grad(plain, (a, p))):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


def test_fixed_noise_skips_only_an_identity_guard():
    """With fixed sigma2 > 0 the variance guard (clamp, mask) is skipped: the same draw, bit for bit."""
    from s2moe_ds.moe.uncertainty import GaussianNoise

    noise = GaussianNoise(0.1, 0.1, 8, learnable=False)
    assert noise.floor_free
    x = torch.randn(50, 8)
    x[0] = 0.0
    torch.manual_seed(3)
    fast = noise(x)
    noise.floor_free = False
    torch.manual_seed(3)
    torch.testing.assert_close(fast, noise(x), rtol=0, atol=0)
    assert not GaussianNoise(0.1, 0.0, 8, learnable=False).floor_free


@pytest.mark.parametrize("sigma1", [0.1, 0.0])
@pytest.mark.parametrize("with_nce", [True, False])
def test_noisy_pair_is_the_noise_the_concatenation_and_info_nce(sigma1, with_nce):
    """``NoisyPair`` (the fixed-noise fast path) against its plain definition: ``GaussianNoise``'s draw,
    ``torch.cat`` and ``info_nce`` through autograd; the same rows, loss, cosine and gradients."""
    from s2moe_ds.moe.uncertainty import GaussianNoise, NoisyPair

    noise = GaussianNoise(sigma1, 0.1, 16, learnable=False)
    x = torch.randn(40, 16)
    g_xx, g_loss = torch.randn(80, 16), torch.tensor(0.7)
    results = []
    for fast in (True, False):
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)
        if fast:
            xx, loss, cos = NoisyPair.apply(
                xi, *noise.variances(xi.dtype), noise.scales_x, 8 if with_nce else None, 0.1
            )
        else:
            x_hat = noise(xi)
            xx = torch.cat([xi, x_hat])
            loss = info_nce(xi, x_hat, 0.1, 8) if with_nce else xi.new_zeros(())
            cos = F.cosine_similarity(xi, x_hat, dim=-1).mean()
        ((xx * g_xx).sum() + loss * g_loss).backward()
        results.append((xx.detach(), loss.detach(), cos.detach(), xi.grad))
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0][0][:40], results[0][0][40:])  # noise was drawn


def test_noisy_pair_gradient_matches_finite_differences():
    from s2moe_ds.moe.uncertainty import NoisyPair

    x = torch.randn(12, 5, dtype=torch.double, requires_grad=True)
    var1, var2 = torch.tensor([0.04], dtype=torch.double), torch.tensor([0.01], dtype=torch.double)

    def f(x):
        torch.manual_seed(2)  # the same noise and negatives at every evaluation
        xx, loss, _ = NoisyPair.apply(x, var1, var2, True, 6, 0.1)
        return xx, loss

    assert torch.autograd.gradcheck(f, (x,))


def test_s2moe_layer_fast_path_equals_the_step_by_step_path():
    """The default layer (``NoisyPair``) and the same layer forced through the general path give the
    same output, losses, metrics and gradients from the same seed."""
    torch.manual_seed(0)
    layer = build_moe_layer(s2_cfg(num_negatives=8), 16).train()
    x = torch.randn(30, 16)
    outs = []
    for fast in (True, False):
        layer.noise.floor_free = fast
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(4)
        out = layer(xi)
        (out.y.pow(2).sum() + sum(out.aux_losses.values())).backward()
        outs.append((out, xi.grad, [p.grad.clone() for p in layer.parameters()]))
    (fast, gx_fast, gp_fast), (plain, gx_plain, gp_plain) = outs
    torch.testing.assert_close(fast.y, plain.y, rtol=1e-5, atol=1e-6)
    assert fast.aux_losses.keys() == plain.aux_losses.keys()
    for name in fast.aux_losses:
        torch.testing.assert_close(fast.aux_losses[name], plain.aux_losses[name])
    torch.testing.assert_close(fast.metrics["noise_cos"], plain.metrics["noise_cos"])
    torch.testing.assert_close(gx_fast, gx_plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp_fast, gp_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
