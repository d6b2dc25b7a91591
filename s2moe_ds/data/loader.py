"""Fixed-length training windows, sampled as a pure function of (seed, step, global micro-batch index).

No iterator state: resuming at step s draws exactly the windows an uninterrupted run would; each
data-parallel rank and accumulation micro-step draws its own windows, and the same global batch comes
out of 2 processes x 1 micro-step as of 1 process x 2 micro-steps. Evaluation walks a split in consecutive, non-overlapping windows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .errors import DataError


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

    def sequential_batches(self, batch_size: int) -> list[np.ndarray]:
        """The window starts of the walk: non-overlapping windows covering the split, in batches (the last
        one possibly short)."""
        starts = np.arange(0, len(self.tokens) - self.context - 1, self.context)
        return [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]

    def sequential(
        self, batch_size: int, max_batches: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering the split, batched; rank r takes every world-th batch."""
        batches = self.sequential_batches(batch_size)
        if max_batches:
            batches = batches[:max_batches]
        for b in batches[rank::world]:
            yield self._gather(b)

    def walk_prefix(self, batch_size: int, batches: int, rank: int, world: int):
        """The first ``batches`` full batches of the walk per rank, rank r taking every world-th one: every
        rank runs the same number of same-shaped batches (expert parallelism exchanges tokens at each
        forward). A split too short for one full batch per rank gives every rank its first batch."""
        walk = self.sequential_batches(batch_size)
        full = [b for b in walk if len(b) == batch_size]
        per_rank = min(batches, len(full) // world)
        if per_rank == 0:
            yield self._gather(walk[0])
            return
        for b in full[: per_rank * world][rank::world]:
            yield self._gather(b)
