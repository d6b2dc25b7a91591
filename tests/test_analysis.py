"""Collapse diagnostics: the batched Jacobian against autograd's per-token Jacobian, effective rank on
known spectra, expert-output similarity on experts made identical / independent, router vectors."""

import pytest
import torch

from s2moe_ds.analysis import (
    analyse,
    effective_rank,
    expert_output_similarity,
    jacobian_spectra,
    mean_pairwise_cosine,
    router_vectors,
    sample_tokens,
    trained_layer_fn,
)
from s2moe_ds.config import ModelConfig
from s2moe_ds.model import DenseFFN, MoELanguageModel
from s2moe_ds.moe.layer import MoEConfig, S2MoEConfig
from s2moe_ds.moe.s2moe import build_moe_layer


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.ones(1, 16)).item() == pytest.approx(16.0, rel=1e-5)
    assert effective_rank(torch.tensor([[3.0, 0.0, 0.0, 0.0]])).item() == pytest.approx(1.0, rel=1e-5)
    assert 1.0 < effective_rank(torch.tensor([[1.0, 0.5, 0.1]])).item() < 3.0


@pytest.mark.parametrize("kind", ["dense", "smoe", "s2moe", "xmoe", "vqmoe"])
def test_batched_jacobian_matches_autograd_per_token(kind):
    torch.manual_seed(0)
    D = 16
    if kind == "dense":
        ffn = DenseFFN(D, 4 * D, 0.0)
        f = ffn
    else:
        cfg = MoEConfig(num_experts=4, k=2, eval_k=2, router="smoe" if kind == "s2moe" else kind)
        cfg.s2moe.enabled = kind == "s2moe"
        ffn = build_moe_layer(cfg, D)
        f = lambda x: ffn(x).y  # noqa: E731
    ffn.eval()
    x = torch.randn(5, D)
    s = jacobian_spectra(ffn, x)
    for t in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda v: f(v[None])[0], x[t])
        torch.testing.assert_close(s[t], torch.linalg.svdvals(J), rtol=1e-4, atol=1e-6)


def test_expert_output_similarity_detects_identical_and_distinct_experts():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, k=1, eval_k=1)
    layer = build_moe_layer(cfg, 16)
    x = torch.randn(64, 16)
    distinct = expert_output_similarity(layer, x)
    with torch.no_grad():
        for p in layer.experts.parameters():  # stacked [E, ...] weights: copy expert 0 into all
            p.copy_(p[:1].expand_as(p))
    assert expert_output_similarity(layer, x) == pytest.approx(1.0, abs=1e-5)
    assert distinct < 0.5


def test_router_vectors_live_in_the_input_space_for_every_router():
    for router in ("smoe", "xmoe", "stablemoe", "competesmoe", "vqmoe"):
        cfg = MoEConfig(num_experts=4, k=1, eval_k=1, router=router)
        layer = build_moe_layer(cfg, 16)
        assert tuple(router_vectors(layer.router).shape) == (4, 16), router
    # XMoE scores x along W_proj^T e_i / |e_i|: the vector is that direction, not the 8-dim embedding
    layer = build_moe_layer(MoEConfig(num_experts=4, k=2, router="xmoe"), 16)
    x = torch.randn(5, 16)
    scores = x @ router_vectors(layer.router).t()
    torch.testing.assert_close(
        scores, layer.router.proj(x) @ torch.nn.functional.normalize(layer.router.embeddings, dim=-1).t()
    )
    same = torch.ones(3, 5)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)


def test_routing_jacobian_is_the_term_through_the_weights():
    """For top-2 SMoE, J_routing = sum_k f_k(x) (d w_k / d x)^T: computed here from the router alone."""
    torch.manual_seed(0)
    layer = build_moe_layer(MoEConfig(num_experts=4, k=2, eval_k=2), 8).eval()
    x = torch.randn(3, 8)
    s = jacobian_spectra(trained_layer_fn(layer, routing_only=True), x)
    for t in range(3):
        ids = layer.route(x[t : t + 1], k=2).expert_ids_TK[0]
        f = torch.stack(
            [layer.experts(x[t : t + 1], torch.tensor([[int(e)]]), torch.ones(1, 1))[0] for e in ids]
        ).detach()

        def weights(v):
            return layer.router.proj(v[None])[0][ids].softmax(-1)

        J = f.t() @ torch.autograd.functional.jacobian(weights, x[t])  # [D, K] @ [K, D]
        torch.testing.assert_close(s[t], torch.linalg.svdvals(J), rtol=1e-4, atol=1e-6)
    assert (s[:, 2:] < 1e-5).all()  # rank <= K - 1 = 1 for two renormalised weights


def test_s2moe_layer_is_analysed_with_both_pathways_and_its_gate():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, k=1, eval_k=1, s2moe=S2MoEConfig(enabled=True))
    layer = build_moe_layer(cfg, 8).eval()
    x = torch.randn(6, 8)
    before = jacobian_spectra(trained_layer_fn(layer, routing_only=True), x)
    with torch.no_grad():
        layer.gate.weight.mul_(50)  # a sharper gate changes the dual-pathway layer's routing term
    after = jacobian_spectra(trained_layer_fn(layer, routing_only=True), x)
    assert not torch.allclose(before, after, rtol=1e-3)


def test_analysis_samples_random_tokens():
    picked = sample_tokens(1000, 16, seed=0)
    assert len(picked) == 16 and len(set(picked.tolist())) == 16 and picked.max() > 100
    torch.testing.assert_close(sample_tokens(1000, 16, seed=0), picked)
    assert sample_tokens(10, 16, seed=0).tolist() == list(range(10))


def test_analyse_a_small_model_reports_every_layer():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, n_layer=2, n_head=2, d_model=16, context=8, moe_layers=[1])
    cfg.moe.num_experts, cfg.moe.k, cfg.moe.eval_k = 4, 2, 2
    model = MoELanguageModel(cfg)
    layers = analyse(model, torch.randint(0, 32, (3, 8)), jacobian_tokens=10)
    assert [la["kind"] for la in layers] == ["dense", "moe"]
    assert layers[0]["expert_output_similarity"] is None
    moe = layers[1]
    assert sum(moe["tokens_per_expert"]) == 3 * 8 * 2
    assert 0 < moe["jacobian_effective_rank"] <= 16 and len(moe["jacobian_spectrum"]) == 16
    assert 0 < moe["routing_jacobian_effective_rank"] < moe["jacobian_effective_rank"]
    assert moe["load_imbalance"] >= 1.0 and 0 <= moe["routing_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert model.training  # restored
