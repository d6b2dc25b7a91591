"""The MoE feed-forward layer: a router from the registry, an expert backend, one dispatch.

Shape suffixes: T tokens, D model width, K routed slots per token.

forward(x):
  1. flatten ``x`` to tokens ``x_TD``;
  2. the router picks K (expert, weight) slots per token (k = ``moe.k`` in training, the layer's
     ``inference_k`` in evaluation: ``moe.eval_k`` unless ``set_inference`` changed it), returning its
     auxiliary losses and metrics;
  3. the backend runs the routed slots (or the router already did: CompeteSMoE competition);
  4. return the output with the router's losses and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..configtools import ConfigError, check_choice, check_positive, check_range, fail
from .backends import BACKENDS, BackendConfig, ExpertSpec, backend_entry, build_backend
from .experts import ACTIVATIONS, EXPERT_INITS
from .routers import ROUTERS, RouterConfig, RouterOutput, build_router, parse_router_config
from .routers.base import EVAL_WEIGHTS

PATHWAYS = ("clean", "both")


@dataclass
class S2MoEConfig:
    """S2MoE: the same SMoE on the input and on a Gaussian-noise copy, mixed by a learned gate."""

    enabled: bool = False
    """Wrap the MoE layer in S2MoE's two pathways."""
    noise: str = "fixed"
    """'fixed' sigmas, or 'learnable' per-feature log-sigmas (reparameterised sampling)."""
    sigma1: float = 0.1
    """Std of the multiplicative noise N1 ~ Normal(1, sigma1^2) (project default)."""
    sigma2: float = 0.1
    """Std of the additive noise N2 ~ Normal(0, sigma2^2) (project default)."""
    uncertainty_coef: float = 0.1
    """beta: weight of the uncertainty loss L_u (InfoNCE, plus the noise-level term with learnable noise;
    project default 0.1)."""
    target_similarity: float = 0.99
    """Learnable noise only: the mean cosine between a token and its noisy copy that L_u's noise-level
    term holds the noise at (0.99 is what the default fixed sigmas give on LayerNorm outputs, so the
    learnable ablation starts from and stays at the fixed noise's size; InfoNCE decides its shape)."""
    noise_target_coef: float = 1.0
    """Learnable noise only: weight, inside L_u, of the noise-level term
    ``(log(1 - mean cos(x, x_hat)) - log(1 - target_similarity))^2``."""
    gate: str = "learned"
    """'learned': ``g = sigmoid(Linear(D, 1)(x))`` per token; 'fixed': ``g = gate_value`` (an ablation)."""
    gate_value: float = 0.5
    """The constant gate with ``gate: fixed``."""
    temperature: float = 0.1
    """tau: InfoNCE temperature over cosine similarities (project default 0.1)."""
    uncertainty_on: str = "inputs"
    """Take InfoNCE on the pathway 'inputs' (x, x_hat; default) or on the pathway 'outputs'."""
    num_negatives: int = 64
    """Negatives per anchor, sampled from the micro-batch's other noisy tokens; 0 uses all tokens (all
    pairs: O(T^2 D), more than the experts cost at a few thousand tokens; measured in docs/benchmarks.md)."""
    inference: str = "clean"
    """At evaluation: 'clean' runs the clean pathway only; 'both' samples noise and mixes both (the
    layer's default; ``set_inference`` changes it on the layer)."""
    fused_dispatch: bool = True
    """Route and dispatch both pathways together (one all-to-all per layer). False dispatches them
    separately; only useful to measure what fusing saves (benchmarks/bench_expert_parallel.py)."""

    def validate(self, prefix: str = "moe.s2moe") -> None:
        check_choice(f"{prefix}.noise", self.noise, ("fixed", "learnable"))
        check_positive(f"{prefix}.sigma1", self.sigma1, allow_zero=self.noise == "fixed")
        check_positive(f"{prefix}.sigma2", self.sigma2, allow_zero=self.noise == "fixed")
        check_positive(f"{prefix}.uncertainty_coef", self.uncertainty_coef, allow_zero=True)
        if not 0 < self.target_similarity < 1:
            fail(f"{prefix}.target_similarity", f"must be in (0, 1), got {self.target_similarity!r}")
        check_positive(f"{prefix}.noise_target_coef", self.noise_target_coef, allow_zero=True)
        check_choice(f"{prefix}.gate", self.gate, ("learned", "fixed"))
        check_range(f"{prefix}.gate_value", self.gate_value, 0.0, 1.0)
        check_positive(f"{prefix}.temperature", self.temperature)
        check_choice(f"{prefix}.uncertainty_on", self.uncertainty_on, ("inputs", "outputs"))
        check_positive(f"{prefix}.num_negatives", self.num_negatives, allow_zero=True)
        check_choice(f"{prefix}.inference", self.inference, PATHWAYS)


