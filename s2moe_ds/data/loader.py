"""Fixed-length training windows, sampled as a pure function of (seed, step, global micro-batch index).

No iterator state: resuming at step s draws exactly the windows an uninterrupted run would; each
data-parallel rank and accumulation micro-step draws its own windows, and the same global batch comes
out of 2 processes x 1 micro-step as of 1 process x 2 micro-steps. Evaluation walks a split in consecutive, non-overlapping windows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .tokenizers import DataError


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing), stable across processes and Python runs."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class WindowSampler:
    def __init__(self, tokens: np.ndarray, context: int):
        if len(tokens) <= context + 1:
            raise DataError(
                f"split has {len(tokens)} tokens, fewer than context + 2 ({context + 2}); "
                f"use a smaller model.context or more data"
            )
        self.tokens = tokens
        self.context = context

    def batch(self, batch_size: int, seed: int, step: int, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of micro-batch ``index`` of optimizer step ``step`` (index = micro * world + rank)."""
        g = np.random.default_rng(stream_seed(seed, step, index))
        starts = g.integers(0, len(self.tokens) - self.context - 1, size=batch_size)
        return self._gather(starts)

    def _gather(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(starts)[:, None] + np.arange(self.context + 1)[None, :]
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def sequential(
        self, batch_size: int, max_batches: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering the split, batched; rank r takes every world-th batch."""
        starts = np.arange(0, len(self.tokens) - self.context - 1, self.context)
        batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
        if max_batches:
            batches = batches[:max_batches]
        for b in batches[rank::world]:
            yield self._gather(b)
