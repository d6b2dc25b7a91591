"""The language model and its parameter / FLOP accounting against hand counts."""

import pytest
import torch

from s2moe_ds.config import load_config
from s2moe_ds.flops import flops_per_token
from s2moe_ds.model import MoELanguageModel


def cfg_with(*overrides):
    base = [
        "model.vocab_size=50",
        "model.n_layer=2",
        "model.n_head=2",
        "model.d_model=16",
        "model.context=8",
        "model.moe.num_experts=4",
        "model.moe.d_ff=32",
    ]
    return load_config(None, base + list(overrides)).model


def test_dense_flops_hand_count():
    m = cfg_with("model.moe_layers=none", "model.d_ff=64")
    d, n, V, f = 16, 8, 50, 64
    per_layer = 8 * d * d + 4 * n * d + 4 * d * f
    assert flops_per_token(m, training=False) == 2 * per_layer + 2 * d * V
    assert flops_per_token(m, training=True) == 3 * (2 * per_layer + 2 * d * V)


def test_s2moe_flops_hand_count_train_and_inference():
    m = cfg_with(
        "model.moe.k=1",
        "model.moe.eval_k=1",
        "model.moe.s2moe.enabled=true",
        "model.moe.s2moe.num_negatives=10",
        "model.moe_layers=[1]",
        "model.d_ff=64",
    )
    d, n, V, E, f, M = 16, 8, 50, 4, 32, 10
    attn = 8 * d * d + 4 * n * d
    dense = 4 * d * 64
    router, expert = 2 * d * E, 4 * d * f
    train_moe = 2 * (router + 1 * expert) + 2 * d + 2 * M * d + 2 * d  # two pathways, gate, InfoNCE
    infer_moe = router + expert  # clean pathway, top-1
    assert flops_per_token(m, training=True) == 3 * (2 * attn + dense + train_moe + 2 * d * V)
    assert flops_per_token(m, training=False) == 2 * attn + dense + infer_moe + 2 * d * V
    both = 2 * infer_moe + 2 * d  # both pathways at inference: twice the routed work, plus the gate
    assert flops_per_token(m, training=False, pathways="both") == 2 * attn + dense + both + 2 * d * V
    # same expert FLOPs in training as SMoE top-2; half of them at inference
    top2 = cfg_with("model.moe.k=2", "model.moe_layers=[1]", "model.d_ff=64")
    assert flops_per_token(top2, training=False) - flops_per_token(m, training=False) == expert


def test_router_flops_xmoe_and_vqmoe():
    x = cfg_with("model.moe.router=xmoe", "model.moe.router_args.proj_dim=3", "model.moe.k=2")
    s = cfg_with("model.moe.k=2")
    d, E = 16, 4
    assert flops_per_token(x, False) - flops_per_token(s, False) == 2 * (2 * d * 3 + 2 * 3 * E - 2 * d * E)
    v = cfg_with("model.moe.router=vqmoe", "model.moe.k=1")
    s1 = cfg_with("model.moe.k=1")
    # VQ: codebook (d*E) + cosine gate (d*E) + mix (2d) routing, plus one extra expert slot per token
    assert flops_per_token(v, False) - flops_per_token(s1, False) == 2 * (2 * d * E + 2 * d * 2 + 4 * d * 32)


def test_param_counts_match_module_and_hand_count():
    m = MoELanguageModel(cfg_with("model.moe.k=2", "model.moe.eval_k=1"))
    counts = m.param_counts()
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    per_expert = 2 * 16 * 32
    assert counts["total"] - counts["active_per_token"] == 2 * 3 * per_expert  # 2 layers x 3 idle experts


@pytest.mark.parametrize("layers,expected", [("all", [0, 1]), ("every_other", [1]), ("none", [])])
def test_moe_layer_placement_and_forward(layers, expected):
    torch.manual_seed(0)
    m = MoELanguageModel(cfg_with(f"model.moe_layers={layers}", "model.moe.s2moe.enabled=true"))
    assert [i for i, _ in m.moe_layers()] == expected
    x = torch.randint(50, (3, 8))
    out = m(x, x)
    assert out.logits.shape == (3, 8, 50) and torch.isfinite(out.loss)
    assert bool(out.aux_losses) == bool(expected)
    (out.loss + out.aux_loss).backward()
    assert m.tok_emb.weight.grad is not None and m.head.weight is m.tok_emb.weight


def test_context_overflow_is_a_clear_error():
    m = MoELanguageModel(cfg_with())
    with pytest.raises(ValueError, match="exceeds model.context"):
        m(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "router,s2", [("smoe", True), ("smoe", False), ("xmoe", False), ("competesmoe", False), ("vqmoe", False)]
)
@pytest.mark.parametrize("mode", ["moe", "all"])
def test_activation_checkpointing_gives_the_plain_losses_and_gradients(router, s2, mode):
    """Recomputation replays S2MoE's noise and every router's choice: losses and gradients are the plain run's."""

    def run(ckpt: str):
        cfg = cfg_with(
            f"model.moe.router={router}",
            "model.moe.k=2",
            f"model.moe.s2moe.enabled={str(s2).lower()}",
            f"model.activation_checkpointing={ckpt}",
            "model.moe.router_args.compete_prob=1.0" if router == "competesmoe" else "model.moe.k=2",
        )
        torch.manual_seed(0)
        model = MoELanguageModel(cfg)
        model.train()
        x = torch.randint(0, cfg.vocab_size, (2, 8))
        torch.manual_seed(1)
        out = model(x, x)
        (out.loss + out.aux_loss).backward()
        return (
            out.loss.detach(),
            out.aux_loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )

    loss, aux, grads = run("none")
    loss_c, aux_c, grads_c = run(mode)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(aux_c, aux)
    assert grads_c.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
