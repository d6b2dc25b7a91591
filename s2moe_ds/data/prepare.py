"""Prepare a corpus: memory-mapped token files (``train.bin``, ``val.bin``, ``test.bin``) + ``meta.json``.

Datasets (``data.dataset``):
- ``pydoc``: built in, no download: the Python documentation topics shipped with every CPython
  (``pydoc_data.topics``), characters, 90/5/5 split;
- ``shakespeare``: Tiny Shakespeare, characters, 90/10 (train/val) split;
- ``text8`` / ``enwik8``: the standard 90M/5M/5M character splits (enwik8 as bytes), from the zip archive;
- ``wikitext103``: the wiki.{train,valid,test}.tokens files (folder or zip), SentencePiece subwords;
- ``text``: any UTF-8 text file, 90/5/5.
``data.tokenizer=sentencepiece`` trains a SentencePiece model on the train split (any dataset).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

DATASETS = ("pydoc", "shakespeare", "text8", "enwik8", "wikitext103", "text")
SPLITS = ("train", "val", "test")

# where a dataset's raw file is looked for when data.source is empty, and where it can be downloaded from
DEFAULT_SOURCES = {
    "shakespeare": ("data_cache/raw/tinyshakespeare.txt",
                    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
    "text8": ("data_cache/raw/text8.zip", "http://mattmahoney.net/dc/text8.zip"),
    "enwik8": ("data_cache/raw/enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip"),
    "wikitext103": ("data_cache/raw/wikitext-103-v1.zip",
                    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"),
}


class DataError(ValueError):
    """A data file is missing, corrupt or does not match; the message says what to do."""


@dataclass
class Corpus:
    """Raw splits before tokenisation: ``str`` for text, ``bytes`` for byte-level enwik8."""

    splits: dict
    unit: str  # 'char' or 'byte'
    source: str
    sha256: str


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_source(dataset: str, source: str) -> Path:
    """The raw file: ``source`` if given (must exist), else the default path, downloading it if online."""
    if source:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data.source {source!r} does not exist; point it at the {dataset} file or archive")
        return path
    default, url = DEFAULT_SOURCES[dataset]
    path = Path(default)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{dataset}: no local copy at {path} and downloading {url} failed ({e}). "
                        f"Download it on a machine with internet access and put it at {path}, "
                        f"or pass data.source=PATH") from None
    return path


def proportional_split(data, fractions=(0.9, 0.05, 0.05)) -> dict:
    """Consecutive train/val(/test) parts; the last part takes the remainder."""
    n = len(data)
    a = int(n * fractions[0])
    if len(fractions) == 2:
        return {"train": data[:a], "val": data[a:]}
    b = a + int(n * fractions[1])
    return {"train": data[:a], "val": data[a:b], "test": data[b:]}


def read_zip_member(path: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            match = [n for n in names if n == member or n.endswith("/" + member)]
            if not match:
                raise DataError(f"{path} has no member {member!r} (it holds {names[:5]}); is it the right archive?")
            return z.read(match[0])
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a valid zip archive (truncated download?); delete it and fetch it again") from None


def load_corpus(dataset: str, source: str = "") -> Corpus:
    if dataset == "pydoc":
        from pydoc_data import topics

        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        return Corpus(proportional_split(text), "char", "pydoc_data.topics",
                      hashlib.sha256(text.encode()).hexdigest())
    if dataset == "text" and not source:
        raise DataError("data.dataset=text needs data.source=PATH to a UTF-8 text file")
    path = fetch_source(dataset, source) if dataset != "text" else Path(source)
    if not path.exists():
        raise DataError(f"data.source {source!r} does not exist")
    digest = sha256_of(path)
    if dataset in ("text8", "enwik8"):
        archive = path.suffix == ".zip" or zipfile.is_zipfile(path)
        raw = read_zip_member(path, dataset) if archive else path.read_bytes()
        if dataset == "text8":
            return Corpus(proportional_split(raw.decode("ascii")), "char", str(path), digest)
        return Corpus(proportional_split(raw), "byte", str(path), digest)
    if dataset == "wikitext103":
        names = {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"}
        if path.is_dir():
            missing = [n for n in names.values() if not (path / n).exists()]
            if missing:
                raise DataError(f"{path} lacks {missing}: expected the wikitext-103 folder")
            splits = {s: (path / n).read_text(encoding="utf-8") for s, n in names.items()}
        else:
            splits = {s: read_zip_member(path, n).decode("utf-8") for s, n in names.items()}
        return Corpus(splits, "char", str(path), digest)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    fractions = (0.9, 0.1) if dataset == "shakespeare" else (0.9, 0.05, 0.05)
    return Corpus(proportional_split(text, fractions), "char", str(path), digest)


def codepoints(part) -> np.ndarray:
    if isinstance(part, (bytes, bytearray)):
        return np.frombuffer(part, dtype=np.uint8).astype(np.uint32)
    return np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenize_chars(corpus: Corpus) -> tuple[dict, dict]:
    arrays = {s: codepoints(p) for s, p in corpus.splits.items()}
    symbols = np.unique(np.concatenate(list(arrays.values())))
    dtype = token_dtype(len(symbols))
    ids = {s: np.searchsorted(symbols, a).astype(dtype) for s, a in arrays.items()}
    return ids, {"tokenizer": "char", "unit": corpus.unit, "vocab_size": int(len(symbols)),
                 "symbols": symbols.tolist()}


def tokenize_sentencepiece(corpus: Corpus, out_dir: Path, vocab_size: int) -> tuple[dict, dict]:
    import sentencepiece as spm

    texts = {s: (p.decode("utf-8", errors="replace") if isinstance(p, bytes) else p) for s, p in corpus.splits.items()}
    with tempfile.TemporaryDirectory() as tmp:
        train_txt = Path(tmp) / "train.txt"
        train_txt.write_text(texts["train"], encoding="utf-8")
        try:
            spm.SentencePieceTrainer.train(
                input=str(train_txt), model_prefix=str(out_dir / "spm"), vocab_size=vocab_size,
                model_type="unigram", character_coverage=1.0, input_sentence_size=2_000_000,
                shuffle_input_sentence=True, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, minloglevel=2)
        except RuntimeError as e:
            raise DataError(f"SentencePiece training failed ({e}); a smaller data.vocab_size usually fixes it") from None
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spm.model"))
    dtype = token_dtype(sp.get_piece_size())
    ids = {s: np.array([i for line in t.splitlines(keepends=True) for i in sp.encode(line)], dtype=dtype)
           for s, t in texts.items()}
    return ids, {"tokenizer": "sentencepiece", "unit": "piece", "vocab_size": int(sp.get_piece_size()),
                 "spm_model": "spm.model"}


def prepare(dataset: str, out_dir: str | Path, source: str = "", tokenizer: str = "char",
            vocab_size: int = 8000) -> dict:
    """Build ``out_dir`` and return its metadata. Files are written to a temporary name and renamed,
    so an interrupted run never leaves a half-written token file behind a valid meta.json."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid values: {', '.join(DATASETS)}")
    if dataset == "wikitext103":
        tokenizer = "sentencepiece"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(dataset, source)
    if tokenizer == "sentencepiece":
        ids, meta = tokenize_sentencepiece(corpus, out, vocab_size)
    else:
        ids, meta = tokenize_chars(corpus)
    meta.update(dataset=dataset, source=corpus.source, source_sha256=corpus.sha256,
                dtype=np.dtype(next(iter(ids.values())).dtype).name, splits={s: int(len(a)) for s, a in ids.items()})
    tmps = [out / f"{split}.bin.tmp" for split in ids] + [out / "meta.json.tmp"]
    try:
        # meta.json goes first and comes back last: a folder caught half-way holds no meta.json, which
        # every reader reports as "not prepared", never a new token file under an old meta.json
        (out / "meta.json").unlink(missing_ok=True)
        for split, arr in ids.items():
            arr.tofile(out / f"{split}.bin.tmp")
        (out / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
        for split in ids:
            os.replace(out / f"{split}.bin.tmp", out / f"{split}.bin")
        os.replace(out / "meta.json.tmp", out / "meta.json")
    except OSError as e:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(out).free
        raise DataError(f"writing the prepared data into {out} failed ({e.strerror or e}; {free:,} bytes free there); "
                        f"nothing half-written was left behind: free space or choose another data.data_dir, then "
                        f"run `s2moe prepare` again") from None
    return meta


META_FIELDS = ("tokenizer", "vocab_size", "dataset", "dtype", "splits")


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"no prepared data at {data_dir} (missing meta.json): run "
                        f"`s2moe prepare --config CONFIG` (or `python -m s2moe_ds.cli prepare ...`) first")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e}); re-run `s2moe prepare`") from None
    missing = [k for k in META_FIELDS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} (written by another tool or damaged); re-run "
                        f"`s2moe prepare`")
    return meta


