"""Each router against a transcription of its released code's formulas, on fixed inputs and weights.

The ``ref_*`` functions below restate, formula by formula, what the cited file computes (written for
these tests from reading the code, in plain torch; line numbers as of the commit named). Every
remaining difference between our router and the released code is listed in the router's docstring; where
one shows up in a number here (e.g. the balance-loss normalisation) the test states it.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from s2moe_ds.moe.backends import ExpertSpec, build_backend
from s2moe_ds.moe.layer import MoEConfig, MoELayer
from s2moe_ds.moe.routers import build_router
from s2moe_ds.moe.routers.competesmoe import CompetitionSchedule, capped_schedule

E, D = 4, 8


def _sorted(ids_TK, w_TK):
    """Compare routings whatever the slot order (the authors' top-k is unsorted)."""
    order = ids_TK.argsort(-1)
    return ids_TK.gather(-1, order), w_TK.gather(-1, order)


def _assert_same_routing(ours, ids, weights):
    a_ids, a_w = _sorted(ours.expert_ids_TK, ours.weights_TK)
    b_ids, b_w = _sorted(ids, weights)
    assert torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_w.float(), b_w.float(), rtol=1e-5, atol=1e-6)


# --- giangdip2410/VQMoE @ b76ad7e, custom_gate.py (the same gates: giangdip2410/CompeteSMoE custom_gates.py) ---


def ref_fastmoe_balance(scores_TE, idx_TK, temperature):
    """``set_load_balance`` (custom_gate.py L27-43): p = softmax(scores / T); f and P both over N*k slots."""
    N, k = idx_TK.shape
    p = (scores_TE / temperature).softmax(-1)
    f = torch.zeros(scores_TE.shape[1]).scatter_add_(0, idx_TK.reshape(-1), torch.ones(N * k)) / (N * k)
    P = p.sum(0) / (N * k)
    return scores_TE.shape[1] * (f * P).sum()


def ref_smoe_gate(x, W, b, k):
    """CustomNaiveGate_Balance_SMoE.forward (L45-71): logits of ``nn.Linear(d, E)`` (with its bias), top-k,
    softmax over the selected."""
    z = x @ W.t() + b
    vals, idx = torch.topk(z, k, dim=-1, largest=True, sorted=False)
    return idx, vals.softmax(-1), ref_fastmoe_balance(z, idx, 1.0)


def ref_xmoe_gate(x, W_red, emb, k):
    """CustomNaiveGate_Balance_XMoE.forward (L111-145): reduce to 8 dims (not normalised), rescale the
    expert embeddings in place to norm 1.5, score against their unit rows, top-k, softmax over the selected;
    the balance loss at temperature 0.3."""
    r = x @ W_red.t()
    with torch.no_grad():
        emb.mul_(1.5 / emb.norm(p=2.0, dim=1, keepdim=True))
    z = (r.float() @ F.normalize(emb.float(), p=2.0, dim=1, eps=1e-4).t()).type_as(r)
    vals, idx = torch.topk(z, k, dim=-1, largest=True, sorted=False)
    return idx, vals.softmax(-1), ref_fastmoe_balance(z, idx, 0.3)


