"""Every local dropless implementation equals the reference, forward and backward, no token dropped."""

import pytest
import torch

from s2moe_ds.configtools import ConfigError
from s2moe_ds.moe.backends import ExpertSpec, build_backend
from s2moe_ds.moe.backends.config import IMPLS

FAST = [i for i in IMPLS if i not in ("reference", "auto")]


def uneven_routing(T=40, K=2, E=6):
    """Expert 0 gets most slots, experts 3 and 5 get none, the rest a few."""
    g = torch.Generator().manual_seed(1)
    choices = torch.tensor([0, 0, 0, 0, 1, 2, 4])
    ids = choices[torch.randint(len(choices), (T, K), generator=g)]
    weights = torch.rand(T, K, generator=g)
    return ids, weights


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("impl", FAST)
def test_fast_impl_matches_reference_forward_and_backward(impl, activation):
    E, D, Fh = 6, 16, 32
    torch.manual_seed(0)
    ref = build_backend("local", ExpertSpec(E, D, Fh, activation), impl="reference")
    fast = build_backend("local", ExpertSpec(E, D, Fh, activation), impl=impl)
    fast.load_state_dict(ref.state_dict())
    ids, w = uneven_routing(E=E)
    assert set(ids.unique().tolist()) == {0, 1, 2, 4}
    outs, grads = [], []
    for backend in (ref, fast):
        x = torch.randn(40, D, generator=torch.Generator().manual_seed(2)).requires_grad_()
        wt = w.clone().requires_grad_()
        y = backend(x, ids, wt)
        # a non-uniform upstream gradient (not y.sum(), whose stride-0 gradient grouped_mm rejects)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad, wt.grad] + [p.grad for p in backend.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_fast, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    # experts with no tokens get zero gradient, not garbage
    assert grads[1][2][3].abs().sum() == 0 and grads[1][2][5].abs().sum() == 0


@pytest.mark.parametrize("impl", FAST)
def test_no_token_dropped_under_extreme_imbalance(impl):
    """All 64 tokens on one expert (capacity-based MoE would drop most): every output is computed."""
    torch.manual_seed(0)
    backend = build_backend("local", ExpertSpec(4, 16, 32), impl=impl)
    x = torch.randn(64, 16)
    ids = torch.zeros(64, 1, dtype=torch.long)
    y = backend(x, ids, torch.ones(64, 1))
    torch.testing.assert_close(y, backend.expert(x, 0), rtol=1e-5, atol=1e-5)
    assert (y.abs().sum(-1) > 0).all()


def test_forward_all_matches_each_expert():
    torch.manual_seed(0)
    backend = build_backend("local", ExpertSpec(3, 8, 16, "swiglu"), impl="loop")
    x = torch.randn(5, 8)
    out = backend.forward_all(x)
    for e in range(3):
        torch.testing.assert_close(out[:, e], backend.expert(x, e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS[1:])
def test_num_out_folds_pathways_into_one_output(impl):
    """S2MoE's combine: rows t and t + T of a 2T-row dispatch land in row t."""
    torch.manual_seed(0)
    backend = build_backend("local", ExpertSpec(4, 16, 32), impl=impl)
    x = torch.randn(20, 16)
    ids, w = torch.randint(4, (20, 1)), torch.rand(20, 1)
    full = backend(x, ids, w)
    torch.testing.assert_close(backend(x, ids, w, num_out=10), full[:10] + full[10:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("k", [1, 2])
def test_inference_loop_matches_reference(activation, k):
    """The no-grad fast path (preallocated buffers, in-place ops) equals the reference."""
    torch.manual_seed(0)
    ref = build_backend("local", ExpertSpec(6, 16, 32, activation), impl="reference")
    fast = build_backend("local", ExpertSpec(6, 16, 32, activation), impl="loop")
    fast.load_state_dict(ref.state_dict())
    ids, w = uneven_routing(K=k)
    x = torch.randn(40, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, ids, w), ref(x, ids, w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x, ids, w, num_out=20), ref(x, ids, w, num_out=20), rtol=1e-5, atol=1e-5)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_mm_on_cuda_matches_the_fp32_reference(activation, dtype):
    """`backend_impl=auto` on CUDA is torch._grouped_mm (bf16: torch's CUTLASS kernel on sm90; fp32, which
    evaluation uses: its fallback). Against the reference in fp32, forward and backward, uneven loads and
    two empty experts; errors relative to each tensor's norm (bf16 has ~3 significant digits)."""
    E, D, Fh, T, K = 8, 256, 512, 1000, 2
    torch.manual_seed(0)
    ref = build_backend("local", ExpertSpec(E, D, Fh, activation), impl="reference").cuda()
    fast = build_backend("local", ExpertSpec(E, D, Fh, activation), impl="auto").cuda()
    fast.load_state_dict(ref.state_dict())
    fast.to(dtype)
    assert fast.resolved_kernel(torch.device("cuda")) == "grouped_mm"
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, D, device="cuda", generator=g)
    ids = torch.randint(0, E - 2, (T, K), device="cuda", generator=g)  # experts 6 and 7 receive nothing
    w = torch.rand(T, K, device="cuda", generator=g)
    up = torch.randn(T, D, device="cuda", generator=g)
    results = []
    for backend, dt in ((ref, torch.float32), (fast, dtype)):
        xi = x.detach().to(dt).requires_grad_()
        y = backend(xi, ids, w)
        assert y.dtype == dt
        (y.float() * up).sum().backward()
        results.append((y, xi.grad, {n: p.grad for n, p in backend.named_parameters()}))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    (y_ref, gx_ref, gp_ref), (y, gx, gp) = results
    assert _rel_err(y, y_ref) < tol
    assert _rel_err(gx, gx_ref) < tol
    for name, g_ref in gp_ref.items():
        assert _rel_err(gp[name][: E - 2], g_ref[: E - 2]) < tol, name
        assert gp[name][E - 2 :].abs().sum() == 0, f"{name}: an expert that received nothing got a gradient"


def test_a_misspelt_backend_option_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        build_backend("local", ExpertSpec(4, 16, 32), imp="reference")
    assert "'moe.imp'" in str(e.value) and "did you mean 'impl'" in str(e.value)
    assert "valid keys: impl, ep_size, ep_mode, capacity_factor, min_capacity" in str(e.value)
    with pytest.raises(ConfigError, match="'moe.backend_impl': got 'fastest'"):
        build_backend("local", ExpertSpec(4, 16, 32), impl="fastest")


def test_backends_name_their_experts_the_same_global_way():
    """``local`` (stacked ``[E, ...]``) and ``deepspeed`` (one module per expert) expose the same per-expert
    global names, and a state moved through them lands on the same expert (s2moe_ds/moe/global_names.py)."""
    spec = ExpertSpec(4, 8, 16, "swiglu")
    torch.manual_seed(0)
    local = build_backend("local", spec, impl="loop")
    torch.manual_seed(1)
    ds = build_backend("deepspeed", spec, ep_size=1)
    names = {f"{w}#{e}" for w in ("w1", "w2", "w3") for e in range(4)}
    assert set(local.global_state_dict()) == set(ds.global_state_dict()) == names
    ds.load_global_state_dict(local.global_state_dict())
    for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
        for w in ("w1", "w2", "w3"):
            torch.testing.assert_close(getattr(expert, w), getattr(local, w)[e], rtol=0, atol=0)
    back = build_backend("local", spec, impl="loop")
    back.load_global_state_dict(ds.global_state_dict())
    for w in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(back, w), getattr(local, w), rtol=0, atol=0)
