"""Token dispatchers: how routed rows reach the experts and come back, one class per strategy.

``dispatch(x_TD, ids_TK) -> (rows_ND, counts_E, plan)`` hands the experts their rows sorted by (local)
expert; ``combine(ys_ND, weights_TK, plan, num_out) -> y_TD`` weights each slot and sums it into its
token's row. ``routed(dispatcher, compute, ...)`` is the two around an expert computation.
- ``local.LocalDispatcher``: every expert in this process (sort, gather; weight, scatter-add);
- ``ragged.RaggedDispatcher``: experts sharded over ranks, variable-size all-to-all, no padding;
- ``deepspeed.RoutedGate``: DeepSpeed's padded/capacity ``MOELayer``, fed our routing through its gate.
"""

from .local import LocalDispatcher, Sorted, fold_rows, routed
from .ragged import RaggedDispatcher

__all__ = ["LocalDispatcher", "RaggedDispatcher", "Sorted", "fold_rows", "routed"]
