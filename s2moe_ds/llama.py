"""The ``llama`` block family (``model.arch: llama``): RMSNorm, rotary positions, grouped-query attention,
optional per-head QK-norm, SwiGLU FFN, no biases anywhere.

The conventions are those of the Llama / Mixtral / Qwen3-MoE releases, so that a trained model maps
exactly onto a stock architecture (``checkpoint/stock.py``): rotary embedding over the whole head in the
"rotate half" layout (frequencies ``theta^(-2i/h)``, cos and sin repeated over both halves); key/value
head ``j`` serves query heads ``j*r .. j*r + r - 1`` (``r = n_head / n_kv_head``); QK-norm is an RMSNorm
over each head's ``h`` features of q and k, before the rotation (Qwen3).

Shape suffixes: B batch, L sequence length, D model width, H heads, G key/value heads, h head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


def rope_tables(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """(cos, sin), each ``[L, h]`` in fp32, for absolute ``positions``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x_BHLh: Tensor, cos_Lh: Tensor, sin_Lh: Tensor) -> Tensor:
    """Rotate each (i, i + h/2) feature pair of every head by its position's angle."""
    half = x_BHLh.shape[-1] // 2
    rotated = torch.cat([-x_BHLh[..., half:], x_BHLh[..., :half]], dim=-1)
    return (x_BHLh * cos_Lh + rotated * sin_Lh).to(x_BHLh.dtype)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 and cast back (as the stock models do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_head
        self.theta = cfg.rope_theta
        D, h = cfg.d_model, self.head_dim
        self.q = nn.Linear(D, self.n_head * h, bias=False)
        self.k = nn.Linear(D, self.n_kv_head * h, bias=False)
        self.v = nn.Linear(D, self.n_kv_head * h, bias=False)
        self.proj = nn.Linear(self.n_head * h, D, bias=False)
        self.q_norm = RMSNorm(h, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD: Tensor, cache: list | None = None) -> Tensor:
        """``cache``: this layer's ``[k, v]`` (after rotation) of the tokens before ``x``; extended in place."""
        B, L, _ = x_BLD.shape
        h = self.head_dim
        q = self.q(x_BLD).view(B, L, self.n_head, h)
        k = self.k(x_BLD).view(B, L, self.n_kv_head, h)
        v = self.v(x_BLD).view(B, L, self.n_kv_head, h).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        start = cache[0].shape[2] if cache else 0
        cos, sin = rope_tables(h, torch.arange(start, start + L, device=x_BLD.device), self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = True
        if cache is not None:
            if cache:
                if L != 1:
                    raise ValueError("a KV cache with earlier tokens takes one new token per forward")
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
                causal = False
            cache[:] = [k, v]
        if self.n_kv_head != self.n_head:
            r = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, self.n_head * h)))


class SwiGLUFFN(nn.Module):
    """``proj(silu(fc(x)) * up(x))``, no biases (Llama's gate/up/down projections)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.proj = nn.Linear(d_ff, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.silu(self.fc(x)) * self.up(x)))
