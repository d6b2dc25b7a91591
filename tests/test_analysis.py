"""Collapse diagnostics: the batched Jacobian against autograd's per-token Jacobian, effective rank on
known spectra, expert-output similarity on experts made identical / independent, router vectors."""
import pytest
import torch

from s2moe_ds.analysis import (analyse, effective_rank, expert_output_similarity, jacobian_spectra,
                               mean_pairwise_cosine, router_vectors)
from s2moe_ds.config import ModelConfig
from s2moe_ds.model import DenseFFN, MoELanguageModel
from s2moe_ds.moe.layer import MoEConfig
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


def test_router_vectors_and_similarity():
    for router, shape in [("smoe", (4, 16)), ("xmoe", (4, 8)), ("stablemoe", (4, 16)), ("vqmoe", (4, 16))]:
        cfg = MoEConfig(num_experts=4, k=1, eval_k=1, router=router)
        if router == "xmoe":
            cfg.router_args = {"proj_dim": 8}
        layer = build_moe_layer(cfg, 16)
        assert tuple(router_vectors(layer.router).shape) == shape, router
    same = torch.ones(3, 5)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)


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
    assert moe["load_imbalance"] >= 1.0 and 0 <= moe["routing_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert model.training  # restored