def ref_stablemoe_gate(x, emb, k):
    """CustomNaiveGate_Balance_StableMoE.forward (L198-226): the raw token against unit expert rows."""
    z = (x.float() @ F.normalize(emb.float(), p=2.0, dim=1, eps=1e-4).t()).type_as(x)
    vals, idx = torch.topk(z, k, dim=-1, largest=True, sorted=False)
    return idx, vals.softmax(-1), ref_fastmoe_balance(z, idx, 0.3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smoe_matches_the_authors_gate(k):
    torch.manual_seed(0)
    r = build_router("smoe", {"balance_coef": 1.0, "weights": "renorm"}, D, E)
    x = torch.randn(16, D)
    out = r(x, k)
    idx, w, bal = ref_smoe_gate(x, r.proj.weight.detach(), r.proj.bias.detach(), k)
    _assert_same_routing(out, idx, w)
    # remaining difference (docstring): their P is divided by N*k, ours by N
    torch.testing.assert_close(out.aux_losses["balance"], k * bal)


def test_smoe_default_weights_at_top2_are_the_authors():
    torch.manual_seed(1)
    r = build_router("smoe", {}, D, E, train_k=2)
    x = torch.randn(16, D)
    idx, w, _ = ref_smoe_gate(x, r.proj.weight.detach(), r.proj.bias.detach(), 2)
    _assert_same_routing(r(x, 2), idx, w)


@pytest.mark.parametrize("k", [1, 2])
def test_xmoe_matches_the_authors_gate_and_gradients(k):
    torch.manual_seed(0)
    r = build_router("xmoe", {"balance_coef": 1.0, "weights": "renorm"}, D, E)
    r.train()
    assert r.proj.weight.shape == (8, D) and r.proj.bias is None and r.embeddings.shape == (E, 8)
    with torch.no_grad():
        r.embeddings.mul_(torch.tensor([[0.3], [2.0], [1.0], [0.7]]))  # off norm 1.5: the forward restores it
    W_red = r.proj.weight.detach().clone().requires_grad_(True)
    emb = r.embeddings.detach().clone().requires_grad_(True)
    x = torch.randn(16, D)
    out = r(x, k)
    torch.testing.assert_close(r.embeddings.norm(dim=-1), torch.full((E,), 1.5))
    idx, w, bal = ref_xmoe_gate(x, W_red, emb, k)
    _assert_same_routing(out, idx, w)
    torch.testing.assert_close(out.aux_losses["balance"], k * bal)
    # the same gradients reach the reduction and the embeddings (at norm 1.5) from a loss on the weights
    probe = torch.randn(E)
    (probe[out.expert_ids_TK] * out.weights_TK).sum().add(out.aux_losses["balance"]).backward()
    (probe[idx] * w).sum().add(k * bal).backward()
    torch.testing.assert_close(r.proj.weight.grad, W_red.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r.embeddings.grad, emb.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_stablemoe_matches_the_authors_gate(k):
    torch.manual_seed(0)
    r = build_router("stablemoe", {"balance_coef": 1.0, "weights": "renorm"}, D, E)
    assert r.embeddings.shape == (E, D)
    torch.testing.assert_close(r.embeddings.norm(dim=-1), torch.full((E,), 0.32))  # orthogonal, gain 0.32
    x = torch.randn(16, D) * 3
    out = r(x, k)
    idx, w, bal = ref_stablemoe_gate(x, r.embeddings.detach(), k)
    _assert_same_routing(out, idx, w)
    torch.testing.assert_close(out.aux_losses["balance"], k * bal)


# --- microsoft/torchscale @ 4d1e0e8, torchscale/component/xmoe/routing.py (X-MoE's release) ---


def ref_torchscale_top2(logits, keep_rand=None):
    """top2gating (L258-445) with use_xmoe's forced settings, no capacity: softmax, argmax and the true
    second, the pair normalised before dropping; policy 'random' keeps the second where 2 g2 > U(0,1)."""
    gates = logits.float().softmax(1)
    i1 = gates.argmax(1)
    i2 = logits.masked_fill(F.one_hot(i1, logits.shape[1]).bool(), float("-inf")).argmax(1)
    g1, g2 = gates.gather(1, i1[:, None])[:, 0], gates.gather(1, i2[:, None])[:, 0]
    den = (g1 + g2).clamp(min=torch.finfo(g1.dtype).eps)
    g1, g2 = g1 / den, g2 / den
    if keep_rand is not None:
        g2 = g2 * (2 * g2 > keep_rand)
    me = gates.mean(0)
    ce = F.one_hot(i1, logits.shape[1]).float().mean(0)
    l_aux = (me * ce).mean() * logits.shape[1] ** 2
    return torch.stack([i1, i2], 1), torch.stack([g1, g2], 1), l_aux


def ref_torchscale_top1(logits):
    """top1gating (L36-137), no capacity: the raw softmax probability of the argmax."""
    gates = logits.float().softmax(1)
    i1 = gates.argmax(1)
    l_aux = (gates.mean(0) * F.one_hot(i1, logits.shape[1]).float().mean(0)).mean() * logits.shape[1] ** 2
    return i1[:, None], gates.gather(1, i1[:, None]), l_aux


def _torchscale_logits(r, x):
    return (x @ r.proj.weight.detach().t()) @ F.normalize(r.embeddings.detach(), dim=1, eps=1e-4).t()


def test_xmoe_torchscale_variant_matches_xmoe_release():
    torch.manual_seed(0)
    x = torch.randn(32, D)
    r = build_router("xmoe", {"variant": "torchscale", "balance_coef": 1.0, "second_expert_policy": "all"}, D, E)
    assert r.proj.weight.shape == (16, D)
    r.train()
    out = r(x, 2)
    idx, w, l_aux = ref_torchscale_top2(_torchscale_logits(r, x))
    _assert_same_routing(out, idx, w)
    torch.testing.assert_close(out.aux_losses["balance"], l_aux)
    out1 = r(x, 1)
    idx, w, l_aux = ref_torchscale_top1(_torchscale_logits(r, x))
    _assert_same_routing(out1, idx, w)
    torch.testing.assert_close(out1.aux_losses["balance"], l_aux)
    # policy 'random': the same uniform draws drop the same second experts
    r = build_router("xmoe", {"variant": "torchscale", "balance_coef": 1.0}, D, E)
    r.train()
    torch.manual_seed(5)
    out = r(x, 2)
    torch.manual_seed(5)
    u = torch.rand(32)
    idx, w, _ = ref_torchscale_top2(_torchscale_logits(r, x), keep_rand=u)
    assert torch.equal(out.expert_ids_TK, idx)
    torch.testing.assert_close(out.weights_TK, w)
    assert 0 < (w[:, 1] == 0).sum() < 32  # some second experts dropped, not all


# --- Hunter-DDM/stablemoe @ 73ea6ef, fairseq/modules/moe_layer.py (BaseLayer) ---


def ref_stablemoe_two_stage(x, token_ids, C, emb50, D50, stage2, training=True):
    """BaseLayer.forward with GA assignment, one device, no overflow: greedy top-1 on x C^T (no grad) in
    stage 1, on the distilled router emb50(ids) D50^T in stage 2 and at inference; alpha = sigmoid(x . C_e);
    balance sum_e (n_e - T/N)/(T/N) sum_{t->e} sigmoid(s_te); distillation CE summed over tokens; both
    divided by the token count as xentropy_with_aux_loss does."""
    T, N = x.shape[0], C.shape[0]
    with torch.no_grad():
        s = x @ C.t()
        distilled = emb50[token_ids] @ D50.t()
        a = (distilled if (stage2 or not training) else s).argmax(-1)
    alpha = torch.sigmoid((x * C[a]).sum(-1))
    losses = {}
    if training and not stage2:
        tpe = T / N
        bal = 0.0
        for e in range(N):
            sel = a == e
            bal = bal + (int(sel.sum()) - tpe) / tpe * torch.sigmoid(x[sel] @ C[e]).sum()
        losses["balance"] = bal / T
        losses["distill"] = F.cross_entropy(emb50[token_ids] @ D50.t(), s.argmax(-1), reduction="sum") / T
    return a[:, None], alpha[:, None], losses


@pytest.mark.parametrize("stage2", [False, True])
def test_stablemoe_two_stage_matches_the_release(stage2):
    torch.manual_seed(0)
    V, T = 11, 24
    r = build_router(
        "stablemoe",
        {"variant": "two_stage", "stage2_step": 5, "stage1_balance_coef": 1.0, "distill_coef": 1.0},
        D,
        E,
        vocab_size=V,
    )
    r.train()
    r.set_step(7 if stage2 else 2)
    ids = torch.randint(0, V, (T,))
    r.token_ids_T = ids
    x = torch.randn(T, D) * 4
    out = r(x, 1)
    a, alpha, losses = ref_stablemoe_two_stage(
        x, ids, r.embeddings.detach(), r.distill_emb.weight.detach(), r.distill_centroids.detach(), stage2
    )
    assert torch.equal(out.expert_ids_TK, a)
    torch.testing.assert_close(out.weights_TK, alpha)
    assert set(out.aux_losses) == set(losses)
    for name in losses:
        torch.testing.assert_close(out.aux_losses[name], losses[name])
    r.eval()  # inference routes by the distilled router even in stage 1
    a_eval, _, _ = ref_stablemoe_two_stage(
        x,
        ids,
        r.embeddings.detach(),
        r.distill_emb.weight.detach(),
        r.distill_centroids.detach(),
        False,
        training=False,
    )
    assert torch.equal(r(x, 1).expert_ids_TK, a_eval)


# --- Fsoft-AIC/CompeteSMoE @ 0be1cb7, moe_model/model/moe/competesmoe.py + moe.py (2025) ---


def ref_balance_top1(P, sel):
    """moe.py ``balanceloss`` (L105-108), one sequence: mean_e(f * mean P) * E^2 on the first column."""
    f = F.one_hot(sel[:, 0], P.shape[1]).float().mean(0)
    return (f * P.mean(0)).mean() * P.shape[1] ** 2


def ref_compete_2025(logits, outs_TED, k):
    """Competition step (competesmoe.py L219-259, L337-386): mean softplus response, winners by response,
    weights normalised responses; router MSE to the detached softmax of the responses; diversity
    sum_{i!=j} cos / k^2; balance on the top-1 winner with the responses' softmax."""
    a = F.softplus(outs_TED).mean(-1)
    aff = a.float().softmax(-1)
    w, sel = a.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    win = outs_TED.gather(1, sel[..., None].expand(-1, -1, outs_TED.shape[-1]))
    y = (w[..., None] * win).sum(1)
    u = F.normalize(win.float(), dim=-1)
    C = u @ u.transpose(1, 2)
    C = C * (1 - torch.eye(k))
    div = C.mean() * 1.0  # mean over tokens x k x k entries, the zeroed diagonal included
    router = F.mse_loss(logits.float().softmax(-1), aff.detach())
    return sel, w, y, {"compete_router": router, "diversity": div, "balance": ref_balance_top1(aff, sel)}


def test_competesmoe_2025_competition_matches_the_release():
    torch.manual_seed(0)
    experts = build_backend("local", ExpertSpec(E, D, 16), impl="reference")
    r = build_router(
        "competesmoe",
        {
            "compete_prob": 1.0,
            "warmup_fraction": 0.0,
            "router_loss_coef": 1.0,
            "diversity_coef": 1.0,
            "competition_balance_coef": 1.0,
        },
        D,
        E,
    )
    r.train()
    x = torch.randn(12, D)
    out = r(x, 2, experts=experts)
    assert out.metrics["competed"].item() == 1
    sel, w, y, losses = ref_compete_2025(r.proj(x).detach(), experts.forward_all(x).detach(), 2)
    assert torch.equal(out.expert_ids_TK, sel)
    torch.testing.assert_close(out.weights_TK, w)
    torch.testing.assert_close(out.precomputed_TD, y)
    assert set(out.aux_losses) == set(losses)
    for name in losses:
        torch.testing.assert_close(out.aux_losses[name], losses[name])
    # only the router loss's target is detached: the diversity loss trains the experts
    out.aux_losses["diversity"].backward()
    assert experts.w1.grad.abs().sum() > 0


def test_competesmoe_2025_ordinary_step_matches_the_release():
    torch.manual_seed(0)
    r = build_router("competesmoe", {"compete_prob": 0.0, "balance_coef": 1.0, "z_loss_coef": 1.0}, D, E, train_k=2)
    assert r.proj.bias is None
    r.train()
    x = torch.randn(12, D)
    out = r(x, 2)
    z = r.proj(x).detach()
    p = z.float().softmax(-1)
    w, sel = p.topk(2, -1)
    _assert_same_routing(out, sel, w / w.sum(-1, keepdim=True))
    torch.testing.assert_close(out.aux_losses["balance"], ref_balance_top1(p, sel))
    torch.testing.assert_close(out.aux_losses["z"], torch.logsumexp(z, -1).pow(2).mean())


def ref_flip_schedule(hits, cap):
    """The 2025 schedule builder (competesmoe.py L105-130), restated with its cumulative counts: layer by
    layer, a hit at i is marked if fewer than ``cap`` layers hold i, else moved to the nearest free step
    searching left first, then right."""
    L, n = hits.shape
    cum = torch.zeros(n, dtype=torch.long)
    flips = torch.zeros(L, n, dtype=torch.bool)
    for layer in range(L):
        for i in range(n):
            if not hits[layer, i]:
                continue
            target = None
            if cum[i] < cap:
                target = i
            else:
                for j in range(i - 1, -1, -1):
                    if cum[j] < cap and not flips[layer, j]:
                        target = j
                        break
                if target is None:
                    for j in range(i + 1, n):
                        if cum[j] < cap and not flips[layer, j]:
                            target = j
                            break
            if target is not None and not flips[layer, target]:
                flips[layer, target] = True
                cum[target] += 1
    return flips


def test_competition_schedule_caps_layers_per_step_as_the_release():
    g = torch.Generator().manual_seed(3)
    hits = torch.rand(6, 40, generator=g) < 0.6
    ours = torch.tensor([list(m) for m in capped_schedule(hits, 3)], dtype=torch.bool)
    assert torch.equal(ours, ref_flip_schedule(hits, 3))
    assert ours.sum(0).max() <= 3 and ours.sum() > 0
    s = CompetitionSchedule(seed=1, num_layers=4, total_steps=2000, prob=0.05, warmup_fraction=0.05, cap=3)
    assert s.warmup == 100 and not any(s.competes(layer, step) for layer in range(4) for step in range(100))
    rate = sum(s.competes(0, step) for step in range(100, 2000)) / 1900
    assert 0.03 < rate < 0.07


# --- giangdip2410/CompeteSMoE @ cacb77e, custom_layers_opt.py (FMoEOpt, 2024) ---


def ref_compete_2024(logits, outs_TED, k, opt_blance=True):
    """Competition (L262-404, act_experts 'linear'): L2-norm responses; winners weighted by the softmax of
    their norms; target = that softmax at the winners, 0 elsewhere (not detached); MSE to softmax(logits),
    plus with ``opt_blance`` E * sum f P with f, P over T*k on softmax(norms)."""
    r = outs_TED.norm(dim=-1)
    val, idx = r.topk(k, -1)
    s = torch.full_like(r, -1e10).scatter(-1, idx, val)
    P_opt = s.softmax(-1)
    mse = F.mse_loss(logits.softmax(-1), P_opt)
    T = r.shape[0]
    f = torch.zeros(r.shape[1]).scatter_add_(0, idx.reshape(-1), torch.ones(T * k)) / (T * k)
    P = r.softmax(-1).sum(0) / (T * k)
    return idx, val.softmax(-1), mse + (r.shape[1] * (f * P).sum() if opt_blance else 0.0)


@pytest.mark.parametrize("opt_blance", [False, True])
def test_competesmoe_2024_competition_matches_the_release(opt_blance):
    """Their text8/enwik8 scripts run without --opt_blance (our v2024 default: no competition balance);
    competition_balance_coef = router_loss_coef reproduces the flag."""
    torch.manual_seed(0)
    experts = build_backend("local", ExpertSpec(E, D, 16), impl="reference")
    args = {"variant": "v2024", "compete_prob": 1.0, "router_loss_coef": 1.0}
    if opt_blance:
        args["competition_balance_coef"] = 1.0
    r = build_router("competesmoe", args, D, E)
    assert r.proj.bias is not None
    r.train()
    x = torch.randn(12, D)
    out = r(x, 2, experts=experts)
    idx, w, loss = ref_compete_2024(r.proj(x).detach(), experts.forward_all(x).detach(), 2, opt_blance)
    assert torch.equal(out.expert_ids_TK, idx)
    torch.testing.assert_close(out.weights_TK, w)
    assert ("balance" in out.aux_losses) == opt_blance
    total = sum(out.aux_losses.values())
    torch.testing.assert_close(total, loss)
    total.backward()  # the target is not detached: the experts learn from it
    assert experts.w1.grad.abs().sum() > 0


# --- giangdip2410/VQMoE @ b76ad7e, vqmoe.py (VQMoE.forward L347-373, VectorQuantizer L215-261) ---


def ref_vqmoe_layer(x, codebook, emb, mix_W, mix_b, ln, expert_fn, k, c=0.05, commitment=0.25, beta=0.08):
    """Sparse branch: the StableMoE gate at top-k; discrete branch: nearest code (squared L2), expert input
    LN(x (1 - c) + sg(q - x) c), output LN again; y = softmax(mix(x))[0] sparse + [1] discrete; VQ loss
    mse(q, sg x) + 0.25 mse(sg q, x), times beta_vq."""
    dist = (x**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * x @ codebook.t()
    code = dist.argmin(1)
    q = codebook[code]
    loss = beta * (F.mse_loss(q, x.detach()) + commitment * F.mse_loss(q.detach(), x))
    quantized = x * (1 - c) + (q - x).detach() * c
    y_vq = ln(torch.stack([expert_fn(ln(quantized)[t : t + 1], int(code[t])) for t in range(len(x))])[:, 0])
    idx, w, _ = ref_stablemoe_gate(x, emb, k)
    y_sparse = torch.stack(
        [sum(w[t, j] * expert_fn(x[t : t + 1], int(idx[t, j]))[0] for j in range(k)) for t in range(len(x))]
    )
    g = (x @ mix_W.t() + mix_b).softmax(-1)
    return g[:, :1] * y_sparse + g[:, 1:] * y_vq, loss


def test_vqmoe_layer_matches_the_release():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, k=1, eval_k=1, d_ff=16, router="vqmoe", router_args={"balance_coef": 0.0})
    layer = MoELayer(cfg, D)
    r = layer.router
    with torch.no_grad():
        r.codebook.normal_()  # spread the codes so that every expert is chosen by some token
        r.mix.weight.normal_()
        r.norm.weight.uniform_(0.5, 1.5)
        r.norm.bias.normal_(0, 0.1)
    x = torch.randn(20, D)
    out = layer(x)
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
    y, loss = ref_vqmoe_layer(
        x,
        r.codebook.detach(),
        r.embeddings.detach(),
        r.mix.weight.detach(),
        r.mix.bias.detach(),
        r.norm,
        lambda v, e: F.gelu(v @ w1[e]) @ w2[e],
        k=1,
    )
    torch.testing.assert_close(out.y, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.aux_losses["vq"], loss)
    # gradients through our layer equal the transcription's: (1 - c) through the quantiser's output, and
    # the codebook learns from the VQ loss alone
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    probe = torch.randn_like(x)
    out = layer(xa)
    (gx,) = torch.autograd.grad((out.y * probe).sum() + out.aux_losses["vq"], xa)
    y, loss = ref_vqmoe_layer(
        xb,
        r.codebook,
        r.embeddings.detach(),
        r.mix.weight.detach(),
        r.mix.bias.detach(),
        r.norm,
        lambda v, e: F.gelu(v @ w1[e]) @ w2[e],
        k=1,
    )
    gref, gcode = torch.autograd.grad((y * probe).sum() + loss, [xb, r.codebook])
    torch.testing.assert_close(gx, gref, rtol=1e-4, atol=1e-6)
    layer.zero_grad()
    out = layer(x)
    (out.y * probe).sum().backward()
    assert r.codebook.grad is None or r.codebook.grad.abs().sum() == 0  # no gradient through the output
    (gcode_ours,) = torch.autograd.grad(layer(x).aux_losses["vq"], r.codebook)
    torch.testing.assert_close(gcode_ours, gcode)


def test_vqmoe_top1_costs_two_experts_per_token():
    from s2moe_ds.moe.routers.vqmoe import VQMoEConfig, VQMoERouter

    assert VQMoERouter.expected_slots(VQMoEConfig(), 1, E, True) == 2
    assert VQMoERouter.expected_slots(VQMoEConfig(), 1, E, False) == 2


# --- inside a language model: the model's init and schedule must not undo the releases' ---


def _model(router, args=None, n_layer=2, **moe):
    from s2moe_ds.config import ModelConfig
    from s2moe_ds.model import MoELanguageModel

    cfg = ModelConfig(vocab_size=50, n_layer=n_layer, n_head=2, d_model=64, context=8)
    cfg.moe.router, cfg.moe.num_experts, cfg.moe.router_args = router, E, dict(args or {})
    for k, v in moe.items():
        setattr(cfg.moe, k, v)
    torch.manual_seed(0)
    return MoELanguageModel(cfg)


def test_the_model_keeps_each_releases_router_init():
    bound_std = 1 / math.sqrt(3 * 64)  # PyTorch's default Linear init: U(+-1/sqrt(fan_in))
    r = _model("smoe", k=2).blocks[0].ffn.router
    assert r.proj.weight.std().item() == pytest.approx(0.02, rel=0.15) and r.proj.bias.abs().sum() == 0
    r = _model("xmoe", k=2).blocks[0].ffn.router
    assert r.proj.weight.std().item() == pytest.approx(0.02, rel=0.2)  # the authors' weights_init
    r = _model("xmoe", {"variant": "torchscale"}, k=2).blocks[0].ffn.router
    assert r.proj.weight.std().item() == pytest.approx(bound_std, rel=0.2)
    r = _model("competesmoe", k=2).blocks[0].ffn.router
    assert r.proj.weight.std().item() == pytest.approx(bound_std, rel=0.2)
    r = _model("stablemoe", {"variant": "two_stage", "stage2_step": 5}, k=1).blocks[0].ffn.router
    assert r.distill_emb.weight.std().item() == pytest.approx(1.0, rel=0.1)


def test_competesmoe_2024_competes_in_every_layer_on_every_step():
    model = _model("competesmoe", {"variant": "v2024"}, n_layer=5, k=2)
    model.set_total_steps(50, seed=0)
    routers = [layer.router for _, layer in model.moe_layers()]
    assert routers[0].cfg.compete_prob == 1.0 and routers[0].cfg.router_loss_coef == pytest.approx(0.05)
    model.train()
    for step in range(50):
        model.set_step(step)
        assert all(r.competes() for r in routers), step


def test_stablemoe_two_stage_routes_by_a_frozen_copy_in_stage_two():
    model = _model("stablemoe", {"variant": "two_stage", "stage2_step": 2}, k=1)
    layer = model.blocks[0].ffn
    r = layer.router
    r.train()
    r.token_ids_T = torch.randint(0, 50, (8,))
    x = torch.randn(8, 64)
    r.set_step(2)
    first = r(x, 1).expert_ids_TK
    with torch.no_grad():  # an optimizer still moving the live parameters (momentum, weight decay)
        r.distill_emb.weight.mul_(-1.0)
    assert torch.equal(r(x, 1).expert_ids_TK, first) and r.frozen.item() == 1
    without = (
        _model("stablemoe", {"variant": "two_stage", "stage2_step": 2, "distill_coef": 0.0}, k=1).blocks[0].ffn.router
    )
    without.eval()
    without.token_ids_T = r.token_ids_T
    with torch.no_grad():
        expected = (x @ without.embeddings.t()).argmax(-1, keepdim=True)
    assert torch.equal(without(x, 1).expert_ids_TK, expected)  # no distillation: greedy x . C, as the release


def test_xmoe_embeddings_stay_at_norm_one_and_a_half_through_the_optimizer():
    """Under ZeRO the optimizer's fp32 copy is written back over the module after every step: the rescale
    has to reach that copy (MasterWeights), or weight decay shrinks the norm the optimizer sees."""
    from s2moe_ds.distributed import MasterWeights

    model = _model("xmoe", k=2)
    r = model.blocks[0].ffn.router
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.5)
    for _ in range(3):
        model.train()
        out = model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step(MasterWeights)
        torch.testing.assert_close(r.embeddings.norm(dim=-1), torch.full((E,), 1.5))
