"""Prepare a corpus: memory-mapped token files (``train.bin``, ``val.bin``, ``test.bin``) + ``meta.json``.

Datasets (``data.dataset``):
- ``pydoc``: built in, no download: the Python documentation topics shipped with every CPython
  (``pydoc_data.topics``), characters, 90/5/5 split;
- ``shakespeare``: Tiny Shakespeare, characters, 90/5/5 split by position (before 2026-12-02: 90/10
  train/val; the train part is the same, the old val is now val + test);
- ``text8`` / ``enwik8``: the standard 90M/5M/5M character splits (enwik8 as bytes), from the zip archive;
- ``wikitext103``: the wiki.{train,valid,test}.tokens files (folder or zip), SentencePiece subwords;
- ``text``: any one UTF-8 text file, read into memory, split 90/5/5 by position;
- ``corpus``: streamed, for corpora of any size (see ``prepare_corpus``): files, folders (recursively),
  globs, or several of these separated by commas; ``.txt`` (one document per file, or per line with
  ``data.txt_document=line``), ``.jsonl`` (one document per line, its ``data.text_field`` string) and
  ``.gz`` of either; an end-of-document token after every document; whole documents assigned to
  train/val/test by a hash of their index; tokenised by ``data.workers`` processes, written in chunks.

Tokenizers (``data.tokenizer``, see ``tokenizers.py``): ``char``; ``sentencepiece`` (trained on the train
split, or for ``corpus`` on a bounded sample of the stream); or a file: an existing SentencePiece
``.model`` or a Hugging Face ``tokenizer.json``, copied into the data folder. Tokens are stored as
uint16 while the vocabulary is at most 65,535, else uint32.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import zipfile
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizers import (
    CharTokenizer,
    DataError,
    SentencePieceTokenizer,
    Tokenizer,
    is_tokenizer_path,
    load_tokenizer,
    token_dtype,
    user_tokenizer,
)

__all__ = [
    "DataError",
    "Decoder",
    "prepare",
    "prepare_config",
    "prepare_corpus",
    "read_meta",
    "load_split",
    "load_tokenizer",
    "token_dtype",
    "resolve_sources",
]

DATASETS = ("pydoc", "shakespeare", "text8", "enwik8", "wikitext103", "text", "corpus")
SPLITS = ("train", "val", "test")
BLOCK_BYTES = 1 << 20  # the unit of streaming work: about this many bytes of input per task

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


def codepoints(part) -> np.ndarray:
    if isinstance(part, (bytes, bytearray)):
        return np.frombuffer(part, dtype=np.uint8).astype(np.uint32)
    return np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)


def tokenize_chars(corpus: Corpus) -> tuple[Tokenizer, dict]:
    """The character (byte) vocabulary of all splits, sorted by code point."""
    symbols = np.unique(np.concatenate([codepoints(p) for p in corpus.splits.values()]))
    tok = CharTokenizer(symbols.tolist(), corpus.unit)
    return tok, {"tokenizer": "char", "unit": corpus.unit, "vocab_size": tok.vocab_size, "symbols": tok.symbols}


def train_sentencepiece(text_file: Path, vocab_size: int, eos: bool = False) -> SentencePieceTokenizer:
    """A unigram SentencePiece model trained on ``text_file`` (unk id 0; with ``eos`` a ``</s>`` piece, id 1,
    that serves as the end-of-document token)."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_file),
                model_prefix=str(Path(tmp) / "spm"),
                vocab_size=vocab_size,
                model_type="unigram",
                character_coverage=1.0,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                bos_id=-1,
                eos_id=1 if eos else -1,
                unk_id=0,
                pad_id=-1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(
                f"SentencePiece training failed ({e}); a smaller data.vocab_size usually fixes it"
            ) from None
        tok = SentencePieceTokenizer((Path(tmp) / "spm.model").read_bytes())
    tok.eod_id = tok.find_eod()
    return tok


