"""Representation-collapse diagnostics for a trained model, layer by layer.

For each feed-forward sublayer (MoE or dense) on a sample of real tokens:

- ``expert_output_similarity``: mean pairwise cosine similarity between the outputs of every two
  experts on the *same* tokens (each expert run on every sampled token). 1 means the experts compute
  the same function (collapsed); near 0 means unrelated outputs.
- ``router_similarity``: mean absolute pairwise cosine similarity between the router's per-expert
  vectors (linear router rows, cosine-router expert embeddings, or VQ codes).
- ``jacobian_effective_rank``: the Jacobian of the sublayer's output with respect to its input, per
  token (``d_model x d_model``), summarised by its effective rank ``exp(H(s / sum s))`` over the
  singular values ``s`` (Roy & Vetterli, 2007), averaged over tokens; ``jacobian_spectrum`` is the mean
  normalised singular-value spectrum. A collapsed layer maps inputs onto few directions: low rank.
- ``routing_entropy`` / ``load_imbalance``: of the inference routing on the sample.

The sublayers act on each token independently at inference, so one backward pass per output
dimension gives every sampled token's Jacobian row at once.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .moe.layer import MoELayer


def ffn_inputs(model, idx_BL: Tensor) -> list[Tensor]:
    """The input of every block's feed-forward sublayer, as ``[tokens, d_model]``, for one batch."""
    captured: list[Optional[Tensor]] = [None] * len(model.blocks)
    hooks = [block.ffn.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0].detach()))
             for i, block in enumerate(model.blocks)]
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


def router_vectors(router) -> Optional[Tensor]:
    """The router's one-vector-per-expert parameter: expert embeddings, VQ codes or linear rows."""
    for name in ("embeddings", "codebook"):
        if isinstance(getattr(router, name, None), torch.nn.Parameter):
            return getattr(router, name).detach()
    proj = getattr(router, "proj", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.weight.detach()
    return None


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
    outs = [F.normalize(layer.experts(x_TD, torch.full((len(x_TD), 1), e, dtype=torch.long), ones).float(), dim=-1)
            for e in range(E)]
    sims = [float((outs[i] * outs[j]).sum(-1).mean()) for i, j in itertools.combinations(range(E), 2)]
    return sum(sims) / len(sims)


def jacobian_spectra(ffn, x_TD: Tensor) -> Tensor:
    """Singular values ``[tokens, d_model]`` of each token's Jacobian d ffn(x_t) / d x_t (ffn in eval mode)."""
    x = x_TD.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = _ffn_out(ffn, x)
        rows = []
        for j in range(y.shape[-1]):
            (g,) = torch.autograd.grad(y[:, j].sum(), x, retain_graph=j + 1 < y.shape[-1])
            rows.append(g)
    J_TDD = torch.stack(rows, dim=1)  # [token, output dim, input dim]
    return torch.linalg.svdvals(J_TDD.float())


def effective_rank(s_TD: Tensor) -> Tensor:
    p = s_TD / s_TD.sum(-1, keepdim=True).clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return h.exp()


@torch.no_grad()
def analyse(model, idx_BL: Tensor, jacobian_tokens: int = 128) -> list[dict]:
    """One dict per block with the diagnostics above (MoE-only entries are None for dense blocks)."""
    was_training = model.training
    model.eval()
    try:
        inputs = ffn_inputs(model, idx_BL)
        layers = []
        for i, (block, x_TD) in enumerate(zip(model.blocks, inputs)):
            ffn = block.ffn
            s = jacobian_spectra(ffn, x_TD[:jacobian_tokens])
            spectrum = (s / s.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0)
            rec = {"layer": i, "kind": "moe" if isinstance(ffn, MoELayer) else "dense",
                   "jacobian_effective_rank": float(effective_rank(s).mean()),
                   "jacobian_spectrum": [round(float(v), 6) for v in spectrum],
                   "expert_output_similarity": None, "router_similarity": None,
                   "routing_entropy": None, "load_imbalance": None, "tokens_per_expert": None}
            if isinstance(ffn, MoELayer):
                rec["expert_output_similarity"] = expert_output_similarity(ffn, x_TD)
                vecs = router_vectors(ffn.router)
                rec["router_similarity"] = None if vecs is None else mean_pairwise_cosine(vecs, absolute=True)
                route = ffn.route(x_TD)
                probs = route.probs_TE.float()
                rec["routing_entropy"] = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
                counts = torch.bincount(route.expert_ids_TK.reshape(-1), minlength=ffn.cfg.num_experts).float()
                rec["load_imbalance"] = float(counts.max() / counts.mean().clamp_min(1e-12))
                rec["tokens_per_expert"] = counts.long().tolist()
            layers.append(rec)
        return layers
    finally:
        model.train(was_training)
