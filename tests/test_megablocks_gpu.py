"""MegaBlocks backend against the local dropless backend. Needs CUDA + grouped_gemm: `gpu` tests skip
cleanly elsewhere. Run on a GPU machine with: python -m pytest -q -m gpu tests/test_megablocks_gpu.py

Everything but the kernel (ragged dispatch, expert-parallel exchange, DeepSpeed ownership, gradient
scaling) is shared with backend=deepspeed ep_mode=ragged and tested on CPU in tests/test_deepspeed_ep.py
and tests/test_train_e2e.py."""

import pytest
import torch

from s2moe_ds.configtools import ConfigError
from s2moe_ds.moe.backends import ExpertSpec, build_backend
from s2moe_ds.moe.layer import MoEConfig


def test_megablocks_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*'local' or 'deepspeed'"):
        build_backend("megablocks", ExpertSpec(4, 128, 256))


def test_megablocks_capacity_mode_is_refused():
    with pytest.raises(ConfigError, match="ep_mode.*dropless \\(ragged\\) only.*backend 'deepspeed'"):
        MoEConfig(backend="megablocks", ep_mode="capacity").validate()


def _grads(backend, names):
    experts = backend.deepspeed_moe.experts.deepspeed_experts if hasattr(backend, "deepspeed_moe") else None
    if experts is None:
        return {n: getattr(backend, n).grad.float() for n in names}
    return {n: torch.stack([getattr(e, n).grad for e in experts]).float() for n in names}


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("k", [1, 2])
def test_megablocks_matches_local_forward_and_backward_bf16(activation, k):
    pytest.importorskip("grouped_gemm")
    spec = ExpertSpec(8, 256, 512, activation)
    torch.manual_seed(0)
    mb = build_backend("megablocks", spec).cuda().bfloat16()
    torch.manual_seed(0)  # experts are initialised per global id: both start from the same weights
    local = build_backend("local", spec, impl="reference").cuda().bfloat16()
    T = 1000
    x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 6, (T, k), device="cuda")  # experts 6 and 7 receive nothing
    w = torch.rand(T, k, device="cuda")
    up = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    outs, grads = [], []
    for backend in (local, mb):
        xi = x.clone().requires_grad_()
        y = backend(xi, ids, w)
        (y.float() * up.float()).sum().backward()
        outs.append(y.float())
        grads.append(xi.grad.float())
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-2)
    names = ("w1", "w2", "w3") if activation == "swiglu" else ("w1", "w2")
    g_local, g_mb = _grads(local, names), _grads(mb, names)
    for n in names:
        torch.testing.assert_close(g_mb[n], g_local[n], rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_megablocks_matches_megablocks_own_dmoe_experts_with_the_same_routing(activation):
    """MegaBlocks itself as the reference: its dMoE experts (``ParallelDroplessMLP``, grouped MLP) driven
    by the same routing decision and holding the same weights give the same output and gradients."""
    pytest.importorskip("grouped_gemm")
    pytest.importorskip("megablocks")
    import torch.nn.functional as F
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import ParallelDroplessMLP

    E, D, Fh, T, k = 8, 256, 512, 1000, 2
    spec = ExpertSpec(E, D, Fh, activation)
    torch.manual_seed(0)
    ours = build_backend("megablocks", spec).cuda().bfloat16()
    args = Arguments(
        hidden_size=D,
        ffn_hidden_size=Fh,
        moe_num_experts=E,
        moe_top_k=k,
        bias=False,
        return_bias=False,
        activation_fn=F.gelu if activation == "gelu" else F.silu,
        mlp_type="mlp" if activation == "gelu" else "glu",
        mlp_impl="grouped",
        moe_loss_weight=0.0,
        fp16=False,
        bf16=True,
        device=torch.cuda.current_device(),
    )
    theirs = ParallelDroplessMLP(args)
    experts = ours.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():  # theirs: [E*F, D] with x @ w1[e].T and h @ w2[e]; ours: x @ w1[e] ([D, F]), h @ w2[e]
        theirs.mlp.w1.copy_(torch.cat([e.w1.t() for e in experts]))
        theirs.mlp.w2.copy_(torch.cat([e.w2 for e in experts]))
        if activation == "swiglu":
            theirs.mlp.v1.copy_(torch.cat([e.w3.t() for e in experts]))
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, E - 2, (T, k), device="cuda")  # the last two experts receive nothing
    w = torch.rand(T, k, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ours(xa, ids, w)
    scores = torch.full((T, E), 1.0 / E, device="cuda", dtype=torch.bfloat16)  # unused with moe_loss_weight=0
    yb = theirs(xb.view(T, 1, D), scores, w, ids).view(T, D)
    (ya.float() * up.float()).sum().backward()
    (yb.float() * up.float()).sum().backward()
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), rtol=2e-2, atol=2e-2)
    g_theirs = theirs.mlp.w2.grad.view(E, Fh, D).float()
    torch.testing.assert_close(torch.stack([e.w2.grad for e in experts]).float(), g_theirs, rtol=3e-2, atol=3e-2)
    g_theirs = theirs.mlp.w1.grad.view(E, Fh, D).transpose(1, 2).float()
    torch.testing.assert_close(torch.stack([e.w1.grad for e in experts]).float(), g_theirs, rtol=3e-2, atol=3e-2)
