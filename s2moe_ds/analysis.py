"""Representation-collapse diagnostics for a trained model, layer by layer.

Shape suffixes: T tokens, D model width, K routed slots per token.

Each MoE layer is measured **as it was trained** (its training top-k; for S2MoE both pathways with one
fixed noise draw, mixed by the gate), in evaluation mode otherwise (no dropout, no CompeteSMoE
competition), on a random sample of real tokens (the inputs its sublayer receives):

- ``routing_jacobian_effective_rank`` / ``routing_jacobian_spectrum``: the *routing term* of the layer's
  Jacobian, the quantity the collapse argument of X-MoE and S2MoE is about. Writing the layer as
  ``y = sum_k w_k(x) f_k(x)``, its Jacobian is ``sum_k w_k J_fk`` (the experts') plus
  ``sum_k f_k (dw_k/dx)^T`` (the routing term): every column of the latter lies in the span of the
  selected experts' outputs, and every row in the span of the router's vectors, so a low-dimensional
  router confines it to few directions. It is computed exactly as the Jacobian of
  ``sum_k w_k(x) sg(f_k(x))`` (expert outputs held constant); for S2MoE,
  ``g(x) sum_k w_k(x) sg(f_k(x)) + (1 - g(x)) sum_k w_k(x_hat) sg(f_k(x_hat))``, so the gate and both
  pathways' routers count. Effective rank ``exp(H(s / sum s))`` of the singular values (Roy & Vetterli,
  2007), averaged over tokens. Low means collapse onto few directions.
- ``jacobian_effective_rank`` / ``jacobian_spectrum``: the same for the whole layer (experts and routing).
- ``expert_output_similarity``: mean pairwise cosine similarity between the outputs of every two experts
  on the *same* tokens (each expert run on every sampled token); 1 means the experts compute the same
  function.
- ``router_similarity``: mean absolute pairwise cosine between the routers' per-expert vectors mapped
  into the d_model input space (``Router.input_space_vectors``: linear rows; XMoE's ``W_proj^T e_i``; the
  authors' StableMoE embeddings; VQMoE's codebook), so routers of different routing widths compare.
- ``routing_entropy`` / ``load_imbalance`` / ``tokens_per_expert``: of the inference routing on the sample.

S2MoE layers also get the figures of the path that runs at inference (the clean pathway alone, at the
layer's inference top-k): ``clean_jacobian_effective_rank``, ``clean_routing_jacobian_effective_rank``;
and what the noise does on the sample (one fixed draw): ``noise_cos`` (mean cosine between a token and its
noisy copy) and ``pathway_disagreement`` (share of tokens whose top-1 expert differs between the pathways).

Dense FFNs get the whole-layer Jacobian only. The sublayers act on each token independently, so one
backward pass per output dimension gives every sampled token's Jacobian row at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .moe.layer import MoELayer
from .moe.s2moe import S2MoELayer


def ffn_inputs(model, idx_BL: Tensor) -> list[Tensor]:
    """The input of every block's feed-forward sublayer, as ``[tokens, d_model]``, for one batch."""
    captured: list[Tensor | None] = [None] * len(model.blocks)
    hooks = [
        block.ffn.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0].detach()))
        for i, block in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad():
            model(idx_BL)
    finally:
        for h in hooks:
            h.remove()
    return [c.reshape(-1, c.shape[-1]) for c in captured]


def _ffn_out(ffn, x_TD: Tensor) -> Tensor:
    out = ffn(x_TD)
    return out.y if isinstance(ffn, MoELayer) else out


