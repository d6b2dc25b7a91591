"""Data: corpora prepared into data folders, and the windows training reads from them.

Modules, each one concern; imports run one way (errors <- tokenizers <- store <- the writing side):
- ``errors``: ``DataError``, the package's one exception;
- ``tokenizers``: text <-> ids (characters, SentencePiece, a Hugging Face tokenizer.json);
- ``store``: the data folder's format and its reading side (``read_meta``, ``load_split``,
  ``load_tokenizer``, ``Decoder``): what training, evaluation and export import;
- ``loader``: the window sampler over a split;
- ``prepare``: the entry points that write a data folder; ``datasets`` (the named corpora), ``vocab``
  (a vocabulary learnt from text), ``publish`` (staged, all-or-nothing writing), and for streamed corpora
  ``stream`` (sources, blocks, documents), ``pool`` (the worker pool), ``splits`` (documents -> splits),
  ``passes`` (the passes over the stream).

The names other packages use are importable from here; each is loaded on first use, so reading a data
folder does not import the writing side. (``prepare()`` itself is ``s2moe_ds.data.prepare.prepare``: the
module of that name is this package's attribute.)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "errors",
    "Tokenizer": "tokenizers",
    "CharTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers",
    "HFTokenizer": "tokenizers",
    "token_dtype": "store",
    "sha256_of": "store",
    "read_meta": "store",
    "load_split": "store",
    "load_tokenizer": "store",
    "Decoder": "store",
    "WindowSampler": "loader",
    "stream_seed": "loader",
    "DATASETS": "datasets",
    "prepare_config": "prepare",
    "prepare_corpus": "prepare",
    "resolve_sources": "stream",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
