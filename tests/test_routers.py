"""Router math against hand-computed values, and where gradients flow."""

import math

import pytest
import torch
import torch.nn.functional as F

from s2moe_ds.moe.backends import ExpertSpec, build_backend
from s2moe_ds.moe.routers import build_router
from s2moe_ds.moe.routers.base import switch_balance_loss


def test_switch_balance_loss_hand_values():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # f = [0.5, 0.5], P = [0.55, 0.45] -> 2 * (0.275 + 0.225) = 1.0
    assert switch_balance_loss(probs, torch.tensor([[0], [1]]), 2).item() == pytest.approx(1.0)
    # f = [1, 0] -> 2 * 0.55 = 1.1
    assert switch_balance_loss(probs, torch.tensor([[0], [0]]), 2).item() == pytest.approx(1.1)


def test_smoe_weights_balance_and_z_loss_by_hand():
    r = build_router("smoe", {"balance_coef": 0.5, "z_loss_coef": 0.1}, d_model=2, num_experts=3)
    with torch.no_grad():
        r.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        r.proj.bias.zero_()
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, -1.0, 2.0]])
    out = r(x, k=2)
    assert out.expert_ids_TK.tolist() == [[2, 1], [0, 2]]
    expected_w = torch.stack([torch.tensor([3.0, 2.0]).softmax(0), torch.tensor([3.0, 2.0]).softmax(0)])
    torch.testing.assert_close(out.weights_TK, expected_w)
    probs = logits.softmax(-1)
    f = torch.tensor([1, 1, 2]) / 4.0
    balance = 3 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(out.aux_losses["balance"], 0.5 * balance)
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(out.aux_losses["z"], 0.1 * z)
    assert out.metrics["tokens_per_expert"].tolist() == [1, 1, 2]
    assert out.metrics["load_imbalance"].item() == pytest.approx(2 / (4 / 3))


def test_xmoe_scores_by_hand():
    r = build_router("xmoe", {"proj_dim": 2, "balance_coef": 0.0}, d_model=2, num_experts=2, train_k=2)
    with torch.no_grad():
        r.proj.weight.copy_(2 * torch.eye(2))
        r.embeddings.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 0.0]])
    out = r(x, k=2)
    # the projected token [2, 0] (not normalised) against unit rows [1, 0] and [1, 1]/sqrt2
    scores = torch.tensor([2.0, 2.0 / math.sqrt(2)])
    torch.testing.assert_close(out.weights_TK[0], scores.softmax(0))
    torch.testing.assert_close(out.probs_TE[0], (scores / 0.3).softmax(0))  # temperature in the balance only
    assert out.aux_losses == {}


def test_stablemoe_two_stage_needs_its_stage_boundary():
    from s2moe_ds.configtools import ConfigError

    with pytest.raises(ConfigError, match="stage2_step"):
        build_router("stablemoe", {"variant": "two_stage"}, d_model=4, num_experts=4, vocab_size=10)


def test_stablemoe_two_stage_freezes_routing_in_stage_two():
    r = build_router("stablemoe", {"variant": "two_stage", "stage2_step": 3}, d_model=4, num_experts=4, vocab_size=10)
    r.train()
    x = torch.randn(8, 4)
    r.token_ids_T = torch.randint(0, 10, (8,))
    r.set_step(2)
    out = r(x, k=1)
    sum(out.aux_losses.values()).backward()
    assert r.distill_emb.weight.grad.abs().sum() > 0 and r.embeddings.grad.abs().sum() > 0
    r.zero_grad(set_to_none=True)
    r.set_step(3)
    out = r(x, k=1)
    assert out.aux_losses == {} and out.metrics["stage2"].item() == 1
    out.weights_TK.sum().backward()  # the combine weight still trains the centroids; the distilled router not
    assert r.distill_emb.weight.grad is None and r.embeddings.grad.abs().sum() > 0


def _experts(E=4, D=8):
    torch.manual_seed(0)
    return build_backend("local", ExpertSpec(E, D, 16), impl="reference")