@dataclass
class MoEConfig:
    num_experts: int = 8
    """Experts per MoE layer."""
    k: int = 2
    """Experts per token in training (per pathway under S2MoE)."""
    eval_k: int = 0
    """Experts per token at evaluation/inference; 0 means the same as ``k`` (the layer's default;
    ``set_inference`` changes it on the layer)."""
    eval_weights: str = "train"
    """Combine weights at evaluation: 'train' applies the router's training rule (``router_args.weights``)
    at any eval_k, so a top-2-trained model at top-1 gives its expert weight 1 and an S2MoE model trained
    at top-1 keeps full-softmax probabilities at top-2; 'per_k' is the old convention (full-softmax
    probability at k=1, softmax over the selected at k >= 2), kept to reproduce earlier numbers."""
    d_ff: int = 0
    """Expert hidden width; 0 means 4 x d_model."""
    activation: str = "gelu"
    """Expert activation: 'gelu' (2 matrices) or 'swiglu' (3 matrices)."""
    num_shared_experts: int = 0
    """Always-on experts beside the routed ones (DeepSeekMoE): every token goes through them and their output
    is added to the routed experts'; held as one bias-free FFN of ``num_shared_experts x d_ff`` width with the
    experts' activation, replicated on every rank. Under S2MoE both pathways run them (they are part of the
    SMoE f)."""
    expert_init: str = "dense"
    """Expert weights at initialisation: 'dense' (as the dense FFN: std 0.02 in, 0.02/sqrt(2 n_layer) out)
    or 'fan_in' (std 1/sqrt(fan_in) for every matrix: the rule before commit 5a0b4d4, kept for the tuning
    sweep and to reproduce older runs)."""
    router: str = "smoe"
    """Router name: one of the registry's (smoe, xmoe, stablemoe, competesmoe, vqmoe)."""
    router_args: dict = field(default_factory=dict)
    """Fields of the chosen router's config dataclass (see ``s2moe_ds/moe/routers``)."""
    backend: str = "local"
    """Expert backend: 'local' (dropless, one process holds every expert), 'deepspeed' (DeepSpeed's
    expert-parallel MoE: experts sharded over ``ep_size`` ranks, all-to-all), 'megablocks' (CUDA only:
    ragged expert parallelism with MegaBlocks' grouped GEMM; checkpoints shared with 'deepspeed')."""
    backend_impl: str = "auto"
    """Local expert computation: auto, loop, grouped_mm, padded_bmm, reference (backend 'local');
    auto, loop, grouped_mm (backend 'deepspeed' with ep_mode 'ragged')."""
    ep_size: int = 1
    """Expert-parallel size for the 'deepspeed'/'megablocks' backends: ranks sharing one layer's experts.
    Must divide num_experts and the world size (checked where the world size is known)."""
    ep_mode: str = "dropless"
    """Backend 'deepspeed': 'dropless' (capacity = the largest expert load in the group, nothing dropped,
    buffers padded to it), 'capacity' (capacity_factor x K x tokens / E per expert, overflow dropped) or
    'ragged' (no capacity, no padding: variable-size all-to-all). Backend 'megablocks' is always ragged."""
    capacity_factor: float = 1.25
    """Expert capacity multiplier in 'capacity' mode."""
    min_capacity: int = 4
    """Smallest expert capacity in 'capacity' mode."""
    s2moe: S2MoEConfig = field(default_factory=S2MoEConfig)

    @property
    def inference_k(self) -> int:
        return self.eval_k or self.k

    def router_config(self, prefix: str = "moe.router_args") -> RouterConfig:
        """The router's typed config from ``router_args`` (its rules are checked by ``validate``)."""
        return parse_router_config(self.router, self.router_args, prefix)

    def backend_config(self) -> BackendConfig:
        """The backend's typed config from this section's fields (its rules are checked by ``validate``)."""
        return backend_entry(self.backend).config_cls(
            impl=self.backend_impl,
            ep_size=self.ep_size,
            ep_mode=self.ep_mode,
            capacity_factor=self.capacity_factor,
            min_capacity=self.min_capacity,
        )

    def validate(self, prefix: str = "moe", world_size: int | None = None) -> None:
        """This section's rules, its router's and its backend's; with ``world_size`` the rule that needs it.
        Runs at load (``s2moe_ds.config.validate``), not when layers are built."""
        check_positive(f"{prefix}.num_experts", self.num_experts)
        for name in ("k", "eval_k"):
            value = getattr(self, name)
            if value < (1 if name == "k" else 0) or value > self.num_experts:
                fail(
                    f"{prefix}.{name}",
                    f"must be between {1 if name == 'k' else 0} and num_experts ({self.num_experts}), got {value}",
                )
        check_positive(f"{prefix}.d_ff", self.d_ff, allow_zero=True)
        check_positive(f"{prefix}.num_shared_experts", self.num_shared_experts, allow_zero=True)
        check_choice(f"{prefix}.eval_weights", self.eval_weights, EVAL_WEIGHTS)
        check_choice(f"{prefix}.router", self.router, ROUTERS)
        self.router_config(f"{prefix}.router_args").validate(f"{prefix}.router_args")
        check_choice(f"{prefix}.backend", self.backend, BACKENDS)
        self.backend_config().validate(prefix, self.num_experts, world_size)
        check_choice(f"{prefix}.activation", self.activation, ACTIVATIONS)
        check_choice(f"{prefix}.expert_init", self.expert_init, EXPERT_INITS)
        self.s2moe.validate(f"{prefix}.s2moe")