def trained_layer_fn(
    layer: MoELayer, routing_only: bool, noise_seed: int = 0, clean: bool = False
) -> Callable[[Tensor], Tensor]:
    """The MoE layer as trained, as a function of its input; ``routing_only`` holds expert outputs constant.
    ``clean``: the layer as it runs at inference instead (S2MoE: the clean pathway alone, at its inference
    top-k)."""
    k = layer.inference_k if clean else layer.cfg.k

    def slots(xx_TD: Tensor):
        route = layer.route(xx_TD, k=k)
        ones = xx_TD.new_ones(len(xx_TD), 1)
        out_TKD = torch.stack(
            [
                layer.experts(xx_TD, route.expert_ids_TK[:, j : j + 1], ones)
                for j in range(route.expert_ids_TK.shape[1])
            ],
            dim=1,
        )
        if routing_only:
            out_TKD = out_TKD.detach()
        y_TD = (route.weights_TK.unsqueeze(-1).to(out_TKD.dtype) * out_TKD).sum(1)
        if route.extra_value_TD is not None:  # VQMoE: mix weight x discrete branch
            v_TD = route.extra_value_TD.detach() if routing_only else route.extra_value_TD
            y_TD = y_TD + (v_TD if route.extra_weight_T1 is None else route.extra_weight_T1.to(v_TD.dtype) * v_TD)
        return y_TD

    def fn(x_TD: Tensor) -> Tensor:
        if clean or not (isinstance(layer, S2MoELayer) and layer.cfg.s2moe.enabled):
            return slots(x_TD)
        x_hat_TD = noisy_copy(layer, x_TD, noise_seed)
        g_T1 = layer.gate_values(x_TD)
        yy = slots(torch.cat([x_TD, x_hat_TD]))
        return g_T1 * yy[: len(x_TD)] + (1 - g_T1) * yy[len(x_TD) :]

    return fn


def noisy_copy(layer: S2MoELayer, x_TD: Tensor, noise_seed: int) -> Tensor:
    """One fixed draw of the layer's noisy copy of ``x_TD`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(noise_seed)
        return layer.noise(x_TD)


@torch.no_grad()
def noise_effect(layer: S2MoELayer, x_TD: Tensor, noise_seed: int) -> dict:
    """How far the noise moves the tokens (mean cosine to the noisy copy) and their top-1 expert (share of
    tokens routed to another expert), at the layer's training top-k."""
    x_hat_TD = noisy_copy(layer, x_TD, noise_seed)
    clean = layer.route(x_TD, k=layer.cfg.k).expert_ids_TK
    noisy = layer.route(x_hat_TD, k=layer.cfg.k).expert_ids_TK
    moved = (clean[:, 0] != noisy[:, 0]).float().mean() if clean.shape[1] else torch.tensor(float("nan"))
    return {
        "noise_cos": float(F.cosine_similarity(x_TD.float(), x_hat_TD.float(), dim=-1).mean()),
        "pathway_disagreement": float(moved),
    }


def router_vectors(router) -> Tensor | None:
    """The router's one-vector-per-expert (or per-code) directions in the d_model input space."""
    return router.input_space_vectors()


def mean_pairwise_cosine(rows_ND: Tensor, absolute: bool = False) -> float:
    u = F.normalize(rows_ND.float(), dim=-1)
    sim = u @ u.T
    off = sim[~torch.eye(len(u), dtype=torch.bool)]
    return float(off.abs().mean() if absolute else off.mean())


@torch.no_grad()
def expert_output_similarity(layer: MoELayer, x_TD: Tensor) -> float:
    """Mean over expert pairs (i < j) and tokens of cos(expert_i(x_t), expert_j(x_t))."""
    E = layer.cfg.num_experts
    ones = x_TD.new_ones(len(x_TD), 1)
    outs = [
        F.normalize(layer.experts(x_TD, torch.full((len(x_TD), 1), e, dtype=torch.long), ones).float(), dim=-1)
        for e in range(E)
    ]
    sims = [float((outs[i] * outs[j]).sum(-1).mean()) for i, j in itertools.combinations(range(E), 2)]
    return sum(sims) / len(sims)


