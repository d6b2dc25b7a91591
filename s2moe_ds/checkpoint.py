"""Checkpoints through DeepSpeed's save/load, with the resolved config and data position beside them.

Layout: ``{out_dir}/checkpoints/{tag}/`` (DeepSpeed's files) + ``{out_dir}/checkpoints/latest`` (the
newest tag, written by DeepSpeed) + ``{out_dir}/config.yaml``. The client state saved with every tag
holds the step (the data position: batches are a function of (seed, step, rank)), the resolved config
and the dataset's vocabulary fingerprint.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
import yaml

from .configtools import ConfigError
from .data.prepare import sha256_of
from .moe.backends import DS_LAYOUT_BACKENDS


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit this run; the message says what to do."""


def vocab_fingerprint(meta: dict) -> str:
    key = {k: meta.get(k) for k in ("tokenizer", "unit", "vocab_size", "symbols")}
    if meta.get("tokenizer") == "sentencepiece":
        key["source_sha256"] = meta.get("source_sha256")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def ckpt_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


MANIFEST = "manifest.json"
PARTIAL = ".partial"


def latest_tag(root: Path) -> Optional[str]:
    f = root / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (root / tag).is_dir() else None


def write_manifest(ckpt_dir: Path) -> None:
    """Record every file of a finished checkpoint (size and sha256) so loads can detect damage."""
    files = {str(p.relative_to(ckpt_dir)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(files, indent=1))
    tmp.replace(ckpt_dir / MANIFEST)


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file of a checkpoint."""
    manifest = ckpt_dir / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{ckpt_dir} has no {MANIFEST}: the checkpoint was never completed")
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{manifest} is corrupt") from None
    for rel, info in files.items():
        f = ckpt_dir / rel
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is {f.stat().st_size} bytes, expected {info['bytes']} (truncated)")
        if sha256_of(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 mismatch)")


def checkpoint_tags(root: Path) -> list[str]:
    """Published tags, newest first (by step)."""
    tags = [p.name for p in root.glob("step*") if p.is_dir() and not p.name.endswith(PARTIAL)]
    return sorted(tags, reverse=True)


def newest_valid(root: Path, log=print) -> Optional[str]:
    """The newest checkpoint that verifies; says which newer ones were skipped and why."""
    for tag in checkpoint_tags(root):
        try:
            verify_checkpoint(root / tag)
            return tag
        except CheckpointError as e:
            log(f"[s2moe] skipping checkpoint {root / tag}: {e}")
    return None


def publish(root: Path, partial_tag: str, tag: str, keep_last: int = 0) -> None:
    """Rank 0, after every rank finished writing ``partial_tag``: manifest, rename, then ``latest``.
    A crash at any point leaves either the previous ``latest`` or the new, complete one."""
    import shutil

    write_manifest(root / partial_tag)
    final = root / tag
    if final.exists():
        shutil.rmtree(final)
    (root / partial_tag).rename(final)
    tmp = root / "latest.tmp"
    tmp.write_text(tag)
    tmp.replace(root / "latest")
    if keep_last > 0:
        valid = [t for t in checkpoint_tags(root) if (root / t / MANIFEST).exists()]
        for old in valid[keep_last:]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)


def resolve_resume(resume: str, out_dir: str) -> Optional[tuple[Path, str]]:
    """(checkpoint root, tag) to resume from, or None to start fresh. Refuses to start fresh over a run
    that already has checkpoints, so a forgotten ``train.resume=auto`` never overwrites them."""
    root = ckpt_root(out_dir)
    if resume == "":
        if latest_tag(root):
            raise ConfigError(f"train.out_dir {out_dir!r} already holds checkpoints (latest: {latest_tag(root)}); "
                              f"pass train.resume=auto to continue that run, or choose a new train.out_dir")
        return None
    if resume == "auto":
        tag = latest_tag(root)
        if tag is None and not checkpoint_tags(root):
            return None
        valid = newest_valid(root)
        if valid is None:
            raise CheckpointError(f"train.resume=auto: no valid checkpoint under {root} (every one failed "
                                  f"verification, see above); start a new train.out_dir or pass train.resume=PATH")
        if valid != tag:
            print(f"[s2moe] latest checkpoint {tag!r} is not usable; resuming from the newest valid one, {valid!r}",
                  flush=True)
        return root, valid
    path = Path(resume)
    if (path / "latest").exists():
        tag = latest_tag(path)
        if tag is None:
            raise CheckpointError(f"{path}/latest names a tag that does not exist")
        verify_checkpoint(path / tag)
        return path, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        verify_checkpoint(path)
        return path.parent, path.name
    raise CheckpointError(f"train.resume={resume!r}: not 'auto' and not a checkpoint folder "
                          f"(expected a folder with *model_states.pt, or a checkpoints/ folder with 'latest')")


def check_compatible(client_state: dict, meta: dict, source: str) -> None:
    saved = client_state.get("vocab_fingerprint")
    if saved and saved != vocab_fingerprint(meta):
        raise CheckpointError(f"checkpoint {source} was trained on a different vocabulary than the dataset in "
                              f"data.data_dir (vocab fingerprint {saved} vs {vocab_fingerprint(meta)}); "
                              f"use the data.data_dir it was trained with")


def model_state_file(ckpt_dir: Path) -> Path:
    files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt_dir} has no mp_rank_*_model_states.pt: not a DeepSpeed checkpoint")
    return files[0]


def _load(f: Path) -> dict:
    if not f.exists():
        raise CheckpointError(f"{f} is missing: the checkpoint is incomplete")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
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
    return path


def consolidated_state(ckpt_dir: Path, model_cfg: dict) -> dict:
    """The model's full state dict in the *local* backend's layout (experts stacked ``[E, ...]``),
    whatever expert-parallel layout wrote the checkpoint: DeepSpeed keeps expert weights out of
    ``mp_rank_00_model_states.pt`` and writes ``layer_{L}_expert_{e}_..._model_states.pt`` per global expert."""
    state = dict(_load(model_state_file(ckpt_dir))["module"])
    moe = model_cfg["moe"]
    if moe.get("backend", "local") not in DS_LAYOUT_BACKENDS:
        return state
    n_layer = model_cfg["n_layer"]
    layers = model_cfg["moe_layers"]
    ids = sorted(layers) if isinstance(layers, list) else {
        "all": list(range(n_layer)), "every_other": list(range(1, n_layer, 2)), "none": []}[layers]
    marker = ".deepspeed_moe.experts.deepspeed_experts."
    for moe_layer_id, block in enumerate(ids):
        prefix = f"blocks.{block}.ffn.experts"
        stacked: dict[str, list] = {}
        for e in range(moe["num_experts"]):
            f = ckpt_dir / f"layer_{moe_layer_id}_expert_{e}_mp_rank_00_model_states.pt"
            for key, value in _load(f).items():
                if marker not in key:
                    raise CheckpointError(f"{f}: unexpected key {key!r}")
                stacked.setdefault(key.rsplit(".", 1)[1], []).append(value)
        for name, values in stacked.items():
            state[f"{prefix}.{name}"] = torch.stack(values)
    return state


def export_safetensors(run: str | Path, out: str | Path) -> Path:
    """One consolidated file (local layout, every expert) + the config, loadable anywhere without DeepSpeed."""
    from safetensors.torch import save_file

    state, client, ckpt = load_for_eval(run)
    if client["config"]["model"].get("tie_embeddings", True):
        state.pop("head.weight", None)  # shares storage with tok_emb.weight; re-tied on load
    meta = {"config": json.dumps(client["config"]), "step": str(client.get("step")),
            "vocab_fingerprint": str(client.get("vocab_fingerprint", "")), "source": str(ckpt)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def _load_safetensors(path: Path) -> tuple[dict, dict, Path]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); not a valid safetensors file") from None
    if "config" not in meta:
        raise CheckpointError(f"{path} has no s2moe config in its metadata: export it with `s2moe export`")
    client = {"config": json.loads(meta["config"]), "step": int(meta["step"]) if meta.get("step", "None") != "None" else None}
    if meta.get("vocab_fingerprint"):
        client["vocab_fingerprint"] = meta["vocab_fingerprint"]
    if client["config"]["model"].get("tie_embeddings", True) and "head.weight" not in state:
        state["head.weight"] = state["tok_emb.weight"]
    return state, client, path


def read_client_state(ckpt_dir: Path) -> dict:
    """The step, config, vocabulary fingerprint and parallel layout saved with a checkpoint."""
    raw = _load(model_state_file(ckpt_dir))
    return {k: v for k, v in raw.items() if k in ("step", "config", "vocab_fingerprint", "layout")}


def load_for_eval(path: str | Path) -> tuple[dict, dict, Path]:
    """(state dict in the local layout, client state, source) from a run dir, checkpoints dir, tag dir
    or an exported ``.safetensors`` file."""
    if str(path).endswith(".safetensors"):
        return _load_safetensors(Path(path))
    ckpt = find_checkpoint(path)
    verify_checkpoint(ckpt)
    raw = _load(model_state_file(ckpt))
    client = {k: v for k, v in raw.items() if k in ("step", "config", "vocab_fingerprint")}
    if "config" not in client:
        raise CheckpointError(f"{ckpt} has no s2moe config in its client state: not written by s2moe_ds")
    return consolidated_state(ckpt, client["config"]["model"]), client, ckpt


def write_config(out_dir: Path, config: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(out_dir / "config.yaml")