class SharedExperts(nn.Module):
    """The shared experts as one FFN: ``proj(act(fc(x)))``, SwiGLU ``proj(silu(fc(x)) * up(x))``; no biases."""

    def __init__(self, d_model: int, width: int, activation: str):
        super().__init__()
        self.fc = nn.Linear(d_model, width, bias=False)
        self.up = nn.Linear(d_model, width, bias=False) if activation == "swiglu" else None
        self.proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x_TD: Tensor) -> Tensor:
        h = self.fc(x_TD)
        h = torch.nn.functional.gelu(h) if self.up is None else torch.nn.functional.silu(h) * self.up(x_TD)
        return self.proj(h)


@dataclass
class MoEOutput:
    y: Tensor
    aux_losses: dict
    metrics: dict


class MoELayer(nn.Module):
    def __init__(
        self,
        cfg: MoEConfig,
        d_model: int,
        layer_id: int = 0,
        seed: int = 0,
        out_init_std: float = 0.02,
        vocab_size: int = 0,
    ):
        """``cfg``: checked once, at load (``s2moe_ds.config.validate``); read here, never written.
        ``out_init_std``: std of the experts' output matrices at initialisation (the model passes the
        dense FFN's GPT-2 residual scaling, 0.02 / sqrt(2 n_layer); input matrices use 0.02).
        ``vocab_size``: for routers that route by token id (StableMoE 'two_stage')."""
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.inference_k = cfg.inference_k
        """Experts per token at evaluation (training uses ``cfg.k``); ``set_inference`` changes it."""
        self.inference_pathways = cfg.s2moe.inference
        """S2MoE layers at evaluation: 'clean' (the clean pathway only) or 'both'."""
        self.router = build_router(
            cfg.router,
            cfg.router_config(),
            d_model,
            cfg.num_experts,
            layer_id=layer_id,
            seed=seed,
            train_k=cfg.k,
            eval_weights=cfg.eval_weights,
            vocab_size=vocab_size,
        )
        spec = ExpertSpec(
            cfg.num_experts,
            d_model,
            cfg.d_ff or 4 * d_model,
            cfg.activation,
            out_init_std=out_init_std,
            init=cfg.expert_init,
        )
        self.experts = build_backend(cfg.backend, spec, cfg.backend_config())
        width = cfg.num_shared_experts * spec.d_ff
        self.shared = SharedExperts(d_model, width, cfg.activation) if width else None

    def set_inference(self, k: int | None = None, pathways: str | None = None, weights: str | None = None) -> None:
        """This layer's evaluation top-k, S2MoE pathways ('clean'/'both') and combine-weight convention
        ('train': the training rule; 'per_k': the old convention); None keeps the current one. The config
        is shared by every layer and saved with the run: it is not changed."""
        if k is not None and not 1 <= k <= self.cfg.num_experts:
            raise ConfigError(f"inference top-k must be in [1, {self.cfg.num_experts}], got {k}")
        if pathways is not None and pathways not in PATHWAYS:
            raise ConfigError(f"inference pathways must be 'clean' or 'both', got {pathways!r}")
        if weights is not None and weights not in EVAL_WEIGHTS:
            raise ConfigError(f"inference weights must be 'train' or 'per_k', got {weights!r}")
        self.inference_k = k or self.inference_k
        self.inference_pathways = pathways or self.inference_pathways
        self.router.eval_weights = weights or self.router.eval_weights

    def current_k(self) -> int:
        return self.cfg.k if self.training else self.inference_k

    def route(self, x_TD: Tensor, k: int | None = None) -> RouterOutput:
        return self.router(x_TD, k or self.current_k(), experts=self.experts)

    def dispatch(self, x_TD: Tensor, route: RouterOutput) -> Tensor:
        if route.precomputed_TD is not None:
            return self.with_shared(x_TD, route.precomputed_TD)
        if route.expert_ids_TK.shape[1] == 0:
            return self.with_shared(x_TD, route.extra_TD)
        y_TD = self.experts(x_TD, route.expert_ids_TK, route.weights_TK)
        if route.extra_TD is not None:
            y_TD = y_TD + route.extra_TD
        return self.with_shared(x_TD, y_TD)

    def with_shared(self, x_TD: Tensor, y_TD: Tensor) -> Tensor:
        """The routed output plus the shared experts' (when there are any)."""
        return y_TD if self.shared is None else y_TD + self.shared(x_TD)

    def backend_metrics(self) -> dict:
        """What the expert backend reports about the last dispatch: slots dropped by capacity."""
        dropped = getattr(self.experts, "dropped_slots", lambda: None)()
        return {} if dropped is None else {"dropped_slots": torch.tensor(float(dropped))}

    def forward(self, x: Tensor) -> MoEOutput:
        x_TD = x.reshape(-1, x.shape[-1])
        route = self.route(x_TD)
        y_TD = self.dispatch(x_TD, route)
        return MoEOutput(y_TD.view_as(x), route.aux_losses, {**route.metrics, **self.backend_metrics()})
