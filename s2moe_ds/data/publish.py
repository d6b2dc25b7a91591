"""Publishing a data folder: every file is written as ``NAME.tmp`` beside its final name and renamed into
place at the end, meta.json last, so a reader sees the old folder, no folder (no meta.json), or the new
one; never a new token file under an old meta.json.

A folder that already holds *other* prepared data (another corpus, tokenizer, vocabulary or split) is
not replaced unless asked (``force``): runs trained on it read their text through it. The same
preparation again (the same content; only the time taken, the path it was read from or the worker
count differ) replaces it silently."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError


class Staging:
    """The files of one preparation, written as ``NAME.tmp`` in the output folder and renamed into place
    by ``commit`` (meta.json last); ``abort`` removes them."""

    def __init__(self, out: Path, force: bool = False):
        self.out = out
        self.force = force
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
        if not self.force:
            refuse_other_data(self.out, meta)
        self.path("meta.json").write_text(json.dumps(meta, indent=1))  # a full disk fails here: old folder intact
        (self.out / "meta.json").unlink(missing_ok=True)  # from here until the last rename: "not prepared"
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


def content(meta: dict) -> dict:
    """What a prepared folder holds, without what may differ between two preparations of the same data."""
    trained = meta.get("tokenizer") == "sentencepiece" and str(meta.get("tokenizer_source", "trained")).startswith(
        "trained"
    )
    # the paths data and a brought tokenizer were read from do not matter: their hashes do
    volatile = ("prepare_seconds", "source", "workers", "tokenizer_source") + (("tokenizer_sha256",) if trained else ())
    return {k: v for k, v in meta.items() if k not in volatile}


def refuse_other_data(out: Path, meta: dict) -> None:
    """DataError when ``out`` holds a prepared folder whose content is not ``meta``'s (nothing is changed)."""
    try:
        old = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return  # nothing prepared there (or unreadable: nothing a run could use)
    if not isinstance(old, dict):
        return
    a, b = content(old), content(meta)
    if a == b:
        return
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = ", ".join(
        f"{k} {a.get(k)} -> {b.get(k)}" if k in ("dataset", "tokenizer", "vocab_size") else k for k in changed[:6]
    )
    raise DataError(
        f"data.data_dir {out} already holds other prepared data ({old.get('dataset')} from {old.get('source')}; "
        f"this preparation differs in {shown}); runs trained on it read their text through it: prepare into "
        f"another data.data_dir, or pass --force (`s2moe prepare --force`) to replace it"
    )


@contextlib.contextmanager
def staged(out: Path, force: bool = False) -> Iterator[Staging]:
    """Stage the output in ``out``. meta.json goes last: a folder caught half-way through the renames holds
    no meta.json, which every reader reports as "not prepared", never a new token file under an old
    meta.json; before that the old folder is untouched. A failed write removes every temporary and says
    how much space is free."""
    staging = Staging(out, force)
    try:
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