def tokenize_sentencepiece(corpus: Corpus, vocab_size: int) -> tuple[Tokenizer, dict]:
    """Train SentencePiece on the train split."""
    with tempfile.TemporaryDirectory() as tmp:
        train_txt = Path(tmp) / "train.txt"
        part = corpus.splits["train"]
        train_txt.write_text(
            part.decode("utf-8", errors="replace") if isinstance(part, bytes) else part, encoding="utf-8"
        )
        tok = train_sentencepiece(train_txt, vocab_size)
    return tok, {"tokenizer": "sentencepiece", "unit": "piece", "vocab_size": tok.vocab_size, "spm_model": "spm.model"}


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


def _text_of(part) -> str:
    return part.decode("utf-8", errors="replace") if isinstance(part, (bytes, bytearray)) else part


class _Staging:
    """The files of one preparation, written as ``NAME.tmp`` in the output folder and renamed into place
    by ``commit`` (meta.json last); ``abort`` removes them."""

    def __init__(self, out: Path):
        self.out = out
        self.tmps: dict[str, Path] = {}
        self.handles: dict[str, object] = {}

    def path(self, name: str) -> Path:
        tmp = self.out / f"{name}.tmp"
        self.tmps[name] = tmp
        return tmp

    def open(self, name: str):
        f = open(self.path(name), "wb")
        self.handles[name] = f
        return f

    def write_bytes(self, name: str, data: bytes) -> None:
        self.path(name).write_bytes(data)

    def _close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()

    def commit(self, meta: dict) -> None:
        self._close()
        self.path("meta.json").write_text(json.dumps(meta, indent=1))
        for name, tmp in self.tmps.items():
            if name != "meta.json":
                os.replace(tmp, self.out / name)
        os.replace(self.tmps["meta.json"], self.out / "meta.json")
        self.tmps.clear()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._close()
        for tmp in self.tmps.values():
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[_Staging]:
    """Stage the output in ``out``. meta.json goes first and comes back last: a folder caught half-way holds
    no meta.json, which every reader reports as "not prepared", never a new token file under an old
    meta.json. A failed write removes every temporary and says how much space is free."""
    staging = _Staging(out)
    try:
        (out / "meta.json").unlink(missing_ok=True)
        yield staging
    except OSError as e:
        staging.abort()
        free = shutil.disk_usage(out).free
        raise DataError(
            f"writing the prepared data into {out} failed ({e.strerror or e}; {free:,} bytes free there); "
            f"nothing half-written was left behind: free space or choose another data.data_dir, then "
            f"run `s2moe prepare` again"
        ) from None
    except BaseException:
        staging.abort()
        raise


