"""MegaBlocks' dropless grouped expert computation (CUDA only), driven by our routers.

**Unverified on a GPU**: this machine has no CUDA; the code follows MegaBlocks 0.10's documented
interface and ``tests/test_megablocks_gpu.py`` (marked ``gpu``) compares it with the local backend.
Until someone runs those tests on a GPU, treat this backend as untested.

MegaBlocks' ``ParallelDroplessMLP.forward(x, scores, expert_weights, top_experts)`` takes the routing
as arguments, so our router's decision is passed straight in. Its own load-balancing loss (kept in a
module-level list) is disabled (``moe_loss_weight=0``): our routers compute their losses themselves.

Weight layout: MegaBlocks stores ``w1``/``w2`` (and ``v1`` for GLU) as ``[E * F, D]`` and computes
``act(x @ w1[e].T) @ w2[e]``; our stacked layout is ``w1[e] = mb_w1[e].T`` and ``w2[e] = mb_w2[e]``,
``w3[e] = mb_v1[e].T``. ``to_local_layout`` / ``load_local_layout`` convert.

Expert parallelism (``ep_size > 1``) is not wired yet: MegaBlocks scales expert gradients by 1/ep
itself, which double-scales under DeepSpeed's expert-gradient averaging, and its parameters must be
owned by a registered DeepSpeed MoE to be checkpointed per EP rank. Until that is done, selecting
``ep_size > 1`` with this backend is an error that points to ``backend=deepspeed``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...configtools import ConfigError
from .base import ExpertSpec, draw_base_seed, init_expert
from .local import fold_rows


class MegaBlocksBackend(nn.Module):
    def __init__(self, spec: ExpertSpec, ep_size: int = 1, **_):
        super().__init__()
        spec.validate()
        if not torch.cuda.is_available():
            raise ConfigError("config field 'model.moe.backend': 'megablocks' needs a CUDA GPU (its kernels have no "
                              "CPU implementation); use backend 'local' or 'deepspeed' on this machine")
        if ep_size > 1:
            raise ConfigError("config field 'model.moe.ep_size': expert parallelism with backend 'megablocks' is not "
                              "implemented yet; use backend 'deepspeed' for ep_size > 1")
        try:
            from megablocks.layers.arguments import Arguments
            from megablocks.layers.dmoe import ParallelDroplessMLP
        except ImportError as e:
            raise ConfigError(f"backend 'megablocks' needs MegaBlocks and grouped_gemm ({e}); install them with "
                              f"`pip install -r requirements-megablocks.txt --no-build-isolation` (see README)") from None
        self.spec = spec
        glu = spec.activation == "swiglu"
        args = Arguments(hidden_size=spec.d_model, ffn_hidden_size=spec.d_ff, moe_num_experts=spec.num_experts,
                         moe_top_k=1, mlp_type="glu" if glu else "mlp", mlp_impl="grouped",
                         activation_fn=F.silu if glu else F.gelu, bias=False, return_bias=False, moe_loss_weight=0.0,
                         device=torch.cuda.current_device())
        self.args = args
        self.dmlp = ParallelDroplessMLP(args)
        base = draw_base_seed()
        self.load_local_layout({k: torch.stack([init_expert(spec, base, e)[k] for e in range(spec.num_experts)])
                                for k in (("w1", "w2", "w3") if glu else ("w1", "w2"))})

    # -- layout conversion ------------------------------------------------------------------------
    def to_local_layout(self) -> dict:
        E, Fh, D = self.spec.num_experts, self.spec.d_ff, self.spec.d_model
        mlp = self.dmlp.mlp
        out = {"w1": mlp.w1.view(E, Fh, D).transpose(1, 2), "w2": mlp.w2.view(E, Fh, D)}
        if hasattr(mlp, "v1"):
            out["w3"] = mlp.v1.view(E, Fh, D).transpose(1, 2)
        return out

    @torch.no_grad()
    def load_local_layout(self, weights: dict) -> None:
        E, Fh, D = self.spec.num_experts, self.spec.d_ff, self.spec.d_model
        mlp = self.dmlp.mlp
        mlp.w1.copy_(weights["w1"].transpose(1, 2).reshape(E * Fh, D))
        mlp.w2.copy_(weights["w2"].reshape(E * Fh, D))
        if "w3" in weights:
            mlp.v1.copy_(weights["w3"].transpose(1, 2).reshape(E * Fh, D))

    # -- backend interface ------------------------------------------------------------------------
    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, num_out: Optional[int] = None) -> Tensor:
        K = ids_TK.shape[1]
        self.args.moe_top_k = K  # MegaBlocks reads top-k from its arguments; ours varies per call
        if hasattr(self.dmlp, "top_k"):
            self.dmlp.top_k = K
        scores = torch.zeros(x_TD.shape[0], self.spec.num_experts, device=x_TD.device, dtype=x_TD.dtype)
        out = self.dmlp(x_TD.unsqueeze(1), scores, weights_TK.to(x_TD.dtype), ids_TK)
        y_TD = (out[0] if isinstance(out, tuple) else out).view_as(x_TD)
        return fold_rows(y_TD, num_out or x_TD.shape[0])

    def forward_all(self, x_TD: Tensor) -> Tensor:
        T, E = x_TD.shape[0], self.spec.num_experts
        ids = torch.arange(E, device=x_TD.device).repeat_interleave(T).unsqueeze(-1)
        y = self.forward(x_TD.repeat(E, 1), ids, torch.ones_like(ids, dtype=x_TD.dtype))
        return y.view(E, T, -1).transpose(0, 1)

    def params_per_expert(self) -> int:
        return sum(p.numel() for p in self.dmlp.parameters()) // self.spec.num_experts
