"""Reading a streamed corpus (``data.dataset=corpus``): which files ``data.source`` names, the input cut
into blocks of about ``block_bytes`` (the unit of work of the worker pool), the documents in a block, and
the progress of a pass over the input. Memory stays bounded by a few blocks, whatever the corpus size."""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

BLOCK_BYTES = 1 << 20  # the unit of streaming work: about this many bytes of input per task
FOLDER_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
PROGRESS_LOG_INTERVAL_S = 15.0  # a progress line this often when stderr is not a terminal


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed corpus is read, split and tokenised (the ``data.*`` options of the same names;
    ``progress`` and ``block_bytes`` are the caller's)."""

    text_field: str = "text"
    txt_document: str = "file"
    eod: bool = True
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    workers: int = 0
    tokenizer_sample_mb: int = 100
    progress: bool = True
    block_bytes: int = BLOCK_BYTES

    def check(self) -> None:
        if self.txt_document not in ("file", "line"):
            raise DataError(f"data.txt_document must be 'file' or 'line', got {self.txt_document!r}")
        val, test = self.val_fraction, self.test_fraction
        if not (0 < val and 0 <= test and val + test < 1):
            raise DataError(
                f"data.val_fraction ({val}) must be > 0, data.test_fraction ({test}) >= 0, "
                f"and together below 1 (train takes the rest)"
            )


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


def gz_size_estimate(f: SourceFile) -> int:
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


def blocks(files: list[SourceFile], block_bytes: int, txt_document: str, progress=None, hasher=None):
    for f in files:
        yield from _file_blocks(f, block_bytes, f.kind == "jsonl" or txt_document == "line", progress, hasher)


def documents(task: tuple, text_field: str, txt_document: str) -> tuple[list[str], bool, bool]:
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
