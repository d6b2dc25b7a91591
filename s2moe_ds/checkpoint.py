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
    elif meta.get("tokenizer") not in ("char", None):  # a brought tokenizer: its own file decides the ids
        key["tokenizer_sha256"] = meta.get("tokenizer_sha256")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


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


def resolve_resume(resume: str, out_dir: str) -> tuple[Path, str] | None:
    """(checkpoint root, tag) to resume from, or None to start fresh.

    '' starts fresh and refuses any directory a run has written to (checkpoints, logs, config), so a
    forgotten ``train.resume=auto`` never overwrites or mixes into a run. 'auto' follows ``latest``; only
    when it is missing or fails verification does it fall back to the newest verified checkpoint of the
    same run (never one copied in from another run), and it says why."""
    root = ckpt_root(out_dir)
    if resume == "":
        found = run_leftovers(out_dir)
        if found:
            shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
            raise ConfigError(
                f"train.out_dir {out_dir!r} already holds a run ({shown}); pass train.resume=auto "
                f"to continue it, or choose a new train.out_dir"
            )
        return None
    if resume == "auto":
        tag = latest_tag(root)
        if tag is None and not checkpoint_tags(root):
            return None
        run_id = run_id_of(out_dir) or (manifest_run_id(root / tag) if tag else None)
        if tag is not None:
            owner = manifest_run_id(root / tag)
            try:
                if run_id and owner and owner != run_id:
                    raise CheckpointError(f"it belongs to another run (run id {owner}, this run is {run_id})")
                verify_checkpoint(root / tag)
                return root, tag
            except CheckpointError as e:
                why = f"the latest checkpoint {tag!r} is not usable ({e})"
        else:
            named = (root / "latest").read_text().strip() if (root / "latest").exists() else None
            why = f"'latest' names {named!r}, which does not exist" if named else f"{root} has no 'latest'"
        valid = newest_valid(root, run_id)
        if valid is None:
            raise CheckpointError(
                f"train.resume=auto: {why}, and no other checkpoint of this run under {root} "
                f"verifies; start a new train.out_dir or pass train.resume=PATH"
            )
        print(f"[s2moe] {why}; resuming from the newest verified checkpoint of this run, {valid!r}", flush=True)
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
    raise CheckpointError(
        f"train.resume={resume!r}: not 'auto' and not a checkpoint folder "
        f"(expected a folder with *model_states.pt, or a checkpoints/ folder with 'latest')"
    )


def check_compatible(client_state: dict, meta: dict, source: str) -> None:
    saved = client_state.get("vocab_fingerprint")
    if saved and saved != vocab_fingerprint(meta):
        raise CheckpointError(
            f"checkpoint {source} was trained on a different vocabulary than the dataset in "
            f"data.data_dir (vocab fingerprint {saved} vs {vocab_fingerprint(meta)}); "
            f"use the data.data_dir it was trained with"
        )


def model_state_file(ckpt_dir: Path) -> Path:
    files = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ckpt_dir} has no mp_rank_*_model_states.pt: not a DeepSpeed checkpoint")
    return files[0]


def _load(f: Path) -> dict:
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
    ids = (
        sorted(layers)
        if isinstance(layers, list)
        else {"all": list(range(n_layer)), "every_other": list(range(1, n_layer, 2)), "none": []}[layers]
    )
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
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    state, client, ckpt = load_for_eval(run)
    if client["config"]["model"].get("tie_embeddings", True):
        state.pop("head.weight", None)  # shares storage with tok_emb.weight; re-tied on load
    meta = {
        "config": json.dumps(client["config"]),
        "step": str(client.get("step")),
        "vocab_fingerprint": str(client.get("vocab_fingerprint", "")),
        "source": str(ckpt),
    }
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"cannot create the folder of {out} ({e.strerror or e}); choose a writable --out"
        ) from None
    tmp = out.with_suffix(out.suffix + ".tmp")
    try:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        tmp.replace(out)
    except (OSError, RuntimeError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write {out} ({getattr(e, 'strerror', None) or e}); nothing was left half-written: "
            f"choose a writable --out with free space"
        ) from None
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
    client = {
        "config": json.loads(meta["config"]),
        "step": int(meta["step"]) if meta.get("step", "None") != "None" else None,
    }
    if meta.get("vocab_fingerprint"):
        client["vocab_fingerprint"] = meta["vocab_fingerprint"]
    if client["config"]["model"].get("tie_embeddings", True) and "head.weight" not in state:
        state["head.weight"] = state["tok_emb.weight"]
    return state, client, path


