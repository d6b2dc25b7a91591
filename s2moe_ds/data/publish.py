"""Publishing a data folder: every file is written as ``NAME.tmp`` beside its final name and renamed into
place at the end, meta.json last, so a reader sees the old folder, no folder (no meta.json), or the new
one; never a new token file under an old meta.json."""

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
def staged(out: Path) -> Iterator[Staging]:
    """Stage the output in ``out``. meta.json goes first and comes back last: a folder caught half-way holds
    no meta.json, which every reader reports as "not prepared", never a new token file under an old
    meta.json. A failed write removes every temporary and says how much space is free."""
    staging = Staging(out)
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