def load_split(data_dir: str | Path, split: str, meta: Optional[dict] = None) -> np.ndarray:
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
        raise DataError(f"{path} is {path.stat().st_size} bytes but meta.json says {expected} "
                        f"(truncated or from another preparation); re-run `s2moe prepare`")
    arr = np.memmap(path, dtype=dtype, mode="r")
    if len(arr) and int(arr.max()) >= meta["vocab_size"]:
        raise DataError(f"{path} holds token ids >= the vocabulary size {meta['vocab_size']} in meta.json; "
                        f"the token file and meta.json do not match: re-run `s2moe prepare`")
    return arr


class Decoder:
    """Token ids back to text, from meta.json."""

    def __init__(self, data_dir: str | Path, meta: Optional[dict] = None):
        self.meta = meta or read_meta(data_dir)
        if self.meta["tokenizer"] == "sentencepiece":
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=str(Path(data_dir) / self.meta["spm_model"]))
            self.index = None
        else:
            self.sp = None
            self.symbols = self.meta["symbols"]
            self.index = {s: i for i, s in enumerate(self.symbols)}

    def encode(self, text: str) -> list[int]:
        if self.sp is not None:
            return self.sp.encode(text)
        units = text.encode("utf-8") if self.meta["unit"] == "byte" else [ord(c) for c in text]
        unknown = sorted({chr(u) if self.meta["unit"] == "char" else u for u in units if u not in self.index})
        if unknown:
            raise DataError(f"prompt has symbols outside the vocabulary: {unknown[:10]}")
        return [self.index[u] for u in units]

    def decode(self, ids) -> str:
        if self.sp is not None:
            return self.sp.decode(list(map(int, ids)))
        values = [self.symbols[int(i)] for i in ids]
        if self.meta["unit"] == "byte":
            return bytes(values).decode("utf-8", errors="replace")
        return "".join(map(chr, values))
