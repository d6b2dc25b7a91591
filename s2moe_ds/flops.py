"""FLOPs per token, counted from the config (a multiply-add is 2 FLOPs; elementwise ops ignored).

Per layer, forward:
- attention: Q and output ``4 d^2``, K and V ``4 d d_kv`` (``d_kv = d``, or ``n_kv_head x head width``
  under grouped-query attention) + scores and weighted values ``4 n d`` over the full context ``n`` (the
  PaLM / Chinchilla convention: an upper bound for causal attention);
- dense FFN: ``4 d f`` (GELU), ``6 d f`` (SwiGLU, arch 'llama');
- MoE FFN: the router's FLOPs plus (expected experts evaluated per token + shared experts) x (one expert's
  FLOPs);
  under S2MoE in training both pathways route and run (twice the router and experts), plus the gate
  ``2 d`` and the InfoNCE negatives ``2 M d`` (M = ``num_negatives``, or every token of the micro-batch
  when it is 0: ``batch_tokens``); at inference with the clean pathway only, one pass;
- the uniformity loss (``model.uniformity``, training only): InfoNCE's ``2 M d + 2 d`` per FFN;
- the LM head ``2 d V``.
Training FLOPs are 3x forward (backward costs twice the forward).
"""

from __future__ import annotations

from .config import ModelConfig
from .moe.routers import router_class


def expert_flops(d_model: int, d_ff: int, activation: str) -> int:
    return 2 * (3 if activation == "swiglu" else 2) * d_model * d_ff


def moe_layer_flops(cfg: ModelConfig, training: bool, k: int = 0, batch_tokens: int = 0, pathways: str = "") -> float:
    m = cfg.moe
    cls = router_class(m.router)
    rcfg = m.router_config()
    d, E = cfg.d_model, m.num_experts
    k = k or (m.k if training else m.inference_k)
    pathways = pathways or m.s2moe.inference
    one = expert_flops(d, m.d_ff or 4 * d, m.activation)
    per_pass = cls.flops_per_token(rcfg, d, E) + (cls.expected_slots(rcfg, k, E, training) + m.num_shared_experts) * one
    if not m.s2moe.enabled or (not training and pathways == "clean"):
        return per_pass
    extra = 2 * d
    if training and m.s2moe.uncertainty_coef > 0:
        extra += info_nce_flops(d, m.s2moe.num_negatives, batch_tokens, "model.moe.s2moe.num_negatives")
    return 2 * per_pass + extra


def info_nce_flops(d: int, negatives: int, batch_tokens: int, field: str) -> float:
    """InfoNCE per anchor token: its ``negatives`` dot products and the positive's (``negatives`` 0: every
    token of the micro-batch, which needs ``batch_tokens``)."""
    if negatives == 0 or (batch_tokens and negatives > batch_tokens):
        if not batch_tokens:
            raise ValueError(
                f"{field} is 0 (every token of the micro-batch is a negative): pass batch_tokens "
                f"(micro_batch_size x context) to count its FLOPs"
            )
        negatives = batch_tokens
    return 2 * negatives * d + 2 * d


def flops_per_token(cfg: ModelConfig, training: bool, k: int = 0, batch_tokens: int = 0, pathways: str = "") -> float:
    """Forward(+backward when ``training``) FLOPs per token. ``k`` and ``pathways``: the MoE top-k and, at
    inference, the S2MoE pathways ('clean'/'both') a model runs with (``MoELanguageModel.inference()``);
    unset (0, '') takes the config's (``k`` in training, else ``eval_k``; ``s2moe.inference``). ``batch_tokens``
    (tokens per micro-batch) is needed when InfoNCE uses every token as a negative."""
    d, n = cfg.d_model, cfg.context
    moe_ids = set(cfg.moe_layer_ids())
    total = 0.0
    d_kv = cfg.kv_heads * (d // cfg.n_head)
    dense = expert_flops(d, cfg.d_ff or 4 * d, "swiglu" if cfg.arch == "llama" else "gelu")
    for i in range(cfg.n_layer):
        total += 4 * d * d + 4 * d * d_kv + 4 * n * d
        total += moe_layer_flops(cfg, training, k, batch_tokens, pathways) if i in moe_ids else dense
        if training and cfg.uniformity.coef > 0:
            u = cfg.uniformity
            total += info_nce_flops(d, u.num_negatives, batch_tokens, "model.uniformity.num_negatives")
    total += 2 * d * cfg.vocab_size
    return 3 * total if training else total
