"""The prepared data folder, its format and its reading side: ``meta.json`` (what was prepared, how, from
what), one token file per split (``train.bin``, ``val.bin``, ``test.bin``: the ids as uint16 while the
vocabulary is at most 65,535, else uint32) and the tokenizer's model file, if it has one. Training,
evaluation and export read data through this module; writing a folder is ``prepare.py``'s."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import DataError
from .tokenizers import HF_FILE, KINDS, SPM_FILE, CharTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer


def token_dtype(vocab_size: int):
    """uint16 while every id fits (vocabulary <= 65,535), else uint32."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_meta(tok: Tokenizer, source: str = "") -> dict:
    """meta.json fields describing a tokenizer kept in the data folder."""
    meta = {
        "tokenizer": tok.kind,
        "unit": {"char": None, "sentencepiece": "piece", "huggingface": "token"}[tok.kind],
        "vocab_size": tok.vocab_size,
    }
    if tok.kind == "char":
        meta.update(unit=tok.unit, symbols=tok.symbols)
    else:
        meta["tokenizer_file"] = next(iter(tok.model_files()))
        if tok.kind == "sentencepiece":
            meta["spm_model"] = meta["tokenizer_file"]
    if source:
        meta["tokenizer_source"] = source
    meta.update(eod_id=tok.eod_id, tokenizer_sha256=tok.sha256)
    return meta


META_FIELDS = ("tokenizer", "vocab_size", "dataset", "dtype", "splits")


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(
            f"no prepared data at {data_dir} (missing meta.json): run "
            f"`s2moe prepare --config CONFIG` (or `python -m s2moe_ds.cli prepare ...`) first"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e}); re-run `s2moe prepare`") from None
    missing = [k for k in META_FIELDS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(
            f"{path} lacks {', '.join(missing)} (written by another tool or damaged); re-run `s2moe prepare`"
        )
    if meta["dataset"] == "shakespeare" and "test" not in meta["splits"]:
        raise DataError(
            f"{data_dir} holds Tiny Shakespeare prepared with the old 90/10 train/val split; the split is "
            f"90/5/5 now (the same train part; the old val became val + test), so its val numbers would not "
            f"match today's: move the folder away and run `s2moe prepare` again"
        )
    return meta


def load_split(data_dir: str | Path, split: str, meta: dict | None = None) -> np.ndarray:
    """Memory-map one split, checking it against meta.json (size and token range)."""
    meta = meta or read_meta(data_dir)
    if split not in meta["splits"]:
        raise DataError(f"dataset {meta['dataset']!r} has no {split!r} split (it has {list(meta['splits'])})")
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise DataError(f"{path} is missing; re-run `s2moe prepare`")
    dtype = np.dtype(meta["dtype"])
    expected = meta["splits"][split] * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(
            f"{path} is {path.stat().st_size} bytes but meta.json says {expected} "
            f"(truncated or from another preparation); re-run `s2moe prepare`"
        )
    arr = np.memmap(path, dtype=dtype, mode="r")
    if len(arr) and int(arr.max()) >= meta["vocab_size"]:
        raise DataError(
            f"{path} holds token ids >= the vocabulary size {meta['vocab_size']} in meta.json; "
            f"the token file and meta.json do not match: re-run `s2moe prepare`"
        )
    return arr


class Decoder:
    """Token ids <-> text for a prepared data folder (kept for existing callers; a thin wrapper over
    ``load_tokenizer``)."""

    def __init__(self, data_dir: str | Path, meta: dict | None = None):
        self.meta = meta or read_meta(data_dir)
        self.tokenizer = load_tokenizer(data_dir, self.meta)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def load_tokenizer(data_dir: str | Path, meta: dict | None = None) -> Tokenizer:
    """The tokenizer of a prepared data folder, from its meta.json (and the model file kept beside it)."""
    d = Path(data_dir)
    if meta is None:
        meta = read_meta(d)
    kind = meta.get("tokenizer")
    if kind == "char":
        if "symbols" not in meta:
            raise DataError(f"{d / 'meta.json'} lacks the character vocabulary (symbols); re-run `s2moe prepare`")
        return CharTokenizer(meta["symbols"], meta.get("unit", "char"), meta.get("eod_id"))
    if kind in ("sentencepiece", "huggingface"):
        name = meta.get("tokenizer_file") or meta.get("spm_model") or (SPM_FILE if kind == "sentencepiece" else HF_FILE)
        path = d / name
        if not path.is_file():
            raise DataError(
                f"{path} (the {kind} tokenizer named in {d / 'meta.json'}) is missing; re-run "
                f"`s2moe prepare` or copy the file back"
            )
        cls = SentencePieceTokenizer if kind == "sentencepiece" else HFTokenizer
        return cls(path.read_bytes(), eod_id=meta.get("eod_id"))
    raise DataError(
        f"{d / 'meta.json'} has unknown tokenizer {kind!r} (valid: {', '.join(KINDS)}); re-run `s2moe prepare`"
    )
