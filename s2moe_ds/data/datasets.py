"""The named datasets (``data.dataset``): where each raw file comes from, how it is read, and its fixed
splits. Read into memory; ``prepare`` tokenises the splits and publishes the folder.

- ``pydoc``: built in, no download: the Python documentation topics shipped with every CPython
  (``pydoc_data.topics``), characters, 90/5/5 split;
- ``shakespeare``: Tiny Shakespeare, characters, 90/5/5 split by position (before 2026-12-02: 90/10
  train/val; the train part is the same, the old val is now val + test);
- ``text8`` / ``enwik8``: the standard 90M/5M/5M character splits (enwik8 as bytes), from the zip archive;
- ``wikitext103``: the wiki.{train,valid,test}.tokens files (folder or zip), SentencePiece subwords;
- ``text``: any one UTF-8 text file, read into memory, split 90/5/5 by position;
- ``corpus``: streamed, for corpora of any size (``stream.py``, ``passes.py``; ``prepare.prepare_corpus``).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .store import sha256_of

DATASETS = ("pydoc", "shakespeare", "text8", "enwik8", "wikitext103", "text", "corpus")

# where a dataset's raw file is looked for when data.source is empty, and where it can be downloaded from
DEFAULT_SOURCES = {
    "shakespeare": (
        "data_cache/raw/tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    ),
    "text8": ("data_cache/raw/text8.zip", "http://mattmahoney.net/dc/text8.zip"),
    "enwik8": ("data_cache/raw/enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip"),
    "wikitext103": (
        "data_cache/raw/wikitext-103-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
    ),
}


@dataclass
class Corpus:
    """Raw splits before tokenisation: ``str`` for text, ``bytes`` for byte-level enwik8."""

    splits: dict
    unit: str  # 'char' or 'byte'
    source: str
    sha256: str


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
        raise DataError(
            f"{dataset}: no local copy at {path} and downloading {url} failed ({e}). "
            f"Download it on a machine with internet access and put it at {path}, "
            f"or pass data.source=PATH"
        ) from None
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
        raise DataError(
            f"{path} is not a valid zip archive (truncated download?); delete it and fetch it again"
        ) from None


def load_corpus(dataset: str, source: str = "") -> Corpus:
    if dataset == "pydoc":
        from pydoc_data import topics

        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        return Corpus(proportional_split(text), "char", "pydoc_data.topics", hashlib.sha256(text.encode()).hexdigest())
    if dataset == "text" and not source:
        raise DataError("data.dataset=text needs data.source=PATH to a UTF-8 text file")
    path = fetch_source(dataset, source) if dataset != "text" else Path(source)
    if not path.exists():
        raise DataError(f"data.source {source!r} does not exist")
    if not path.is_file() and not (dataset == "wikitext103" and path.is_dir()):
        kind = "a directory" if path.is_dir() else "not a regular file (a pipe, socket or device)"
        raise DataError(f"data.source {source!r} is {kind}; give the corpus file")
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
    return Corpus(proportional_split(text), "char", str(path), digest)
