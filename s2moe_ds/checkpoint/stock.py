"""Exports as stock ``transformers`` MoE models: where a trained model's inference maps exactly onto an
architecture that ships with transformers, the export is that architecture, loadable by
``AutoModelForCausalLM.from_pretrained(DIR)`` with neither s2moe_ds nor ``trust_remote_code``.

The fit (``stock_fit``), for a ``model.arch: llama`` model evaluated as exported (its inference top-k,
S2MoE's clean pathway):
- every MoE layer routes with the linear softmax router (``smoe``; S2MoE routes with it too), without a
  router bias or aux-loss-free selection bias, into SwiGLU experts (``moe.activation: swiglu``);
- ``qwen3_moe`` when the block has QK-norm (``model.qk_norm``): either weight rule (``norm_topk_prob``:
  renormalised over the selected experts, or the softmax probability over all experts, S2MoE's
  default), dense layers anywhere (``mlp_only_layers``);
- ``mixtral`` without QK-norm: every layer MoE and the renormalised rule (the authors' weight 1 at top-1).
Anything else (the GPT-2 block, cosine or codebook routers, a router bias) is no stock architecture:
the export is this package's own folder.

The weights are written in the names and per-expert layout the models are published in on the Hub
(what transformers 5.x's ``save_pretrained`` writes); config.json carries 4.x's names too (``rope_theta``,
Qwen3-MoE's ``num_experts``, ``torch_dtype``). Tested with transformers 5.17 only.
"""

from __future__ import annotations

from ..model import MoELanguageModel

STOCK_TYPES = ("qwen3_moe", "mixtral")


def stock_fit(model: MoELanguageModel) -> tuple[str | None, str]:
    """(the stock ``model_type`` the model is exactly, or None; why not, when None)."""
    cfg = model.cfg
    if cfg.arch != "llama":
        return None, f"model.arch is {cfg.arch!r}; stock MoE architectures are 'llama'-style blocks"
    layers = model.moe_layers()
    if not layers:
        return None, "the model has no MoE layer (a dense model: no stock MoE architecture applies)"
    m = cfg.moe
    if m.router != "smoe":
        return None, f"router {m.router!r} is not the linear softmax router the stock models use"
    rcfg = layers[0][1].router.cfg
    if rcfg.bias or rcfg.bias_update_rate > 0:
        return None, "the router has a bias (router_args.bias or bias_update_rate); stock routers have none"
    if m.activation != "swiglu":
        return None, f"moe.activation is {m.activation!r}; stock experts are SwiGLU"
    if m.num_shared_experts:
        return None, "the layers have shared experts; the stock architectures here have none (Qwen2-MoE gates its)"
    k, pathways = model.inference()
    if m.s2moe.enabled and pathways != "clean":
        return None, "S2MoE evaluates both pathways (s2moe.inference 'both'); a stock model runs one"
    rule = layers[0][1].router.weight_rule(k)
    if cfg.qk_norm:
        return "qwen3_moe", ""
    if len(layers) < cfg.n_layer:
        return None, "some layers are dense and there is no QK-norm: Mixtral has every layer MoE"
    if rule != "renorm":
        return None, "top-k weights are softmax probabilities and there is no QK-norm: Mixtral renormalises"
    return "mixtral", ""


