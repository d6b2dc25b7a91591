"""The thin DeepSpeed ``MoE`` the engine needs: expert-parallel groups, gradients, per-expert files.

The backends ``deepspeed`` and ``megablocks`` *are* a ``deepspeed.moe.layer.MoE`` (the only thing the engine
recognises): so the engine creates the ``ep_size_{N}`` groups, reduces expert gradients over the
expert-data-parallel group, puts expert parameters in their own ZeRO groups, and writes one checkpoint
file per global expert. That is also why the local experts stay DeepSpeed's per-expert modules
(``deepspeed_moe.experts.deepspeed_experts.{j}.w1``) rather than one stacked ``[E_local, D, F]`` tensor:
the per-expert checkpoint files and ZeRO's expert optimizer state are laid out per module.
How tokens travel (``ep_mode``) is a dispatcher's:
- ``dropless`` (default) / ``capacity``: DeepSpeed's own padded ``MOELayer`` fed our routing through
  ``dispatch/deepspeed.py``'s ``RoutedGate`` (capacity agreed across the group; ``capacity`` drops overflow);
- ``ragged``: no capacity and no padding: ``dispatch/ragged.py``'s variable-size all-to-all; DeepSpeed's
  ``MOELayer`` is bypassed, its groups, gradient reduction and checkpoint files are not. ``kernel`` picks
  the local expert computation from ``kernels.py``: ``loop`` (CPU default), ``grouped_mm`` (CUDA default)
  or ``gmm`` (MegaBlocks' grouped GEMM, the ``megablocks`` backend).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import kernels
from .dispatch import RaggedDispatcher, fold_rows, routed
from .dispatch.deepspeed import RoutedGate
from .experts import ExpertSpec, draw_base_seed, init_expert
from .global_names import GlobalNames, GlobalNaming, per_expert_names


class ExpertFFN(nn.Module):
    """One expert: 2-layer FFN (GELU) or SwiGLU. DeepSpeed deep-copies it once per local expert."""

    def __init__(self, spec: ExpertSpec):
        super().__init__()
        D, Fh = spec.d_model, spec.d_ff
        # values come from init_expert (per global expert); allocate without touching the global RNG
        self.w1 = nn.Parameter(torch.empty(D, Fh))
        self.w2 = nn.Parameter(torch.empty(Fh, D))
        self.w3 = nn.Parameter(torch.empty(D, Fh)) if spec.activation == "swiglu" else None

    def forward(self, x: Tensor) -> Tensor:
        return kernels.ffn(x, self.w1, self.w2, self.w3)


def _moe_base():
    from deepspeed.moe.layer import MoE

    return MoE


class DeepSpeedEPBackend(GlobalNaming, _moe_base()):
    """A ``deepspeed.moe.layer.MoE`` whose gate is driven by our router (see the module docstring)."""

    def __init__(
        self,
        spec: ExpertSpec,
        ep_size: int = 1,
        mode: str = "dropless",
        capacity_factor: float = 1.25,
        min_capacity: int = 4,
        kernel: str = "auto",
    ):
        """``mode`` and ``kernel``: see the module docstring; the options are checked with the config
        (``backends/config.py``), not here."""
        base = draw_base_seed()
        rng = torch.get_rng_state()  # DeepSpeed builds a TopKGate we replace: keep the global stream as local's
        super().__init__(
            hidden_size=spec.d_model,
            expert=ExpertFFN(spec),
            num_experts=spec.num_experts,
            ep_size=ep_size,
            k=1,
            drop_tokens=mode == "capacity",
        )
        torch.set_rng_state(rng)
        self.spec = spec
        self.mode = mode
        self.kernel = kernel
        self.deepspeed_moe.gate = RoutedGate(spec.num_experts, mode, capacity_factor, min_capacity)
        # DeepSpeed deep-copies one expert: give each global expert its own initial weights instead.
        # DeepSpeed's expert-parallel rank is rank % ep_size (checked in set_deepspeed_parallelism).
        self._assumed_ep_rank = dist.get_rank() % ep_size if dist.is_initialized() else 0
        for j, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            init = init_expert(spec, base, self._assumed_ep_rank * self.num_local_experts + j)
            with torch.no_grad():
                for name, value in init.items():
                    getattr(expert, name).copy_(value)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        actual = dist.get_rank(self.deepspeed_moe.ep_group) if dist.is_initialized() else 0
        if actual != self._assumed_ep_rank:
            raise RuntimeError(
                f"expert-parallel rank {actual} differs from the {self._assumed_ep_rank} assumed when "
                f"initialising the experts (use_data_before_expert_parallel is not supported)"
            )

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, num_out: int | None = None) -> Tensor:
        if self.ep_size > 1 and self.deepspeed_moe.ep_group is None:
            raise RuntimeError(
                "expert-parallel groups are not set up: wrap the model with deepspeed.initialize "
                "(or call set_deepspeed_parallelism()) before the first forward"
            )
        if self.mode == "ragged":
            group = self.deepspeed_moe.ep_group if self.ep_size > 1 else None
            return routed(RaggedDispatcher(self.num_experts, group), self.compute, x_TD, ids_TK, weights_TK, num_out)
        self.deepspeed_moe.gate.set_routing(ids_TK, weights_TK, num_out)
        y_TD = self.deepspeed_moe(x_TD, None)
        return fold_rows(y_TD, num_out or x_TD.shape[0])

    def resolved_kernel(self, device: torch.device) -> str:
        return kernels.resolve(self.kernel, device)

    def compute(self, xs_ND: Tensor, counts_L: Tensor) -> Tensor:
        """This rank's experts on rows sorted by local expert (``counts_L`` rows each); the grouped
        kernels stack the per-expert weights once per call (gradients flow back to each)."""
        experts = self.deepspeed_moe.experts.deepspeed_experts
        w3 = [e.w3 for e in experts] if self.spec.activation == "swiglu" else None
        return kernels.run(self.kernel, xs_ND, counts_L, [e.w1 for e in experts], [e.w2 for e in experts], w3)

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every expert on every token in one dispatch: token t is replicated once per expert."""
        T, E = x_TD.shape[0], self.num_experts
        x_rep = x_TD.repeat(E, 1)
        ids = torch.arange(E, device=x_TD.device).repeat_interleave(T).unsqueeze(-1)
        y = self.forward(x_rep, ids, torch.ones_like(ids, dtype=x_TD.dtype))
        return y.view(E, T, x_TD.shape[1]).transpose(0, 1)

    def params_per_expert(self) -> int:
        return sum(p.numel() for p in self.deepspeed_moe.experts.deepspeed_experts[0].parameters())

    def dropped_slots(self) -> int | None:
        """Routed slots the last dispatch dropped (capacity mode, this rank); None in dropless modes."""
        return self.deepspeed_moe.gate.dropped if self.mode == "capacity" else None

    def local_expert_ids(self) -> range:
        """The global experts this rank holds; before the engine creates the groups, those the experts were
        initialised as (``set_deepspeed_parallelism`` checks the two agree)."""
        group = self.deepspeed_moe.ep_group
        rank = dist.get_rank(group) if group is not None else self._assumed_ep_rank
        n = self.num_local_experts
        return range(rank * n, (rank + 1) * n)

    def global_names(self) -> GlobalNames:
        """``deepspeed_moe.experts.deepspeed_experts.{j}.w1`` is ``w1#{e}`` for this rank's j-th expert e
        (``global_names.py``)."""
        return per_expert_names(self.deepspeed_moe.experts.deepspeed_experts, self.local_expert_ids())
