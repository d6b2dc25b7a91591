"""The checkpoint store: partial write -> manifest -> publish -> verify, and the run's records beside it.

Layout: ``{out_dir}/checkpoints/{tag}/`` (DeepSpeed's files) + ``{out_dir}/checkpoints/latest`` (the
newest tag, written by DeepSpeed) + ``{out_dir}/config.yaml``. The client state saved with every tag
holds the step (the data position: batches are a function of (seed, step, rank)), the resolved config
and the dataset's vocabulary fingerprint. A tag is written as ``{tag}.partial`` by every rank; rank 0
records every file in ``manifest.json`` (size, sha256, run id), renames it and points ``latest`` at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ..data.store import sha256_of


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit this run; the message says what to do."""


def ckpt_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


MANIFEST = "manifest.json"
PARTIAL = ".partial"


def latest_tag(root: Path) -> str | None:
    f = root / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (root / tag).is_dir() else None


def write_manifest(ckpt_dir: Path, run_id: str = "") -> None:
    """Record every file of a finished checkpoint (size and sha256) so loads can detect damage, and the
    run it belongs to (so a checkpoint copied in from another run is never resumed by mistake)."""
    files = {
        str(p.relative_to(ckpt_dir)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "files": files}, indent=1))
    tmp.replace(ckpt_dir / MANIFEST)


def read_manifest(ckpt_dir: Path) -> dict:
    """``{"run_id": ..., "files": {...}}`` (manifests written before run ids held the files only)."""
    manifest = ckpt_dir / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{ckpt_dir} has no {MANIFEST}: the checkpoint was never completed")
    try:
        data = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{manifest} is corrupt") from None
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt_dir} was removed while being read (rotated away by a running training's "
            f"train.keep_last?); read a newer checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{manifest} is corrupt")
    return data if "files" in data else {"run_id": "", "files": data}


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file of a checkpoint."""
    files = read_manifest(ckpt_dir)["files"]
    for rel, info in files.items():
        f = ckpt_dir / rel
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {f} is {f.stat().st_size} bytes, expected {info['bytes']} (truncated)"
            )
        if sha256_of(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 mismatch)")


def checkpoint_tags(root: Path) -> list[str]:
    """Published tags, newest first (by step)."""
    tags = [p.name for p in root.glob("step*") if p.is_dir() and not p.name.endswith(PARTIAL)]
    return sorted(tags, reverse=True)


def manifest_run_id(ckpt_dir: Path) -> str | None:
    try:
        return read_manifest(ckpt_dir).get("run_id") or None
    except CheckpointError:
        return None


def newest_valid(root: Path, run_id: str | None, log=print) -> str | None:
    """The newest checkpoint of run ``run_id`` (None: of any run) that verifies; says which newer ones
    were skipped and why. A checkpoint of another run is never chosen."""
    for tag in checkpoint_tags(root):
        owner = manifest_run_id(root / tag)
        if run_id and owner and owner != run_id:
            log(
                f"[s2moe] skipping checkpoint {root / tag}: it belongs to another run (run id {owner}, this run "
                f"is {run_id}); resume from it explicitly with train.resume=PATH if that is what you want"
            )
            continue
        try:
            verify_checkpoint(root / tag)
            return tag
        except CheckpointError as e:
            log(f"[s2moe] skipping checkpoint {root / tag}: {e}")
    return None


def publish(root: Path, partial_tag: str, tag: str, keep_last: int = 0, run_id: str = "") -> None:
    """Rank 0, after every rank finished writing ``partial_tag``: manifest, rename, then ``latest``.
    A crash at any point leaves either the previous ``latest`` or the new, complete one. A published tag
    of the same name (an abandoned branch: a run resumed from an older checkpoint of this directory)
    is kept as ``replaced-{tag}-{n}``, not deleted."""
    import shutil

    write_manifest(root / partial_tag, run_id)
    final = root / tag
    if final.exists():
        n = 1
        while (root / f"replaced-{tag}-{n}").exists():
            n += 1
        final.rename(root / f"replaced-{tag}-{n}")
        print(
            f"[s2moe] {final} existed (from a branch this run abandoned); kept as {root / f'replaced-{tag}-{n}'}",
            flush=True,
        )
    (root / partial_tag).rename(final)
    tmp = root / "latest.tmp"
    tmp.write_text(tag)
    tmp.replace(root / "latest")
    if keep_last > 0:
        valid = [t for t in checkpoint_tags(root) if (root / t / MANIFEST).exists()]
        for old in valid[keep_last:]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)


RUN_FILE = "run.json"


def run_id_of(out_dir: str | Path) -> str | None:
    """The run id recorded in ``{out_dir}/run.json`` at the run's first start (None if absent)."""
    f = Path(out_dir) / RUN_FILE
    try:
        return json.loads(f.read_text()).get("run_id") or None
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def run_leftovers(out_dir: str | Path) -> list[str]:
    """What a training run has written into ``out_dir``: checkpoints (published or partial), ``latest``,
    logs, config, run id."""
    out_dir = Path(out_dir)
    found = (
        [str(p.relative_to(out_dir)) for p in sorted((out_dir / "checkpoints").glob("*"))]
        if (out_dir / "checkpoints").is_dir()
        else []
    )
    found += [name for name in ("metrics.jsonl", "config.yaml", RUN_FILE) if (out_dir / name).exists()]
    if (out_dir / "tensorboard").is_dir() and any((out_dir / "tensorboard").iterdir()):
        found.append("tensorboard/")
    return found