def stock_config(model: MoELanguageModel, model_type: str, eos_token_id: int | None) -> dict:
    """config.json of the stock architecture."""
    cfg = model.cfg
    k, _ = model.inference()
    layer = model.moe_layers()[0][1]
    config = {
        "architectures": [{"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.d_model // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this name (and defaults Mixtral's to 1e6)
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": k,
        "output_router_logits": False,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",  # the 4.x name
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
        "pad_token_id": None,
    }
    expert_width = cfg.moe.d_ff or 4 * cfg.d_model
    if model_type == "mixtral":
        config.update(intermediate_size=expert_width, router_jitter_noise=0.0, sliding_window=None)
    else:
        moe_ids = {i for i, _ in model.moe_layers()}
        config.update(
            intermediate_size=cfg.d_ff or 4 * cfg.d_model,
            moe_intermediate_size=expert_width,
            num_experts=cfg.moe.num_experts,  # Qwen3-MoE's own name (5.x maps it to num_local_experts)
            norm_topk_prob=layer.router.weight_rule(k) == "renorm",
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(cfg.n_layer) if i not in moe_ids],
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
        )
    return config


def _block_names(model_type: str, i: int, moe: bool) -> dict:
    """Our parameter name (within block i) -> the stock one, for every non-expert parameter."""
    p = f"model.layers.{i}."
    names = {
        "ln1.weight": p + "input_layernorm.weight",
        "ln2.weight": p + "post_attention_layernorm.weight",
        "attn.q.weight": p + "self_attn.q_proj.weight",
        "attn.k.weight": p + "self_attn.k_proj.weight",
        "attn.v.weight": p + "self_attn.v_proj.weight",
        "attn.proj.weight": p + "self_attn.o_proj.weight",
        "attn.q_norm.weight": p + "self_attn.q_norm.weight",
        "attn.k_norm.weight": p + "self_attn.k_norm.weight",
    }
    if moe:
        names["ffn.router.proj.weight"] = p + (
            "block_sparse_moe.gate.weight" if model_type == "mixtral" else "mlp.gate.weight"
        )
    else:
        names.update({"ffn.fc.weight": p + "mlp.gate_proj.weight", "ffn.up.weight": p + "mlp.up_proj.weight",
                      "ffn.proj.weight": p + "mlp.down_proj.weight"})  # fmt: skip
    return names


def _expert_names(model_type: str, i: int, e: int) -> dict:
    """Our stacked expert matrix -> the stock name of expert e's matrix (stored transposed: [out, in])."""
    if model_type == "mixtral":
        p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
        return {"w1": p + "w1.weight", "w3": p + "w3.weight", "w2": p + "w2.weight"}
    p = f"model.layers.{i}.mlp.experts.{e}."
    return {"w1": p + "gate_proj.weight", "w3": p + "up_proj.weight", "w2": p + "down_proj.weight"}


def stock_weights(model: MoELanguageModel, state: dict, model_type: str) -> tuple[dict, dict]:
    """(the stock model's state dict: Hub names, per-expert matrices; the rest of ours, which the stock
    model has no place for: S2MoE's noise and gate, used in training only) from ours (local layout)."""
    cfg = model.cfg
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["ln_f.weight"]}
    used = {"tok_emb.weight", "ln_f.weight", "head.weight"}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    moe_ids = {i for i, _ in model.moe_layers()}
    for i in range(cfg.n_layer):
        for ours, theirs in _block_names(model_type, i, i in moe_ids).items():
            if f"blocks.{i}.{ours}" in state:
                out[theirs] = state[f"blocks.{i}.{ours}"]
                used.add(f"blocks.{i}.{ours}")
        if i in moe_ids:
            for e in range(cfg.moe.num_experts):
                for w, theirs in _expert_names(model_type, i, e).items():
                    out[theirs] = state[f"blocks.{i}.ffn.experts.{w}"][e].t()
            used.update(f"blocks.{i}.ffn.experts.{w}" for w in ("w1", "w2", "w3"))
    rest = {k: v for k, v in state.items() if k not in used}
    return {k: v.detach().contiguous() for k, v in out.items()}, {k: v.detach().contiguous() for k, v in rest.items()}


def from_stock_weights(model: MoELanguageModel, stock: dict, model_type: str) -> dict:
    """Our state dict (local layout) from a stock one written by ``stock_weights``."""
    import torch

    cfg = model.cfg
    state = {"tok_emb.weight": stock["model.embed_tokens.weight"], "ln_f.weight": stock["model.norm.weight"]}
    state["head.weight"] = stock["model.embed_tokens.weight"] if cfg.tie_embeddings else stock["lm_head.weight"]
    moe_ids = {i for i, _ in model.moe_layers()}
    for i in range(cfg.n_layer):
        for ours, theirs in _block_names(model_type, i, i in moe_ids).items():
            if theirs in stock:
                state[f"blocks.{i}.{ours}"] = stock[theirs]
        if i in moe_ids:
            per_expert = [_expert_names(model_type, i, e) for e in range(cfg.moe.num_experts)]
            for w in ("w1", "w3", "w2"):
                state[f"blocks.{i}.ffn.experts.{w}"] = torch.stack([stock[n[w]].t() for n in per_expert])
    return state