def read_client_state(ckpt_dir: Path) -> dict:
    """The step, config, vocabulary fingerprint and parallel layout saved with a checkpoint."""
    raw = _load(model_state_file(ckpt_dir))
    return {k: v for k, v in raw.items() if k in ("step", "config", "vocab_fingerprint", "layout", "run_id", "data")}


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


# Resuming with another value of these cannot be right: the weights or the data do not fit.
SHAPE_FIELDS = (
    "model.vocab_size",
    "model.n_layer",
    "model.n_head",
    "model.d_model",
    "model.d_ff",
    "model.context",
    "model.tie_embeddings",
    "model.moe_layers",
    "model.moe.num_experts",
    "model.moe.d_ff",
    "model.moe.activation",
    "model.moe.router",
    "model.moe.router_args.variant",
    "model.moe.router_args.proj_dim",
    "model.moe.router_args.codebook_size",
    "model.moe.router_args.distill_dim",
    "model.moe.s2moe.enabled",
    "model.moe.s2moe.noise",
    "model.moe.s2moe.gate",
)
# Changing these on resume is how runs are continued or re-laid-out: not reported.
SILENT_FIELDS = (
    "train.resume",
    "train.out_dir",
    "train.progress",
    "data.data_dir",
    "data.source",
    "model.moe.backend",
    "model.moe.ep_size",
    "model.moe.ep_mode",
    "model.moe.backend_impl",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def check_resume_config(client_state: dict, cfg, data_id: dict, source: str, own_run: bool) -> list[str]:
    """Compare the config a checkpoint was trained with to this run's. Refuses (CheckpointError) what
    cannot be right (another model shape, another dataset, a step budget below the checkpoint's step in
    the run's own directory); returns the other differences as ``field old -> new`` lines to print."""
    saved = client_state.get("config")
    if not saved:
        return []
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    if cfg.model.vocab_size and saved["model"].get("vocab_size", 0) == 0:
        old["model.vocab_size"] = new["model.vocab_size"]  # saved before the data filled it in
    shape = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in SHAPE_FIELDS if old.get(k) != new.get(k)]
    if shape:
        raise CheckpointError(
            f"{source} was trained with another model ({'; '.join(shape)}): its weights do not fit "
            f"this config; resume with the model settings it was trained with (its config.yaml)"
        )
    saved_data = client_state.get("data") or {}
    for key in ("dataset", "source_sha256"):
        if saved_data.get(key) and data_id.get(key) and saved_data[key] != data_id[key]:
            raise CheckpointError(
                f"{source} was trained on another dataset ({key} {saved_data[key]!r} vs "
                f"{data_id[key]!r} in {cfg.data.data_dir}/meta.json); use the data it was trained on"
            )
    step = client_state.get("step") or 0
    t = cfg.train
    if own_run:
        if t.steps < step:
            raise CheckpointError(
                f"config field 'train.steps' is {t.steps} but {source} is already at step {step}: "
                f"nothing would be trained; give train.steps above {step}"
            )
        if t.stop_at_step and t.stop_at_step < step:
            raise CheckpointError(
                f"config field 'train.stop_at_step' is {t.stop_at_step} but {source} is already at "
                f"step {step}; give a later step (or 0 to run to train.steps)"
            )
    return [
        f"{k} {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in SILENT_FIELDS and k not in SHAPE_FIELDS and old.get(k) != new.get(k)
    ]
