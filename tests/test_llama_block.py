"""The llama-style block (``model.arch: llama``, issue 26 §1): what the GPT-2 block does, it does too:
generation with the KV cache, activation checkpointing, every router with and without S2MoE, FLOP
accounting; and on two processes, experts sharded over them train as data parallelism does and a
killed run resumes with the very losses of an uninterrupted one."""

import pytest
import torch
from e2e import assert_ok, cli, deepspeed_train, train_losses

from s2moe_ds.config import ModelConfig
from s2moe_ds.flops import flops_per_token
from s2moe_ds.model import MoELanguageModel

ROUTERS = [("smoe", {"bias": False}), ("xmoe", {}), ("stablemoe", {}), ("competesmoe", {}), ("vqmoe", {})]


def llama(**kw) -> ModelConfig:
    cfg = ModelConfig(vocab_size=40, arch="llama", n_layer=2, n_head=4, n_kv_head=2, qk_norm=True, d_model=32,
                      context=24, tie_embeddings=False)  # fmt: skip
    cfg.moe.activation, cfg.moe.num_experts, cfg.moe.k = "swiglu", 4, 1
    for key, value in kw.items():
        obj = cfg
        *path, last = key.split("__")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    cfg.validate()
    return cfg


def test_generation_with_the_kv_cache_equals_the_full_forward():
    torch.manual_seed(0)
    model = MoELanguageModel(llama(moe__s2moe__enabled=True)).eval()
    x = torch.randint(0, 40, (2, 18))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        steps = [model(x[:, :6], cache=cache).logits] + [
            model(x[:, t : t + 1], cache=cache).logits for t in range(6, 18)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    with torch.no_grad():
        cached = model.generate(x[:, :4], 12, greedy=True)
        uncached = model.generate(x[:, :4], 12, greedy=True, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mode", ["moe", "all"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode):
    x = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = {}
    for ckpt in ("none", mode):
        torch.manual_seed(0)
        model = MoELanguageModel(llama(moe__s2moe__enabled=True, activation_checkpointing=ckpt)).train()
        torch.manual_seed(5)  # the same noise draws
        out = model(x[:, :-1], x[:, 1:])
        (out.loss + out.aux_loss).backward()
        grads[ckpt] = (out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_a, ga), (loss_b, gb) = grads["none"], grads[mode]
    assert loss_a == loss_b and ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router,args", ROUTERS, ids=[r for r, _ in ROUTERS])
@pytest.mark.parametrize("s2moe", [False, True], ids=["plain", "s2moe"])
def test_every_router_trains_on_the_llama_block(router, args, s2moe):
    torch.manual_seed(0)
    cfg = llama(moe__router=router, moe__router_args=dict(args), moe__s2moe__enabled=s2moe, moe__k=2)
    model = MoELanguageModel(cfg).train()
    model.set_total_steps(10, seed=0)
    x = torch.randint(0, 40, (2, 24))
    out = model(x[:, :-1], x[:, 1:])
    (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    assert model.blocks[0].attn.q.weight.grad.abs().sum() > 0  # the attention learns through every router


def test_flops_count_grouped_query_attention_and_the_swiglu_ffn():
    cfg = llama(moe_layers="none", d_ff=64)
    d, n, dkv, f, V = 32, 24, 2 * 8, 64, 40
    per_layer = 4 * d * d + 4 * d * dkv + 4 * n * d + 6 * d * f
    assert flops_per_token(cfg, training=False) == 2 * per_layer + 2 * d * V
    counted = sum(p.numel() for n_, p in MoELanguageModel(cfg).named_parameters() if n_.startswith("blocks.0.attn"))
    assert counted == 2 * d * d + 2 * d * dkv + 2 * 8  # q, o, k, v and the two QK-norm weights


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "pydoc"
    assert_ok(cli("prepare", "--config", "configs/tiny_llama.yaml", f"data.data_dir={d}"))
    return d


@pytest.mark.slow
def test_expert_parallel_llama_trains_as_data_parallel_and_resumes_exactly(tmp_path, data_dir):
    """With a shared expert too: replicated on both ranks beside the sharded routed experts."""
    args = [f"data.data_dir={data_dir}", "train.steps=6", "train.save_interval=3", "train.eval_interval=3",
            "train.log_interval=1", "train.eval_iters=1", "train.progress=false",
            "model.moe.num_shared_experts=1"]  # fmt: skip
    ep = ["model.moe.backend=deepspeed", "model.moe.ep_size=2"]
    cfg = "configs/tiny_llama.yaml"
    assert_ok(deepspeed_train(2, args + [f"train.out_dir={tmp_path / 'dp'}"], config=cfg))
    assert_ok(deepspeed_train(2, args + ep + [f"train.out_dir={tmp_path / 'ep2'}"], config=cfg))
    dp, full = train_losses(tmp_path / "dp"), train_losses(tmp_path / "ep2")
    assert sorted(full) == list(range(1, 7))
    for step in dp:  # the same losses within float tolerance (the summation order differs)
        assert full[step] == pytest.approx(dp[step], rel=1e-4, abs=1e-5), (step, dp[step], full[step])
    out = tmp_path / "resumed"
    assert_ok(deepspeed_train(2, args + ep + [f"train.out_dir={out}", "train.stop_at_step=3"], config=cfg))
    assert_ok(deepspeed_train(2, args + ep + [f"train.out_dir={out}", "train.resume=auto"], config=cfg))
    resumed = train_losses(out)
    assert [resumed[s] for s in range(4, 7)] == [full[s] for s in range(4, 7)]
