"""Prepare a corpus into a data folder (``store.py``: memory-mapped ``train.bin``, ``val.bin``, ``test.bin``
and ``meta.json``): the entry points, which choose between the two ways in and publish the folder.

- The named datasets (``datasets.py``: pydoc, Tiny Shakespeare, text8, enwik8, WikiText-103, one text
  file) are read into memory and keep their fixed splits.
- ``data.dataset=corpus`` streams corpora of any size (``stream.py`` reads the sources, ``passes.py``
  runs the passes in the worker pool of ``pool.py``, ``splits.py`` assigns whole documents to splits).

Tokenizers (``data.tokenizer``, see ``tokenizers.py``): ``char``; ``sentencepiece`` (trained on the train
split, or for ``corpus`` on a bounded sample of the stream; ``vocab.py``); or a file: an existing
SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``, copied into the data folder.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from .datasets import DATASETS, load_corpus
from .errors import DataError
from .passes import corpus_tokenizer, tokenize_corpus
from .pool import resolve_workers
from .publish import staged
from .splits import SPLIT_SALT, split_of_documents
from .store import token_dtype, tokenizer_meta
from .stream import StreamOptions, resolve_sources
from .tokenizer_option import tokenizer_from_spec
from .tokenizers import Tokenizer
from .vocab import text_of, tokenize_chars, tokenize_sentencepiece

# split_of_documents stays importable here: every streamed folder's meta.json names it by this path
__all__ = ["prepare", "prepare_config", "prepare_corpus", "split_of_documents"]

# the data.* options of a DataConfig that a streamed preparation reads (StreamOptions' fields)
CONFIG_STREAM_FIELDS = ("text_field", "txt_document", "eod", "val_fraction", "test_fraction", "workers",
                        "tokenizer_sample_mb")  # fmt: skip


def _needs_corpus(source: str) -> bool:
    """Whether ``data.source`` is more than one plain text file (a list, glob, folder, .jsonl or .gz)."""
    return (
        "," in source
        or any(c in source for c in "*?[")
        or Path(source).is_dir()
        or source.lower().endswith((".gz", ".jsonl"))
    )


def prepare(
    dataset: str,
    out_dir: str | Path,
    source: str = "",
    tokenizer: str = "char",
    vocab_size: int = 8000,
    *,
    eod_token: str = "",
    force: bool = False,
    **stream_options,
) -> dict:
    """Build ``out_dir`` and return its metadata. Files are written to a temporary name and renamed,
        so an interrupted run never leaves a half-written token file behind a valid meta.json.

        ``dataset='corpus'`` streams (``prepare_corpus``; ``stream_options`` are ``StreamOptions``' fields, for
        it alone); the other datasets are read into memory and keep their fixed splits. ``eod_token`` names
        the end-of-document token of a user's tokenizer file, for any dataset. A folder holding other prepared
    data is replaced only with ``force`` (``publish.refuse_other_data``)."""
    opts = StreamOptions(**stream_options)
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid values: {', '.join(DATASETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    user_tok = tokenizer_from_spec(tokenizer, eod_token)
    if dataset == "corpus":
        return prepare_corpus(out, source, user_tok or tokenizer, vocab_size, force=force, **dataclasses.asdict(opts))
    if dataset == "text" and source and _needs_corpus(source):
        raise DataError(
            f"data.dataset=text reads one plain UTF-8 file, but data.source is {source!r}; for folders, "
            f"globs, several files, .jsonl or .gz use data.dataset=corpus"
        )
    if dataset == "wikitext103" and user_tok is None:
        tokenizer = "sentencepiece"
    return _prepare_in_memory(dataset, out, source, tokenizer, user_tok, vocab_size, force)


def _prepare_in_memory(
    dataset: str, out: Path, source: str, tokenizer: str, user_tok, vocab_size: int, force: bool = False
) -> dict:
    """The fixed-split datasets: read the corpus, tokenise each split, write the token files and meta."""
    corpus = load_corpus(dataset, source)
    if user_tok is not None:
        tok, meta = user_tok, {}
    elif tokenizer == "sentencepiece":
        tok, meta = tokenize_sentencepiece(corpus, vocab_size)
    else:
        tok, meta = tokenize_chars(corpus)
    dtype = token_dtype(tok.vocab_size)
    ids = {s: tok.encode_array(p if tok.kind == "char" else text_of(p), dtype=dtype) for s, p in corpus.splits.items()}
    if tok.vocab_size == 0 or not len(ids["train"]):
        raise DataError(
            f"{corpus.source} holds no text ({', '.join(f'{s} {len(a)}' for s, a in ids.items())} tokens): nothing to "
            f"train on; give a corpus with text in it ({out} is left as it was)"
        )
    meta = {**tokenizer_meta(tok, tokenizer if user_tok is not None else ""), **meta}
    meta.update(
        dataset=dataset,
        source=corpus.source,
        source_sha256=corpus.sha256,
        dtype=np.dtype(dtype).name,
        splits={s: int(len(a)) for s, a in ids.items()},
    )
    with staged(out, force) as staging:
        for split, arr in ids.items():
            arr.tofile(staging.path(f"{split}.bin"))
        for name, data in tok.model_files().items():
            staging.write_bytes(name, data)
        staging.commit(meta)
    return meta


def prepare_config(cfg, progress: bool = True, force: bool = False) -> dict:
    """``prepare`` with every option of a ``DataConfig`` (the ``data`` section of a config)."""
    options = {name: getattr(cfg, name) for name in CONFIG_STREAM_FIELDS}
    return prepare(
        cfg.dataset, cfg.data_dir, cfg.source, cfg.tokenizer, cfg.vocab_size, eod_token=cfg.eod_token,
        progress=progress, force=force, **options,
    )  # fmt: skip


def prepare_corpus(
    out_dir: str | Path,
    source: str,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int = 8000,
    force: bool = False,
    **stream_options,
) -> dict:
    """Stream ``source`` (see ``stream.resolve_sources``) into ``out_dir`` in bounded memory
    (``stream_options``: ``StreamOptions``' fields).

    Documents: each ``.txt`` file (``txt_document='file'``) or each non-blank line of it ('line'); each
    non-blank ``.jsonl`` line (its ``text_field`` string; empty strings are skipped). With ``eod`` and a
    source that can hold more than one document (several files, any .jsonl, or 'line'), the
    end-of-document id follows every document (char: a new last id; SentencePiece: its ``</s>``; a
    tokenizer file: its eos token, see ``data.eod_token``). Splits: whole documents, by a hash of their
    index (``splits.py``); ``test_fraction=0`` writes no test split.

    Passes (``passes.py``): the ``char`` tokenizer first collects the character set; ``sentencepiece``
    first trains on a sample of about ``tokenizer_sample_mb`` MB taken from blocks spread over the
    stream; then the tokenize pass writes ``{split}.bin.tmp`` in chunks, blocks of ``block_bytes``
    tokenised by ``workers`` processes (0: one per core) and written in input order."""
    opts = StreamOptions(**stream_options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts.check()
    files = resolve_sources(source)
    workers = resolve_workers(opts.workers)
    use_eod = bool(opts.eod) and (
        len(files) > 1 or any(f.kind == "jsonl" for f in files) or opts.txt_document == "line"
    )
    t0 = time.time()
    tok, tok_source = corpus_tokenizer(files, source, tokenizer, vocab_size, use_eod, opts, workers)
    names = ["train", "val"] + (["test"] if opts.test_fraction > 0 else [])
    label = "pass 2/2: tokenize" if tokenizer in ("char", "sentencepiece") else "tokenize"
    with staged(out, force) as staging:
        writer, hasher = tokenize_corpus(files, staging, names, tok, use_eod, opts, workers, label)
        _check_every_split(source, writer, names)
        for name, data in tok.model_files().items():
            staging.write_bytes(name, data)
        meta = _corpus_meta(tok, tok_source, source, files, hasher, writer, names, use_eod)
        meta.update(_split_meta(opts), workers=workers, prepare_seconds=round(time.time() - t0, 1))
        staging.commit(meta)
    return meta


def _check_every_split(source: str, writer, names: list[str]) -> None:
    empty = [s for i, s in enumerate(names) if not writer.docs[i]]
    if empty:
        raise DataError(
            f"data.source {source!r} gave {sum(writer.docs)} document(s) and none went to "
            f"{' and '.join(empty)}: each .txt file is one document (data.txt_document=line makes "
            f"each line one) and each .jsonl line one; give at least one document per split (3 are "
            f"enough), or for a single text file use data.dataset=text (split by position)"
        )


def _split_meta(opts: StreamOptions) -> dict:
    """meta.json's record of how documents were split and read."""
    val, test = opts.val_fraction, opts.test_fraction
    return dict(
        split_rule=f"document i -> val if u(i) < {val}, test if u(i) < {round(val + test, 12)}, else train; "
        f"u = SplitMix64(i ^ {SPLIT_SALT:#x}) / 2**64 (s2moe_ds.data.prepare.split_of_documents)",
        val_fraction=val,
        test_fraction=test,
        text_field=opts.text_field,
        txt_document=opts.txt_document,
    )


def _corpus_meta(tok, tok_source, source, files, hasher, writer, names, use_eod) -> dict:
    """meta.json's description of the corpus: tokenizer, source and its hash, token and document counts."""
    meta = tokenizer_meta(tok, tok_source)
    meta.update(
        dataset="corpus",
        source=source,
        source_files=len(files),
        source_bytes=hasher.n,
        source_sha256=hasher.hexdigest(),
        dtype=np.dtype(token_dtype(tok.vocab_size)).name,
        splits={s: writer.tokens[i] for i, s in enumerate(names)},
        documents={s: writer.docs[i] for i, s in enumerate(names)},
        eod=use_eod,
    )
    return meta
