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
