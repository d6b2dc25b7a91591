"""Grouped experts: the local experts' weights stacked ``[E_local, D, F]``, one initialisation.

Shape suffixes: T tokens, D model width, F expert hidden width, E experts, N expert-sorted rows.

``GroupedExperts`` owns the weights (``w1``, ``w3``: ``[E, D, F]``; ``w2``: ``[E, F, D]``) and computes the
experts on rows sorted by expert (``compute``) with a kernel from ``kernels.py``; how rows get there is a
dispatcher's business (``dispatch/``). Every expert, whichever backend, process or expert-parallel layout
holds it, starts from ``init_expert`` of its global id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..configtools import check_choice, check_positive
from . import kernels
from .global_names import GlobalNames, GlobalNaming, stacked_names

ACTIVATIONS = ("gelu", "swiglu")
EXPERT_INITS = ("dense", "fan_in")


@dataclass
class ExpertSpec:
    num_experts: int
    d_model: int
    d_ff: int
    activation: str = "gelu"
    init_std: float = 0.02
    """Std of the input matrices (w1, w3) at initialisation: the dense FFN's (GPT-2's) 0.02."""
    out_init_std: float = 0.02
    """Std of the output matrix w2; the model passes the dense FFN's residual scaling 0.02/sqrt(2 n_layer)."""
    init: str = "dense"
    """'dense': Normal(0, init_std) inputs and Normal(0, out_init_std) outputs, as the dense FFN; 'fan_in':
    Normal(0, 1/fan_in) for every matrix (1/sqrt(D) in, 1/sqrt(F) out), the project's rule before 5a0b4d4."""

    def validate(self, prefix: str = "moe") -> None:
        check_positive(f"{prefix}.num_experts", self.num_experts)
        check_positive(f"{prefix}.d_ff", self.d_ff)
        check_choice(f"{prefix}.activation", self.activation, ACTIVATIONS)
        check_choice(f"{prefix}.expert_init", self.init, EXPERT_INITS)


def init_expert(spec: ExpertSpec, base_seed: int, expert: int) -> dict:
    """Initial weights of global expert ``expert``, from its own generator: the same whichever backend,
    process or expert-parallel layout holds it (so ep=1 and ep=2 runs start identical).

    ``spec.init`` 'dense' (default): Normal(0, init_std) inputs and Normal(0, out_init_std) outputs, as the
    dense FFN is initialised, so an MoE-vs-dense comparison compares architectures, not initialisations.
    'fan_in': std 1/sqrt(fan_in) (the rule before 5a0b4d4; the MoE output then starts ~25x the dense FFN's).
    Both draw the same standard normals in the same order: only the scale differs."""
    g = torch.Generator().manual_seed((base_seed * 1_000_003 + expert) % (1 << 63))
    D, Fh = spec.d_model, spec.d_ff
    if spec.init == "fan_in":
        std_in, std_out = 1 / math.sqrt(D), 1 / math.sqrt(Fh)
    else:
        std_in, std_out = spec.init_std, spec.out_init_std
    w = {
        "w1": torch.randn(D, Fh, generator=g) * std_in,
        "w2": torch.randn(Fh, D, generator=g) * std_out,
    }
    if spec.activation == "swiglu":
        w["w3"] = torch.randn(D, Fh, generator=g) * std_in
    return w


def draw_base_seed() -> int:
    """One draw from the global RNG (so seeding the run seeds the experts)."""
    return int(torch.randint(1 << 62, (), device="cpu"))  # the CPU stream even under a meta-device init


class GroupedExperts(GlobalNaming, nn.Module):
    """2-layer FFN experts (GELU, or SwiGLU with a third matrix), weights stacked per expert.

    ``kernel``: ``auto`` or one of ``kernels.KERNELS`` (``model.moe.backend_impl``)."""

    def __init__(self, spec: ExpertSpec, kernel: str = "auto"):
        super().__init__()
        self.spec = spec
        self.kernel = kernel
        base = draw_base_seed()
        inits = [init_expert(spec, base, e) for e in range(spec.num_experts)]
        self.w1 = nn.Parameter(torch.stack([w["w1"] for w in inits]))
        self.w2 = nn.Parameter(torch.stack([w["w2"] for w in inits]))
        self.w3 = nn.Parameter(torch.stack([w["w3"] for w in inits])) if spec.activation == "swiglu" else None

    def resolved_kernel(self, device: torch.device) -> str:
        return kernels.resolve(self.kernel, device)

    def compute(self, xs_ND: Tensor, counts_E: Tensor) -> Tensor:
        """The experts on rows sorted by expert, ``counts_E`` rows each."""
        return kernels.run(self.kernel, xs_ND, counts_E, self.w1, self.w2, self.w3)

    def expert(self, x_ND: Tensor, e: int) -> Tensor:
        return kernels.ffn(x_ND, self.w1[e], self.w2[e], None if self.w3 is None else self.w3[e])

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token: ``out_TED`` (CompeteSMoE's competition, diagnostics)."""
        return kernels.all_experts(x_TD, self.w1, self.w2, self.w3)

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def global_names(self) -> GlobalNames:
        """``w1`` ``[E, D, F]`` holds ``w1#0`` ... ``w1#{E-1}`` (``global_names.py``)."""
        return stacked_names(self)

    def flops_per_slot(self) -> int:
        """Forward FLOPs of one expert on one token (multiply-add = 2)."""
        mats = 3 if self.w3 is not None else 2
        return 2 * mats * self.spec.d_model * self.spec.d_ff
