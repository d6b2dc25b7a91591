"""Decoder-only transformer language model whose FFN blocks are dense or MoE (any router, S2MoE on/off).

Shape suffixes: B batch, L sequence length, D model width, V vocabulary.
Pre-norm blocks of one family (``model.arch``): 'gpt2' (LayerNorm, learned positions, GELU, biases) or
'llama' (``llama.py``: RMSNorm, rotary positions, grouped-query attention, SwiGLU, no biases); causal
attention through ``F.scaled_dot_product_attention``. The MoE layer is the same in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .llama import LlamaAttention, RMSNorm, SwiGLUFFN
from .moe import MoELayer, build_moe_layer
from .moe.uncertainty import info_nce


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD: Tensor, cache: list | None = None) -> Tensor:
        """``cache``: this layer's ``[k, v]`` of the tokens before ``x`` (generation); extended in place."""
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        causal = True
        if cache is not None:
            if cache:  # earlier tokens: every new token sees all of them (one new token at a time)
                if L != 1:
                    raise ValueError("a KV cache with earlier tokens takes one new token per forward")
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
                causal = False
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, D)))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


def norm_layer(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.arch == "llama" else nn.LayerNorm(cfg.d_model)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, moe: bool, seed: int):
        super().__init__()
        self.checkpointing = cfg.activation_checkpointing
        llama = cfg.arch == "llama"
        self.ln1 = norm_layer(cfg)
        self.attn = LlamaAttention(cfg) if llama else CausalSelfAttention(cfg)
        self.ln2 = norm_layer(cfg)
        if moe:
            self.ffn = build_moe_layer(
                cfg.moe,
                cfg.d_model,
                layer_id=layer_id,
                seed=seed,
                out_init_std=0.02 / math.sqrt(2 * cfg.n_layer),
                vocab_size=cfg.vocab_size,
            )
        else:
            self.ffn = (SwiGLUFFN if llama else DenseFFN)(cfg.d_model, cfg.d_ff or 4 * cfg.d_model, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.uniformity = cfg.uniformity

    def uniformity_loss(self, h: Tensor) -> dict:
        """``{'uniformity': coef * InfoNCE(h, h)}`` on the FFN input in training (``model.uniformity``)."""
        u = self.uniformity
        if not (self.training and u.coef > 0):
            return {}
        h_TD = h.reshape(-1, h.shape[-1])
        return {"uniformity": u.coef * info_nce(h_TD, h_TD, u.temperature, u.num_negatives)}

    def forward(self, x: Tensor, cache: list | None = None) -> tuple[Tensor, dict, dict]:
        if self.training and torch.is_grad_enabled() and self.checkpointing == "all":
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x, cache)

    def _forward(self, x: Tensor, cache: list | None = None) -> tuple[Tensor, dict, dict]:
        x = x + self.attn(self.ln1(x), cache)
        h = self.ln2(x)
        uniformity = self.uniformity_loss(h)
        if isinstance(self.ffn, MoELayer):
            if self.training and torch.is_grad_enabled() and self.checkpointing == "moe":
                out = checkpoint(self.ffn, h, use_reentrant=False)
            else:
                out = self.ffn(h)
            return x + self.drop(out.y), {**out.aux_losses, **uniformity}, out.metrics
        return x + self.ffn(h), uniformity, {}


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Tensor | None = None
    """Task loss: mean cross-entropy in nats per token."""
    aux_loss: Tensor | None = None
    """Sum of every MoE layer's (coefficient-scaled) auxiliary losses."""
    aux_losses: dict = field(default_factory=dict)
    """'layer{i}/{name}' -> scaled auxiliary loss."""
    metrics: dict = field(default_factory=dict)
    """'layer{i}/{name}' -> MoE diagnostic."""


class MoELanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0):
        """``cfg``: checked once, at load (``s2moe_ds.config.validate``); read here, never written."""
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                "config field 'model.vocab_size': must be set (> 0) before building the model; "
                "the trainer takes it from the dataset's meta.json"
            )
        self.cfg = cfg
        moe_ids = set(cfg.moe_layer_ids())
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model) if cfg.arch == "gpt2" else None  # llama: rotary
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, i in moe_ids, seed) for i in range(cfg.n_layer))
        self.ln_f = norm_layer(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for _, layer in self.moe_layers():  # routers whose release initialises differently
            layer.router.init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.proj.weight", "ffn.shared.proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoELayer)]

    def set_step(self, step: int) -> None:
        """Tell the routers the training step (CompeteSMoE schedule, StableMoE stages)."""
        for _, layer in self.moe_layers():
            layer.router.set_step(step)

    def set_total_steps(self, total_steps: int, seed: int) -> None:
        """Give schedule-driven routers the run's length: CompeteSMoE's 2025 competition schedule (warm-up
        fraction, per-step layer cap) over all its layers, from the run seed (the 2024 variant draws per
        layer and step, without warm-up or cap, as its release)."""
        from .moe.routers.competesmoe import CompeteSMoERouter, CompetitionSchedule

        routers = [
            layer.router
            for _, layer in self.moe_layers()
            if isinstance(layer.router, CompeteSMoERouter) and layer.router.cfg.variant == "v2025"
        ]
        if not routers:
            return
        c = routers[0].cfg
        schedule = CompetitionSchedule(
            seed, len(routers), total_steps, c.compete_prob, c.warmup_fraction, c.max_compete_layers
        )
        for i, r in enumerate(routers):
            r.schedule, r.schedule_index = schedule, i

    def after_optimizer_step(self, master) -> None:
        """Routers' post-step adjustments (XMoE's norm 1.5) through the optimizer's fp32 copy ``master``."""
        for _, layer in self.moe_layers():
            layer.router.after_optimizer_step(master)

    def uses_selection_bias(self) -> bool:
        return any(layer.router.cfg.bias_update_rate > 0 for _, layer in self.moe_layers())

    def update_selection_bias(self, metrics: dict) -> None:
        """Aux-loss-free balancing: each router's bias from its layer's global load of the step."""
        for i, layer in self.moe_layers():
            counts = metrics.get(f"layer{i}/tokens_per_expert")
            if counts is not None:
                layer.router.update_selection_bias(counts)

    def set_inference(self, k: int | None = None, pathways: str | None = None, weights: str | None = None) -> None:
        """Set every MoE layer's evaluation top-k, S2MoE inference pathways ('clean'/'both') and
        combine-weight convention ('train': the training rule; 'per_k': the old convention); None keeps
        the current one. The layers hold them (``MoELayer.set_inference``); the config is not changed."""
        for _, layer in self.moe_layers():
            layer.set_inference(k, pathways, weights)

    def inference(self) -> tuple[int, str]:
        """(top-k, S2MoE pathways) the MoE layers evaluate with now; the config's for a dense model."""
        for _, layer in self.moe_layers():
            return layer.inference_k, layer.inference_pathways
        return self.cfg.moe.inference_k, self.cfg.moe.s2moe.inference

    def forward(self, idx_BL: Tensor, targets_BL: Tensor | None = None, cache: list | None = None) -> ModelOutput:
        """``cache`` (generation): a list with one ``[k, v]`` per block (``new_cache()``), holding the tokens
        before ``idx_BL``; their count is the position of ``idx_BL``'s first token."""
        B, L = idx_BL.shape
        start = cache[0][0].shape[2] if cache and cache[0] else 0
        if start + L > self.cfg.context:
            raise ValueError(f"sequence length {start + L} exceeds model.context ({self.cfg.context})")
        x = self.tok_emb(idx_BL)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + L, device=idx_BL.device))
        x = self.drop(x)
        for _, layer in self.moe_layers():
            layer.router.token_ids_T = idx_BL.reshape(-1)
        aux_losses, metrics = {}, {}
        for i, block in enumerate(self.blocks):
            x, aux, met = block(x, cache[i] if cache is not None else None)
            aux_losses.update({f"layer{i}/{k}": v for k, v in aux.items()})
            metrics.update({f"layer{i}/{k}": v for k, v in met.items()})
        logits = self.head(self.ln_f(x))
        out = ModelOutput(logits, aux_losses=aux_losses, metrics=metrics)
        out.aux_loss = sum(aux_losses.values()) if aux_losses else logits.new_zeros(())
        if targets_BL is not None:
            out.loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BL.reshape(-1))
        return out

    def param_counts(self) -> dict:
        """Parameters of the whole model (all experts, wherever they live) and active per token at
        inference (only the experts a token is routed to at the layers' inference top-k)."""
        expert_params = {id(p) for _, layer in self.moe_layers() for p in layer.experts.parameters()}
        shared = sum(p.numel() for p in self.parameters() if id(p) not in expert_params)
        total = active = shared
        for _, layer in self.moe_layers():
            per_expert = layer.experts.params_per_expert()
            slots = layer.router.expected_slots(layer.router.cfg, layer.inference_k, layer.cfg.num_experts, False)
            total += per_expert * layer.cfg.num_experts
            active += per_expert * min(slots, layer.cfg.num_experts)
        return {"total": total, "active_per_token": int(active)}

    def new_cache(self) -> list:
        return [[] for _ in self.blocks]

    @torch.no_grad()
    def generate(
        self,
        idx_BL: Tensor,
        new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
        use_cache: bool = True,
    ) -> Tensor:
        """Append ``new_tokens`` tokens. Each step samples from the last position's distribution (``greedy``:
        its argmax) after temperature, top-k and top-p (nucleus) filtering. With ``use_cache`` the keys and
        values of earlier tokens are kept (one token's forward per step) while the sequence fits the
        context; past it, every step recomputes the last ``context`` tokens (positions are absolute), the
        same as ``use_cache=False``."""
        ctx = self.cfg.context
        cache = self.new_cache() if use_cache else None
        logits = self(idx_BL[:, -ctx:], cache=cache).logits[:, -1]
        for n in range(new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, greedy)
            idx_BL = torch.cat([idx_BL, nxt], dim=1)
            if n + 1 == new_tokens:
                break
            if use_cache and idx_BL.shape[1] <= ctx:
                logits = self(nxt, cache=cache).logits[:, -1]
            else:
                cache = self.new_cache() if use_cache else None
                logits = self(idx_BL[:, -ctx:], cache=cache).logits[:, -1]
        return idx_BL


def sample_next(
    logits_BV: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False
) -> Tensor:
    """One token per row: argmax (``greedy``), or a draw after temperature, top-k and top-p filtering."""
    if greedy:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV.float() / max(temperature, 1e-6)
    if top_k:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = cum_BV - sorted_BV.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return torch.multinomial(logits_BV.softmax(-1), 1)