def test_competesmoe_competition_by_hand_and_stop_gradient():
    E, D, k = 4, 8, 2
    experts = _experts(E, D)
    r = build_router(
        "competesmoe",
        {"compete_prob": 1.0, "router_loss_coef": 0.5, "diversity_coef": 0.0, "competition_balance_coef": 0.0},
        D,
        E,
    )
    r.train()
    x = torch.randn(6, D)
    out = r(x, k, experts=experts)
    assert out.metrics["competed"].item() == 1
    all_out = experts.forward_all(x).detach()
    resp = F.softplus(all_out).mean(-1)
    top, ids = resp.topk(k, -1)
    assert torch.equal(out.expert_ids_TK, ids)
    torch.testing.assert_close(out.weights_TK, top / top.sum(-1, keepdim=True))
    expected = (out.weights_TK.unsqueeze(-1) * all_out.gather(1, ids.unsqueeze(-1).expand(-1, -1, D))).sum(1)
    torch.testing.assert_close(out.precomputed_TD, expected)
    target = resp.softmax(-1)
    torch.testing.assert_close(out.aux_losses["compete_router"], 0.5 * F.mse_loss(r.proj(x).softmax(-1), target))
    # the router loss trains the router only: the response target is stop-gradient
    out.aux_losses["compete_router"].backward()
    assert r.proj.weight.grad.abs().sum() > 0
    assert experts.w1.grad is None and experts.w2.grad is None


def _competition_draws(steps=200):
    r = build_router("competesmoe", {"compete_prob": 0.5}, 4, 4, layer_id=1, seed=7)
    r.train()
    draws = []
    for step in range(steps):
        r.set_step(step)
        draws.append(r.competes())
    return r, draws


def test_competesmoe_schedule_is_deterministic_and_off_at_inference():
    r, draws = _competition_draws()
    assert 60 < sum(draws) < 140  # about half of the 200 steps
    assert _competition_draws()[1] == draws  # a fresh router (another rank, a resumed run) agrees
    r.eval()
    assert not r.competes()


def test_competesmoe_model_schedule_warms_up_and_caps_layers():
    from s2moe_ds.config import ModelConfig
    from s2moe_ds.model import MoELanguageModel

    cfg = ModelConfig(vocab_size=16, n_layer=4, n_head=2, d_model=8, context=4)
    cfg.moe.router, cfg.moe.num_experts = "competesmoe", 4
    cfg.moe.router_args = {"compete_prob": 0.9, "warmup_fraction": 0.1, "max_compete_layers": 2}
    model = MoELanguageModel(cfg)
    model.set_total_steps(100, seed=3)
    routers = [layer.router for _, layer in model.moe_layers()]
    per_step = []
    for step in range(100):
        model.set_step(step)
        per_step.append(sum(r.competes() for r in routers))
    assert per_step[:10] == [0] * 10 and max(per_step) == 2 and sum(per_step) > 100


def test_vqmoe_losses_and_gradients_by_hand():
    D, E = 3, 2
    experts = _experts(E, D)
    r = build_router("vqmoe", {"beta_vq": 0.1, "commitment": 0.25, "balance_coef": 0.0}, D, E)
    with torch.no_grad():
        r.codebook.copy_(torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))
    x = torch.tensor([[0.5, 0.0, 0.0], [1.5, 2.0, 2.5]], requires_grad=True)
    out = r(x, k=1, experts=experts)
    # nearest codes: token0 -> code0 -> expert0, token1 -> code1 -> expert1 (the discrete branch's experts)
    assert out.extra_ids_TK[:, 0].tolist() == [0, 1]
    code = r.codebook.detach()[[0, 1]]
    mse = ((x.detach() - code) ** 2).mean()
    torch.testing.assert_close(out.aux_losses["vq"], 0.1 * 1.25 * mse)
    torch.testing.assert_close(out.weights_TK.sum(-1) + out.extra_weight_T1[:, 0], torch.ones(2))  # mix sums to 1
    out.aux_losses["vq"].backward()
    n = x.numel()
    torch.testing.assert_close(x.grad, 0.1 * 0.25 * 2 * (x.detach() - code) / n)
    torch.testing.assert_close(r.codebook.grad[[0, 1]], 0.1 * 2 * (code - x.detach()) / n)


def test_vqmoe_vq_only_routes_by_codebook():
    experts = _experts(4, 4)
    r = build_router("vqmoe", {"vq_only": True}, 4, 4)
    out = r(torch.randn(5, 4), k=2, experts=experts)
    assert out.expert_ids_TK.shape == (5, 0) and out.extra_ids_TK.shape == (5, 1) and out.extra_weight_T1 is None
    assert out.metrics["tokens_per_expert"].sum() == 5