def _tokenizer_from_spec(tokenizer: str, eod_token: str) -> Tokenizer | None:
    """A user's tokenizer file (data.tokenizer=PATH), or None for 'char' / 'sentencepiece'."""
    if tokenizer in ("char", "sentencepiece"):
        return None
    if not is_tokenizer_path(tokenizer):
        raise DataError(
            f"data.tokenizer {tokenizer!r} is not valid; use 'char', 'sentencepiece', or the path of "
            f"a SentencePiece .model file or a Hugging Face tokenizer.json"
        )
    path = Path(tokenizer).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.tokenizer {tokenizer!r} does not exist; give the path of an existing SentencePiece "
            f".model file or Hugging Face tokenizer.json (relative paths start at {Path.cwd()})"
        )
    tok = user_tokenizer(path, eod_token)
    tok.source = str(tokenizer)
    return tok


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
    text_field: str = "text",
    txt_document: str = "file",
    eod: bool = True,
    eod_token: str = "",
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    workers: int = 0,
    tokenizer_sample_mb: int = 100,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> dict:
    """Build ``out_dir`` and return its metadata. Files are written to a temporary name and renamed,
    so an interrupted run never leaves a half-written token file behind a valid meta.json.

    ``dataset='corpus'`` streams (``prepare_corpus``; the keyword options are for it, except ``eod_token``,
    which names the end-of-document token of a user's tokenizer file for any dataset); the other
    datasets are read into memory and keep their fixed splits."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid values: {', '.join(DATASETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    user_tok = _tokenizer_from_spec(tokenizer, eod_token)
    if dataset == "corpus":
        return prepare_corpus(
            out,
            source,
            tokenizer=user_tok or tokenizer,
            vocab_size=vocab_size,
            text_field=text_field,
            txt_document=txt_document,
            eod=eod,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            workers=workers,
            tokenizer_sample_mb=tokenizer_sample_mb,
            progress=progress,
            block_bytes=block_bytes,
        )
    if dataset == "text" and source and _needs_corpus(source):
        raise DataError(
            f"data.dataset=text reads one plain UTF-8 file, but data.source is {source!r}; for folders, "
            f"globs, several files, .jsonl or .gz use data.dataset=corpus"
        )
    if dataset == "wikitext103" and user_tok is None:
        tokenizer = "sentencepiece"
    return _prepare_in_memory(dataset, out, source, tokenizer, user_tok, vocab_size)


def _prepare_in_memory(dataset: str, out: Path, source: str, tokenizer: str, user_tok, vocab_size: int) -> dict:
    """The fixed-split datasets: read the corpus, tokenise each split, write the token files and meta."""
    corpus = load_corpus(dataset, source)
    if user_tok is not None:
        tok, meta = user_tok, {}
    elif tokenizer == "sentencepiece":
        tok, meta = tokenize_sentencepiece(corpus, vocab_size)
    else:
        tok, meta = tokenize_chars(corpus)
    dtype = token_dtype(tok.vocab_size)
    ids = {s: tok.encode_array(p if tok.kind == "char" else _text_of(p), dtype=dtype) for s, p in corpus.splits.items()}
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
    with _writing(out) as staging:
        for split, arr in ids.items():
            arr.tofile(staging.path(f"{split}.bin"))
        for name, data in tok.model_files().items():
            staging.write_bytes(name, data)
        staging.commit(meta)
    return meta


def prepare_config(cfg, progress: bool = True) -> dict:
    """``prepare`` with every option of a ``DataConfig`` (the ``data`` section of a config)."""
    return prepare(
        cfg.dataset,
        cfg.data_dir,
        cfg.source,
        cfg.tokenizer,
        cfg.vocab_size,
        text_field=cfg.text_field,
        txt_document=cfg.txt_document,
        eod=cfg.eod,
        eod_token=cfg.eod_token,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        workers=cfg.workers,
        tokenizer_sample_mb=cfg.tokenizer_sample_mb,
        progress=progress,
    )


# ----------------------------------------------------------------------------------------------------
# streaming corpora (data.dataset=corpus)

FOLDER_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
SPLIT_SALT = 0x5D2A_3B1C_9E37_79B9  # fixes the document -> split assignment; changing it reshuffles splits
PROGRESS_LOG_INTERVAL_S = 15.0  # a progress line this often when stderr is not a terminal


@dataclass(frozen=True)
class SourceFile:
    path: str
    kind: str  # 'txt' or 'jsonl'
    gz: bool
    size: int  # bytes on disk


def _source_file(path: str) -> SourceFile:
    name = path.lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    return SourceFile(path, "jsonl" if stem.endswith(".jsonl") else "txt", gz, os.path.getsize(path))


def resolve_sources(source: str) -> list[SourceFile]:
    """The input files of ``data.source``: comma-separated items, each a file (any name: ``.jsonl`` or
    ``.jsonl.gz`` are JSON lines, anything else text, ``.gz`` decompressed), a folder (recursively, its
    ``.txt``, ``.jsonl`` and ``.gz`` of those, hidden entries skipped, sorted by path) or a glob (``**``
    recurses; sorted). A file named twice is read once."""
    items = [s.strip() for s in source.split(",") if s.strip()]
    if not items:
        raise DataError(
            "data.dataset=corpus needs data.source: a file, a folder, a glob (quote it, e.g. "
            "'data/**/*.jsonl.gz') or several of these separated by commas"
        )
    files, seen = [], set()
    for item in items:
        p = Path(item).expanduser()
        if any(c in item for c in "*?["):
            found = sorted(m for m in glob.glob(str(p), recursive=True) if os.path.isfile(m))
            if not found:
                raise DataError(
                    f"data.source pattern {item!r} matches no file; check the pattern (relative paths "
                    f"start at {Path.cwd()})"
                )
        elif p.is_dir():
            found = sorted(
                str(q)
                for q in p.rglob("*")
                if q.is_file()
                and q.name.lower().endswith(FOLDER_SUFFIXES)
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
            if not found:
                raise DataError(
                    f"data.source folder {item!r} holds no {', '.join(FOLDER_SUFFIXES)} file (searched "
                    f"recursively); name the files or a glob instead"
                )
        elif p.is_file():
            found = [str(p)]
        else:
            raise DataError(
                f"data.source {item!r} does not exist; give a file, a folder or a glob (relative paths "
                f"start at {Path.cwd()})"
            )
        for m in found:
            real = os.path.realpath(m)
            if real not in seen:
                seen.add(real)
                files.append(_source_file(m))
    return files


def _gz_size_estimate(f: SourceFile) -> int:
    """Uncompressed bytes: the gzip trailer's size field (mod 4 GiB), or 4x the file if that looks wrapped."""
    if not f.gz:
        return f.size
    try:
        with open(f.path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            n = int.from_bytes(fh.read(4), "little")
    except OSError:
        n = 0
    return n if n >= f.size else 4 * f.size


class Progress:
    """Bytes done of a pass, with rate and ETA, on stderr: a tqdm bar on a terminal, else a line every
    ``PROGRESS_LOG_INTERVAL_S`` seconds (logs stay readable); a summary line at the end either way."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        from tqdm import tqdm

        self.format_meter, self.format_sizeof = tqdm.format_meter, tqdm.format_sizeof
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self.start = self.last = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            tqdm.monitor_interval = 0  # no monitor thread (worker processes are forked)
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, mininterval=0.5)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.time() - self.last >= PROGRESS_LOG_INTERVAL_S:
            self.last = time.time()
            line = self.format_meter(
                self.n,
                self.total,
                self.last - self.start,
                unit="B",
                unit_scale=True,
                prefix=self.desc,
                ascii=True,
                ncols=100,
            )
            print(f"[s2moe prepare] {line}", file=sys.stderr, flush=True)

    def close(self) -> float:
        elapsed = time.time() - self.start
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            size, rate = self.format_sizeof(self.n, "B"), self.format_sizeof(self.n / max(elapsed, 1e-9), "B/s")
            print(f"[s2moe prepare] {self.desc}: {size} in {elapsed:.1f} s ({rate})", file=sys.stderr, flush=True)
        return elapsed


def _utf8_cut(buf: bytes) -> int:
    """A cut position near the end of ``buf`` that does not split a UTF-8 character."""
    j = len(buf) - 1
    while j > 0 and len(buf) - j < 4 and (buf[j] & 0xC0) == 0x80:
        j -= 1
    return j if j > 0 else len(buf)


def _file_blocks(
    f: SourceFile, block_bytes: int, whole_lines: bool, progress: Progress | None, hasher=None
) -> Iterator[tuple]:
    """Tasks ``(path, kind, data, first, last, line)`` of about ``block_bytes`` each, cut after a newline
    (``whole_lines``: always; else at a character boundary when a line is longer than a block). The
    last task of a file has ``last=True`` (possibly empty data); an empty file yields nothing."""
    try:
        raw = open(f.path, "rb")
    except OSError as e:
        raise DataError(
            f"cannot read {f.path} ({e.strerror or e}); fix its permissions or leave it out of data.source"
        ) from None
    with raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if f.gz else raw
        carry, first, line, done = b"", True, 1, 0
        while True:
            try:
                data = stream.read(block_bytes)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(
                    f"{f.path} cannot be read as {'gzip' if f.gz else 'a file'} ({e}): truncated or "
                    f"damaged; fetch it again or leave it out of data.source"
                ) from None
            if hasher is not None and data:
                hasher.update(data)
            if progress is not None:
                pos = raw.tell()
                progress.update(pos - done)
                done = pos
            if not data:
                if carry or not first:
                    yield f.path, f.kind, carry, first, True, line
                return
            buf = carry + data if carry else data
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                if whole_lines or len(buf) < block_bytes:
                    carry = buf
                    continue
                cut = _utf8_cut(buf)
            block, carry = buf[:cut], buf[cut:]
            yield f.path, f.kind, block, first, False, line
            line += block.count(b"\n")
            first = False


def _blocks(files: list[SourceFile], block_bytes: int, txt_document: str, progress=None, hasher=None):
    for f in files:
        yield from _file_blocks(f, block_bytes, f.kind == "jsonl" or txt_document == "line", progress, hasher)


def _documents(task: tuple, text_field: str, txt_document: str) -> tuple[list[str], bool, bool]:
    """The document texts of a task, whether the first continues the previous task's document, and
    whether the last one ends here."""
    path, kind, data, first, last, line0 = task
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line0 + data[: e.start].count(b"\n")
        raise DataError(
            f"{path}, line {line}: not UTF-8 ({e.reason} at byte {e.start} of the line's block); "
            f"convert the file to UTF-8 or leave it out of data.source"
        ) from None
    if first and text.startswith("\ufeff"):
        text = text[1:]
    if kind == "txt" and txt_document == "file":
        return [text], not first, last
    docs = []
    for i, ln in enumerate(text.split("\n")):
        if not ln.strip():
            continue
        if kind == "txt":
            docs.append(ln[:-1] if ln.endswith("\r") else ln)
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {line0 + i}: not valid JSON ({e.msg}); each .jsonl line must be one JSON "
                f"object with a {text_field!r} string (data.text_field)"
            ) from None
        if not isinstance(obj, dict) or text_field not in obj:
            keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise DataError(
                f"{path}, line {line0 + i}: no {text_field!r} field (it has {keys}); set data.text_field "
                f"to the field that holds the text"
            )
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}, line {line0 + i}: field {text_field!r} is a {type(value).__name__}, not a "
                f"string; set data.text_field to the field that holds the text"
            )
        if value:
            docs.append(value)
    return docs, False, True


_WORKER: dict = {}


def _init_worker(state: dict, in_pool: bool = True) -> None:
    if in_pool:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    _WORKER.clear()
    _WORKER.update(state)


def _scan_block(task: tuple) -> np.ndarray:
    """The code points in a task's documents (sorted, unique)."""
    docs, _, _ = _documents(task, _WORKER["text_field"], _WORKER["txt_document"])
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
    tok, dtype, eod = _WORKER["tokenizer"], _WORKER["dtype"], _WORKER["eod"]
    docs, continues, closes = _documents(task, _WORKER["text_field"], _WORKER["txt_document"])
    tokens, lengths = tok.encode_documents(docs, dtype)
    if eod and len(docs):
        ends = np.cumsum(lengths)
        if not closes:
            ends = ends[:-1]  # the last document goes on in the next task
        tokens = np.insert(tokens, ends, np.asarray(tok.eod_id, dtype=dtype))
        lengths = lengths.copy()
        lengths[: len(ends)] += 1
    return tokens, lengths, continues, closes


def resolve_workers(workers: int) -> int:
    """``data.workers``: 0 means one per available core."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _ordered_map(fn, tasks, workers: int, state: dict) -> Iterator:
    """``fn`` over ``tasks`` in order. workers > 1: a process pool with at most 2 x workers tasks in
    flight, so the reader never runs ahead of the tokenisers (bounded memory); 1: in this process.
    A worker that dies (killed, out of memory) fails the prepare with a DataError instead of leaving it
    waiting for a result that will never come (what ``multiprocessing.Pool`` does)."""
    if workers <= 1:
        _init_worker(state, in_pool=False)
        for task in tasks:
            yield fn(task)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(state,))
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise DataError(
            f"a data worker process died (killed, or out of memory) while preparing the data; nothing was "
            f"published. Rerun, or with fewer processes (data.workers=1 runs in this process; now {workers})"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


class _SplitWriter:
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


class _CountingHash:
    """sha256 of the decompressed input, in order (for one plain file: the file's sha256), and its size."""

    def __init__(self):
        self.h, self.n = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _scan_characters(files, block_bytes, txt_document, text_field, workers, progress) -> list[int]:
    total = sum(f.size for f in files)
    bar = Progress(total, "pass 1/2: characters", progress)
    present = np.zeros(0x110000, dtype=bool)
    state = {"text_field": text_field, "txt_document": txt_document}
    tasks = _blocks(files, block_bytes, txt_document, bar)
    with contextlib.closing(_ordered_map(_scan_block, tasks, workers, state)) as results:
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


def _sample_for_sentencepiece(files, block_bytes, txt_document, text_field, sample_bytes, path: Path, progress) -> int:
    """Write about ``sample_bytes`` of document text, every k-th block of the stream (k spreads the sample
    over the whole corpus), one line per line of text; returns the bytes written."""
    estimate = sum(_gz_size_estimate(f) for f in files)
    stride = max(1, -(-estimate // max(sample_bytes, 1)))
    bar = Progress(sum(f.size for f in files), "pass 1/2: SentencePiece sample", progress)
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        for i, task in enumerate(_blocks(files, block_bytes, txt_document, bar)):
            if i % stride:
                continue
            docs, _, _ = _documents(task, text_field, txt_document)
            for d in docs:
                for line in _sample_lines(d):
                    out.write(line + "\n")
                    written += len(line.encode("utf-8")) + 1
            if written >= sample_bytes:
                break
    bar.close()
    return written


def prepare_corpus(
    out_dir: str | Path,
    source: str,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int = 8000,
    *,
    text_field: str = "text",
    txt_document: str = "file",
    eod: bool = True,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    workers: int = 0,
    tokenizer_sample_mb: int = 100,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> dict:
    """Stream ``source`` (see ``resolve_sources``) into ``out_dir`` in bounded memory.

    Documents: each ``.txt`` file (``txt_document='file'``) or each non-blank line of it ('line'); each
    non-blank ``.jsonl`` line (its ``text_field`` string; empty strings are skipped). With ``eod`` and a
    source that can hold more than one document (several files, any .jsonl, or 'line'), the
    end-of-document id follows every document (char: a new last id; SentencePiece: its ``</s>``; a
    tokenizer file: its eos token, see ``data.eod_token``).

    Splits: whole documents, numbered 0, 1, 2, ... in source order (files sorted as
    ``resolve_sources`` lists them); document i goes to val if u(i) < val_fraction, to test if
    u(i) < val_fraction + test_fraction, else to train, with u(i) a SplitMix64 hash of i in [0, 1)
    (``split_of_documents``), so the same files give the same splits on any machine and with any number
    of workers. So that small corpora still get every split, a document hashed to train goes to val
    (then test) while that split is empty and train is not: three documents give three non-empty
    splits; on a large corpus this moves at most two documents. ``test_fraction=0`` writes no test split.

    Passes: the ``char`` tokenizer first collects the character set (pass 1); ``sentencepiece`` first
    trains on a sample of about ``tokenizer_sample_mb`` MB taken from blocks spread over the stream;
    then the tokenize pass writes ``{split}.bin.tmp`` in chunks. Input blocks of ``block_bytes`` are
    tokenised by ``workers`` processes (0: one per core) and written in input order. Memory stays
    bounded by a few blocks per worker (and the longest .jsonl line), whatever the corpus size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_corpus_options(txt_document, val_fraction, test_fraction)
    files = resolve_sources(source)
    workers = resolve_workers(workers)
    use_eod = bool(eod) and (len(files) > 1 or any(f.kind == "jsonl" for f in files) or txt_document == "line")
    t0 = time.time()
    stream = {"block_bytes": block_bytes, "txt_document": txt_document, "text_field": text_field}
    tok, tok_source = _corpus_tokenizer(
        files, source, tokenizer, vocab_size, use_eod, stream, workers, tokenizer_sample_mb, progress
    )
    names = ["train", "val"] + (["test"] if test_fraction > 0 else [])
    label = "pass 2/2: tokenize" if tokenizer in ("char", "sentencepiece") else "tokenize"
    with _writing(out) as staging:
        writer, hasher = _tokenize_corpus(
            files, staging, names, tok, use_eod, stream, (val_fraction, test_fraction), workers, label, progress
        )
        empty = [s for i, s in enumerate(names) if not writer.docs[i]]
        if empty:
            raise DataError(
                f"data.source {source!r} gave {sum(writer.docs)} document(s) and none went to "
                f"{' and '.join(empty)}: each .txt file is one document (data.txt_document=line makes "
                f"each line one) and each .jsonl line one; give at least one document per split (3 are "
                f"enough), or for a single text file use data.dataset=text (split by position)"
            )
        for name, data in tok.model_files().items():
            staging.write_bytes(name, data)
        meta = _corpus_meta(tok, tok_source, source, files, hasher, writer, names, use_eod)
        meta.update(
            split_rule=f"document i -> val if u(i) < {val_fraction}, test if u(i) < "
            f"{round(val_fraction + test_fraction, 12)}, else train; u = SplitMix64(i ^ {SPLIT_SALT:#x}) / 2**64 "
            f"(s2moe_ds.data.prepare.split_of_documents)",
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            text_field=text_field,
            txt_document=txt_document,
            workers=workers,
            prepare_seconds=round(time.time() - t0, 1),
        )
        staging.commit(meta)
    return meta


def _check_corpus_options(txt_document: str, val_fraction: float, test_fraction: float) -> None:
    if txt_document not in ("file", "line"):
        raise DataError(f"data.txt_document must be 'file' or 'line', got {txt_document!r}")
    if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise DataError(
            f"data.val_fraction ({val_fraction}) must be > 0, data.test_fraction ({test_fraction}) >= 0, "
            f"and together below 1 (train takes the rest)"
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


def _corpus_tokenizer(files, source, tokenizer, vocab_size, use_eod, stream, workers, sample_mb, progress):
    """(tokenizer, where it came from): a brought one (checked for an end-of-document token when needed),
    SentencePiece trained on a sample spread over the stream (pass 1), or the corpus's characters (pass 1)."""
    block_bytes, txt_document, text_field = stream["block_bytes"], stream["txt_document"], stream["text_field"]
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
            n = _sample_for_sentencepiece(
                files, block_bytes, txt_document, text_field, int(sample_mb * 1e6), sample, progress
            )
            if n == 0:
                raise DataError(f"data.source {source!r} holds no text to train SentencePiece on")
            tok = train_sentencepiece(sample, vocab_size, eos=use_eod)
        return tok, f"trained on a {n / 1e6:.1f} MB sample"
    if tokenizer == "char":
        symbols = _scan_characters(files, block_bytes, txt_document, text_field, workers, progress)
        if not symbols:
            raise DataError(f"data.source {source!r} holds no text (every file or document is empty)")
        return CharTokenizer(symbols, "char", len(symbols) if use_eod else None), ""
    raise DataError(
        f"data.tokenizer {tokenizer!r} is not valid; use 'char', 'sentencepiece', or the path of a "
        f"SentencePiece .model file or a Hugging Face tokenizer.json"
    )


def _tokenize_corpus(files, staging, names, tok, use_eod, stream, fractions, workers, label, progress):
    """The tokenize pass: blocks tokenised by ``workers`` processes, written in input order into the
    staged ``{split}.bin`` files; returns the split writer (tokens and documents per split) and the
    input's hash."""
    hasher = _CountingHash()
    bar = Progress(sum(f.size for f in files), label, progress)
    state = {"tokenizer": tok, "dtype": token_dtype(tok.vocab_size), "eod": use_eod,
             "text_field": stream["text_field"], "txt_document": stream["txt_document"]}  # fmt: skip
    writer = _SplitWriter({i: staging.open(f"{s}.bin") for i, s in enumerate(names)}, *fractions)
    tasks = _blocks(files, stream["block_bytes"], stream["txt_document"], bar, hasher)
    with contextlib.closing(_ordered_map(_tokenize_block, tasks, workers, state)) as results:
        for result in results:
            writer.add(*result)
    bar.close()
    return writer, hasher


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
