"""Backend 'local': every expert in this process, nothing dropped — grouped experts behind the local
dispatcher (``dispatch/local.py``), so every routed slot is computed.

``kernel`` (``model.moe.backend_impl``): ``reference`` (each expert on every token, masked by the routing:
the plain definition the tests compare with) or a kernel of ``kernels.py``; ``auto`` is ``loop`` on CPU and
``grouped_mm`` on CUDA. Without autograd the ``loop`` kernel takes an in-place path whose combine, with one
slot per token, is a permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..dispatch import LocalDispatcher, fold_rows, routed
from ..experts import ExpertSpec, GroupedExperts


class LocalDroplessBackend(GroupedExperts):
    def __init__(self, spec: ExpertSpec, kernel: str = "auto"):
        super().__init__(spec, kernel=kernel)
        self.dispatcher = LocalDispatcher(spec.num_experts)

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, num_out: int | None = None) -> Tensor:
        """``sum_k weights_TK[:, k] * expert[ids_TK[:, k]](x_TD)``, folded into ``num_out`` rows
        (``dispatch/local.py``)."""
        kernel = self.resolved_kernel(x_TD.device)
        weights_TK = weights_TK.to(x_TD.dtype)
        num_out = num_out or x_TD.shape[0]
        if kernel == "reference":
            return fold_rows(self._reference(x_TD, ids_TK, weights_TK), num_out)
        if kernel == "loop" and not torch.is_grad_enabled():
            return self._loop_inference(x_TD, ids_TK, weights_TK, num_out)
        return routed(self.dispatcher, self.compute, x_TD, ids_TK, weights_TK, num_out)

    def _reference(self, x_TD, ids_TK, weights_TK):
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.spec.num_experts):
            gate_T = (weights_TK * (ids_TK == e)).sum(-1)
            y_TD = y_TD + gate_T.unsqueeze(-1) * self.expert(x_TD, e)
        return y_TD

    @torch.no_grad()
    def _loop_inference(self, x_TD, ids_TK, weights_TK, num_out):
        """With one slot per token the combine is a permutation (index_copy), not a zero-fill + index_add."""
        xs_ND, counts_E, s = self.dispatcher.dispatch(x_TD, ids_TK)
        ys_ND = kernels.loop_inference(xs_ND, counts_E, self.w1, self.w2, self.w3)
        ys_ND.mul_(weights_TK.reshape(-1)[s.order].unsqueeze(-1))
        dest_N = s.destinations(num_out)
        if ids_TK.shape[1] == 1 and num_out == len(xs_ND):
            return torch.empty_like(ys_ND).index_copy_(0, dest_N, ys_ND)
        return ys_ND.new_zeros(num_out, ys_ND.shape[1]).index_add_(0, dest_N, ys_ND)