def jacobian_spectra(f, x_TD: Tensor) -> Tensor:
    """Singular values ``[tokens, d_model]`` of each token's Jacobian d f(x)_t / d x_t (``f`` a callable
    or an FFN module, applied token-wise)."""
    x = x_TD.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = _ffn_out(f, x) if isinstance(f, torch.nn.Module) else f(x)
        rows = []
        for j in range(y.shape[-1]):
            (g,) = torch.autograd.grad(y[:, j].sum(), x, retain_graph=j + 1 < y.shape[-1], allow_unused=True)
            rows.append(torch.zeros_like(x) if g is None else g)
    J_TDD = torch.stack(rows, dim=1)  # [token, output dim, input dim]
    return torch.linalg.svdvals(J_TDD.float())


def effective_rank(s_TD: Tensor) -> Tensor:
    p = s_TD / s_TD.sum(-1, keepdim=True).clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return h.exp()


def _spectrum_summary(s_TD: Tensor, prefix: str) -> dict:
    spectrum = (s_TD / s_TD.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0)
    return {
        f"{prefix}effective_rank": float(effective_rank(s_TD).mean()),
        f"{prefix}spectrum": [round(float(v), 6) for v in spectrum],
    }


def sample_tokens(n_total: int, n: int, seed: int) -> Tensor:
    """``n`` token positions drawn without replacement (all of them if ``n >= n_total``), sorted."""
    if n >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


@torch.no_grad()
def analyse(model, idx_BL: Tensor, jacobian_tokens: int = 128, seed: int = 0) -> list[dict]:
    """One dict per block with the diagnostics above (MoE-only entries are None for dense blocks)."""
    was_training = model.training
    model.eval()
    try:
        inputs = ffn_inputs(model, idx_BL)
        layers = []
        for i, (block, x_TD) in enumerate(zip(model.blocks, inputs)):
            ffn = block.ffn
            sel = sample_tokens(len(x_TD), jacobian_tokens, seed + i)
            xs = x_TD[sel]
            rec = {
                "layer": i,
                "kind": "moe" if isinstance(ffn, MoELayer) else "dense",
                "routing_jacobian_effective_rank": None,
                "routing_jacobian_spectrum": None,
                "expert_output_similarity": None,
                "router_similarity": None,
                "routing_entropy": None,
                "load_imbalance": None,
                "tokens_per_expert": None,
            }
            if not isinstance(ffn, MoELayer):
                rec.update(_spectrum_summary(jacobian_spectra(ffn, xs), "jacobian_"))
                layers.append(rec)
                continue
            ffn.router.token_ids_T = idx_BL.reshape(-1)[sel]  # routers that route by token id see the sample's
            rec.update(_spectrum_summary(jacobian_spectra(trained_layer_fn(ffn, False, seed), xs), "jacobian_"))
            rec.update(_spectrum_summary(jacobian_spectra(trained_layer_fn(ffn, True, seed), xs), "routing_jacobian_"))
            if isinstance(ffn, S2MoELayer):  # the path inference runs, and what the noise does
                for routing_only, prefix in ((False, "clean_jacobian_"), (True, "clean_routing_jacobian_")):
                    fn = trained_layer_fn(ffn, routing_only, seed, clean=True)
                    rec.update(_spectrum_summary(jacobian_spectra(fn, xs), prefix))
                ffn.router.token_ids_T = idx_BL.reshape(-1)
                rec.update(noise_effect(ffn, x_TD, seed))
            ffn.router.token_ids_T = idx_BL.reshape(-1)
            rec["expert_output_similarity"] = expert_output_similarity(ffn, x_TD)
            vecs = router_vectors(ffn.router)
            rec["router_similarity"] = None if vecs is None else mean_pairwise_cosine(vecs, absolute=True)
            route = ffn.route(x_TD)
            probs = route.probs_TE.float()
            rec["routing_entropy"] = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
            counts = torch.bincount(route.all_ids().reshape(-1), minlength=ffn.cfg.num_experts).float()
            rec["load_imbalance"] = float(counts.max() / counts.mean().clamp_min(1e-12))
            rec["tokens_per_expert"] = counts.long().tolist()
            layers.append(rec)
        return layers
    finally:
        model.train(was_training)
