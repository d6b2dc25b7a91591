"""MegaBlocks backend against the local dropless backend. Needs CUDA + MegaBlocks: `gpu` tests skip
cleanly elsewhere. Run on a GPU machine with: python -m pytest -q -m gpu tests/test_megablocks_gpu.py"""
import pytest
import torch

from s2moe_ds.configtools import ConfigError
from s2moe_ds.moe.backends import ExpertSpec, build_backend


def test_megablocks_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*'local' or 'deepspeed'"):
        build_backend("megablocks", ExpertSpec(4, 128, 256))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("k", [1, 2])
def test_megablocks_matches_local_forward_and_backward_bf16(activation, k):
    pytest.importorskip("megablocks")
    torch.manual_seed(0)
    spec = ExpertSpec(8, 256, 512, activation)
    mb = build_backend("megablocks", spec).cuda().bfloat16()
    local = build_backend("local", spec, impl="reference").cuda().bfloat16()
    with torch.no_grad():
        for name, value in mb.to_local_layout().items():
            getattr(local, name).copy_(value)
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
    g_local = {n: getattr(local, n).grad.float() for n in mb.to_local_layout()}
    mb_grads = {n: v.float() for n, v in _grad_local_layout(mb).items()}
    for n in g_local:
        torch.testing.assert_close(mb_grads[n], g_local[n], rtol=3e-2, atol=3e-2)


def _grad_local_layout(mb):
    E, Fh, D = mb.spec.num_experts, mb.spec.d_ff, mb.spec.d_model
    mlp = mb.dmlp.mlp
    out = {"w1": mlp.w1.grad.view(E, Fh, D).transpose(1, 2), "w2": mlp.w2.grad.view(E, Fh, D)}
    if hasattr(mlp, "v1"):
        out["w3"] = mlp.v1.grad.view(E, Fh, D).transpose(1, 2)
    return out
