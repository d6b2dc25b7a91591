"""Which split each document of a streamed corpus goes to: by a hash of its index alone, so the same
files in the same order give the same splits on any machine and with any number of workers; and the
writer that routes tokenised documents to the split files and counts them."""

from __future__ import annotations

import numpy as np

SPLIT_SALT = 0x5D2A_3B1C_9E37_79B9  # fixes the document -> split assignment; changing it reshuffles splits


def split_of_documents(first_index: int, n: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Split codes (0 train, 1 val, 2 test) of documents ``first_index .. first_index + n - 1`` by a hash of
    the index alone: u = SplitMix64(index ^ SPLIT_SALT) / 2**64; val if u < val_fraction, test if
    u < val_fraction + test_fraction, else train."""
    x = (np.arange(first_index, first_index + n, dtype=np.uint64) ^ np.uint64(SPLIT_SALT)) + np.uint64(
        0x9E3779B97F4A7C15
    )
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.where(u < val_fraction, 1, np.where(u < val_fraction + test_fraction, 2, 0)).astype(np.int8)


class SplitWriter:
    """Routes tokenised documents to the split files and counts them."""

    def __init__(self, handles: dict, val_fraction: float, test_fraction: float):
        self.handles = handles  # split code -> open file
        self.fractions = (val_fraction, test_fraction)
        self.docs = [0, 0, 0]
        self.tokens = [0, 0, 0]
        self.open_split: int | None = None  # split of a document continued in the next task

    def add(self, tokens: np.ndarray, lengths: np.ndarray, continues: bool, closes: bool) -> None:
        n = len(lengths)
        if n == 0:
            return
        codes = np.empty(n, dtype=np.int8)
        start = 0
        if continues and self.open_split is not None:
            codes[0] = self.open_split
            start = 1
        new = n - start
        if new:
            index = sum(self.docs)
            codes[start:] = split_of_documents(index, new, *self.fractions)
            # small corpora: a document hashed to train goes to val, then test, while those are empty (and
            # train is not), so three documents are enough for three non-empty splits
            for i in range(start, n):
                c = int(codes[i])
                if c == 0 and self.docs[0]:
                    if self.fractions[0] > 0 and not self.docs[1]:
                        c = 1
                    elif self.fractions[1] > 0 and not self.docs[2]:
                        c = 2
                    codes[i] = c
                self.docs[c] += 1
                if all(self.docs[s] or not (s == 0 or self.fractions[s - 1] > 0) for s in range(3)):
                    # nothing left to fill: count the rest at once
                    rest = codes[i + 1 :]
                    for s in range(3):
                        self.docs[s] += int((rest == s).sum())
                    break
        self.open_split = None if closes else int(codes[-1])
        if (codes == codes[0]).all():
            self._write(int(codes[0]), tokens)
            return
        per_token = np.repeat(codes, lengths)
        for s in range(3):
            part = tokens[per_token == s]
            if len(part):
                self._write(s, part)

    def _write(self, split: int, tokens: np.ndarray) -> None:
        if len(tokens):
            self.handles[split].write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
            self.tokens[split] += len(tokens)