def never_trained(out_dir: str | Path) -> bool:
    """Whether what a run wrote into ``out_dir`` is only a start that failed before its first step: no
    checkpoint (published or partial) and no training or validation record in ``metrics.jsonl``. Such a
    folder blocks nothing: a rerun moves its logs aside and starts."""
    out_dir = Path(out_dir)
    if (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").iterdir()):
        return False
    metrics = out_dir / "metrics.jsonl"
    if not metrics.exists():
        return True
    try:
        lines = metrics.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return not any('"kind": "train"' in line or '"kind": "val"' in line for line in lines)


def model_state_file(ckpt_dir: Path) -> Path:
    files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt_dir} has no mp_rank_*_model_states.pt: not a DeepSpeed checkpoint")
    return files[0]


def read_state_file(f: Path) -> dict:
    """A torch file of a checkpoint, with what went wrong when it cannot be read."""
    if not f.exists():
        if not f.parent.exists():
            raise CheckpointError(
                f"{f.parent} was removed while being read (rotated away by a running training's "
                f"train.keep_last?); read a newer checkpoint"
            )
        raise CheckpointError(f"{f} is missing: the checkpoint is incomplete")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(
            f"{f.parent} was removed while being read (rotated away by a running training's "
            f"train.keep_last?); read a newer checkpoint"
        ) from None
    except Exception as e:  # truncated or corrupt file
        raise CheckpointError(f"cannot read {f} ({type(e).__name__}: {e}); the file is corrupt or truncated") from None


def find_checkpoint(path: str | Path) -> Path:
    """The newest tag folder under a run dir or checkpoints dir, or ``path`` itself if it is a tag folder."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        tag = latest_tag(root)
        if tag:
            return root / tag
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.name == "latest" and path.is_file():
        raise CheckpointError(
            f"{path} is the file naming the newest checkpoint; give the run directory or its checkpoints/ "
            f"folder (both follow it), or a tag folder such as {path.parent / path.read_text().strip()}"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a run, checkpoint or exported folder")
    if not any(path.glob("*model_states.pt")) and not (path / MANIFEST).exists():
        what = "a prepared data folder" if (path / "meta.json").exists() else "a folder with no checkpoint in it"
        raise CheckpointError(
            f"{path} is {what} (no checkpoints/latest, no *model_states.pt): give a run directory "
            f"(its train.out_dir), a checkpoint tag folder or an exported folder"
        )
    return path


def read_client_state(ckpt_dir: Path) -> dict:
    """The step, config, vocabulary fingerprint and parallel layout saved with a checkpoint."""
    raw = read_state_file(model_state_file(ckpt_dir))
    return {k: v for k, v in raw.items() if k in ("step", "config", "vocab_fingerprint", "layout", "run_id", "data")}


def write_config(out_dir: Path, config: dict, keep_previous_as: str | None = None) -> None:
    """``config.yaml`` = the resolved config of this start; a different earlier one is kept under
    ``keep_previous_as`` (a resume with changed settings does not erase what the run was trained with)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False)
    current = out_dir / "config.yaml"
    if keep_previous_as and current.exists() and current.read_text() != text:
        current.replace(out_dir / keep_previous_as)
    tmp = out_dir / "config.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(current)


def write_run_id(out_dir: Path, run_id: str) -> None:
    """``run.json`` names the run (written once, at its first start)."""
    f = Path(out_dir) / RUN_FILE
    if not f.exists():
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": run_id}))
        tmp.replace(f)
