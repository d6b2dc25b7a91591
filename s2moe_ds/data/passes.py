"""The passes over a streamed corpus: pass 1 learns the tokenizer (the character set, or SentencePiece on
a sample spread over the stream), pass 2 tokenises every block in the worker pool and writes the ids,
in input order, into the staged split files."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import DataError
from .pool import WORKER_STATE, ordered_map
from .publish import Staging
from .splits import SplitWriter
from .store import token_dtype
from .stream import Progress, SourceFile, StreamOptions, blocks, documents, gz_size_estimate
from .tokenizer_option import invalid_tokenizer
from .tokenizers import CharTokenizer, Tokenizer
from .vocab import train_sentencepiece


def _scan_block(task: tuple) -> np.ndarray:
    """The code points in a task's documents (sorted, unique)."""
    docs, _, _ = documents(task, WORKER_STATE["text_field"], WORKER_STATE["txt_document"])
    text = "".join(docs)
    present = np.zeros(256, dtype=bool)
    if text.isascii():
        present[np.frombuffer(text.encode("ascii"), dtype=np.uint8)] = True
        return np.flatnonzero(present)
    units = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    low = units < 256
    present[units[low].astype(np.uint8)] = True
    return np.concatenate([np.flatnonzero(present), np.unique(units[~low]).astype(np.int64)])


def _tokenize_block(task: tuple) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """(tokens of the task's documents, each closed document followed by the end-of-document id when
    enabled; tokens per document; whether the first continues an open document; whether the last closes)."""
    tok, dtype, eod = WORKER_STATE["tokenizer"], WORKER_STATE["dtype"], WORKER_STATE["eod"]
    docs, continues, closes = documents(task, WORKER_STATE["text_field"], WORKER_STATE["txt_document"])
    tokens, lengths = tok.encode_documents(docs, dtype)
    if eod and len(docs):
        ends = np.cumsum(lengths)
        if not closes:
            ends = ends[:-1]  # the last document goes on in the next task
        tokens = np.insert(tokens, ends, np.asarray(tok.eod_id, dtype=dtype))
        lengths = lengths.copy()
        lengths[: len(ends)] += 1
    return tokens, lengths, continues, closes


class CountingHash:
    """sha256 of the decompressed input, in order (for one plain file: the file's sha256), and its size."""

    def __init__(self):
        self.h, self.n = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _scan_characters(files: list[SourceFile], opts: StreamOptions, workers: int) -> list[int]:
    bar = Progress(sum(f.size for f in files), "pass 1/2: characters", opts.progress)
    present = np.zeros(0x110000, dtype=bool)
    state = {"text_field": opts.text_field, "txt_document": opts.txt_document}
    tasks = blocks(files, opts.block_bytes, opts.txt_document, bar)
    with contextlib.closing(ordered_map(_scan_block, tasks, workers, state)) as results:
        for cps in results:
            present[cps] = True
    bar.close()
    return np.flatnonzero(present).tolist()


def _sample_lines(text: str, max_chars: int = 2000) -> Iterator[str]:
    """The non-blank lines of ``text``, long ones cut at a space (SentencePiece's trainer skips sentences
    over 4,192 bytes)."""
    for line in text.split("\n"):
        while len(line) > max_chars:
            cut = line.rfind(" ", max_chars // 2, max_chars)
            cut = max_chars if cut < 0 else cut + 1
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def _sample_for_sentencepiece(files: list[SourceFile], opts: StreamOptions, path: Path) -> int:
    """Write about ``tokenizer_sample_mb`` MB of document text, every k-th block of the stream (k spreads
    the sample over the whole corpus), one line per line of text; returns the bytes written."""
    sample_bytes = int(opts.tokenizer_sample_mb * 1e6)
    estimate = sum(gz_size_estimate(f) for f in files)
    stride = max(1, -(-estimate // max(sample_bytes, 1)))
    bar = Progress(sum(f.size for f in files), "pass 1/2: SentencePiece sample", opts.progress)
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        for i, task in enumerate(blocks(files, opts.block_bytes, opts.txt_document, bar)):
            if i % stride:
                continue
            docs, _, _ = documents(task, opts.text_field, opts.txt_document)
            for d in docs:
                for line in _sample_lines(d):
                    out.write(line + "\n")
                    written += len(line.encode("utf-8")) + 1
            if written >= sample_bytes:
                break
    bar.close()
    return written


def corpus_tokenizer(
    files: list[SourceFile], source: str, tokenizer, vocab_size: int, use_eod: bool, opts: StreamOptions, workers: int
) -> tuple[Tokenizer, str]:
    """(tokenizer, where it came from): a brought one (checked for an end-of-document token when needed),
    SentencePiece trained on a sample spread over the stream (pass 1), or the corpus's characters (pass 1)."""
    if isinstance(tokenizer, Tokenizer):
        if use_eod and tokenizer.eod_id is None:
            raise DataError(
                "the tokenizer file in data.tokenizer has no end-of-document token (looked for an eos "
                "piece / one of <|endoftext|>, </s>, <eos>): name one of its tokens with "
                "data.eod_token=TOKEN, or set data.eod=false"
            )
        return tokenizer, getattr(tokenizer, "source", "")
    if tokenizer == "sentencepiece":
        with tempfile.TemporaryDirectory() as tmp:
            sample = Path(tmp) / "sample.txt"
            n = _sample_for_sentencepiece(files, opts, sample)
            if n == 0:
                raise DataError(f"data.source {source!r} holds no text to train SentencePiece on")
            tok = train_sentencepiece(sample, vocab_size, eos=use_eod)
        return tok, f"trained on a {n / 1e6:.1f} MB sample"
    if tokenizer == "char":
        symbols = _scan_characters(files, opts, workers)
        if not symbols:
            raise DataError(f"data.source {source!r} holds no text (every file or document is empty)")
        return CharTokenizer(symbols, "char", len(symbols) if use_eod else None), ""
    raise invalid_tokenizer(tokenizer)


def tokenize_corpus(
    files: list[SourceFile], staging: Staging, names: list[str], tok: Tokenizer, use_eod: bool, opts: StreamOptions,
    workers: int, label: str,
) -> tuple[SplitWriter, CountingHash]:  # fmt: skip
    """The tokenize pass: blocks tokenised by ``workers`` processes, written in input order into the
    staged ``{split}.bin`` files; returns the split writer (tokens and documents per split) and the
    input's hash."""
    hasher = CountingHash()
    bar = Progress(sum(f.size for f in files), label, opts.progress)
    state = {"tokenizer": tok, "dtype": token_dtype(tok.vocab_size), "eod": use_eod,
             "text_field": opts.text_field, "txt_document": opts.txt_document}  # fmt: skip
    writer = SplitWriter({i: staging.open(f"{s}.bin") for i, s in enumerate(names)}, opts.val_fraction,
                         opts.test_fraction)  # fmt: skip
    tasks = blocks(files, opts.block_bytes, opts.txt_document, bar, hasher)
    with contextlib.closing(ordered_map(_tokenize_block, tasks, workers, state)) as results:
        for result in results:
            writer.add(*result)
    bar.close()
    return writer, hasher
