"""One canonical global name per expert parameter, whatever backend or expert-parallel rank holds it.

Expert ``e``'s weight ``w1`` is ``w1#5`` for ``e = 5``, relative to the MoE layer's ``experts`` module (the
backend); in a model, ``blocks.3.ffn.experts.w1#5``. The portable checkpoint copy is keyed by these names
and the consolidated state (evaluation, export) is assembled from them, so no checkpoint code parses
a backend's parameter names. Each backend layout maps its parameters to them (``global_names()``) and back:

- stacked (``local``, ``GroupedExperts``): ``w1`` of shape ``[E, D, F]`` holds ``w1#0`` ... ``w1#{E-1}``,
  expert ``e`` at index ``e`` along dim 0 (``stacked_names`` / ``to_stacked``);
- per expert (``deepspeed``, ``megablocks``: DeepSpeed's ``MoE``): ``deepspeed_moe.experts.deepspeed_experts.{j}.w1``
  on the rank holding global experts ``ids`` is ``w1#{ids[j]}`` (``per_expert_names``); DeepSpeed's
  per-expert checkpoint files hold one global expert each (``from_per_expert_file``).

Parameters that belong to no single expert keep their own names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

SEP = "#"
PER_EXPERT = "deepspeed_moe.experts.deepspeed_experts"

# local parameter name -> [(global name, index along dim 0, or None for the whole tensor)]
GlobalNames = dict[str, list[tuple[str, int | None]]]


def global_name(param: str, expert: int) -> str:
    return f"{param}{SEP}{expert}"


def stacked_names(module: nn.Module) -> GlobalNames:
    """The stacked layout: every parameter of ``module`` itself is ``[E, ...]``, one slice per global expert."""
    return {
        name: [(global_name(name, e), e) for e in range(p.shape[0])]
        for name, p in module.named_parameters(recurse=False)
    }


def to_stacked(state: dict[str, Tensor], num_experts: int) -> dict[str, Tensor]:
    """Global names back to the stacked layout: ``w1#0`` ... ``w1#{E-1}`` -> ``w1`` ``[E, ...]``."""
    params = sorted({key.rsplit(SEP, 1)[0] for key in state})
    return {w: torch.stack([state[global_name(w, e)] for e in range(num_experts)]) for w in params}


def per_expert_names(experts: nn.ModuleList, expert_ids: Sequence[int]) -> GlobalNames:
    """The per-expert layout: module ``j`` of ``experts`` is global expert ``expert_ids[j]``."""
    return {
        f"{PER_EXPERT}.{j}.{w}": [(global_name(w, expert_ids[j]), None)]
        for j, expert in enumerate(experts)
        for w, _ in expert.named_parameters()
    }


def from_per_expert_file(state: dict[str, Tensor], expert: int) -> dict[str, Tensor]:
    """DeepSpeed's checkpoint file of global expert ``expert`` (full module names) as global names;
    KeyError names a key that is no per-expert parameter."""
    out = {}
    for key, value in state.items():
        _, marker, rest = key.partition(f".{PER_EXPERT}.")
        if not marker:
            raise KeyError(key)
        out[global_name(rest.split(".", 1)[1], expert)] = value
    return out


class GlobalNaming:
    """For a backend: its state under the global names. A backend defines ``global_names()``."""

    def global_names(self) -> GlobalNames:
        raise NotImplementedError

    def _global_views(self) -> dict[str, Tensor]:
        params = dict(self.named_parameters())
        return {
            g: params[local] if index is None else params[local][index]
            for local, names in self.global_names().items()
            for g, index in names
        }

    def global_state_dict(self) -> dict[str, Tensor]:
        """``{global name: tensor}`` for the experts this backend holds (all of them for ``local``)."""
        return {g: t.detach() for g, t in self._global_views().items()}

    @torch.no_grad()
    def load_global_state_dict(self, state: dict[str, Tensor]) -> None:
        """Set the experts this backend holds from ``{global name: tensor}`` (may hold other experts too)."""
        views = self._global_views()
        missing = sorted(set(views) - set(state))
        if missing:
            raise KeyError(f"no value for expert parameter(s) {', '.join(missing[:4])}")
        for g, t in views.items():
            t.copy_(state[g])
