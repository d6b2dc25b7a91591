"""Resume policy: which checkpoint a run continues from, and whether it fits this run.

``resolve_resume`` picks the checkpoint (``train.resume``: '' fresh, 'auto' the run's own latest verified
one, or a path); ``check_compatible`` and ``check_resume_config`` refuse what cannot be right (another
vocabulary, model shape or dataset) and list what changed since.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from ..configtools import ConfigError
from .store import (
    CheckpointError,
    checkpoint_tags,
    ckpt_root,
    latest_tag,
    manifest_run_id,
    never_trained,
    newest_valid,
    run_id_of,
    run_leftovers,
    verify_checkpoint,
)


def vocab_fingerprint(meta: dict) -> str:
    key = {k: meta.get(k) for k in ("tokenizer", "unit", "vocab_size", "symbols")}
    if meta.get("tokenizer") == "sentencepiece":
        key["source_sha256"] = meta.get("source_sha256")
    elif meta.get("tokenizer") not in ("char", None):  # a brought tokenizer: its own file decides the ids
        key["tokenizer_sha256"] = meta.get("tokenizer_sha256")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _resume_auto(out_dir: str) -> tuple[Path, str] | None:
    """``train.resume=auto``: ``latest`` if it verifies and is this run's, else the newest checkpoint of
    this run that verifies (saying why), None when there is no checkpoint at all."""
    root = ckpt_root(out_dir)
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


def resolve_resume(resume: str, out_dir: str) -> tuple[Path, str] | None:
    """(checkpoint root, tag) to resume from, or None to start fresh.

    '' starts fresh and refuses any directory a run has written to (checkpoints, logs, config), so a
    forgotten ``train.resume=auto`` never overwrites or mixes into a run; a start that failed before its
    first step (``never_trained``) is no run: the trainer moves its logs aside. 'auto' follows ``latest``; only
    when it is missing or fails verification does it fall back to the newest verified checkpoint of the
    same run (never one copied in from another run), and it says why."""
    if resume == "":
        found = run_leftovers(out_dir)
        if found and not never_trained(out_dir):
            shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
            raise ConfigError(
                f"train.out_dir {out_dir!r} already holds a run ({shown}); pass train.resume=auto "
                f"to continue it, or choose a new train.out_dir"
            )
        return None
    if resume == "auto":
        return _resume_auto(out_dir)
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


# Resuming with another value of these cannot be right: the weights or the data do not fit.
SHAPE_FIELDS = (
    "model.vocab_size",
    "model.arch",
    "model.n_kv_head",
    "model.qk_norm",
    "model.moe.num_shared_experts",
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


# fields added after checkpoints were written, with the value every older checkpoint ran with
ADDED_FIELDS = {"model.arch": "gpt2", "model.n_kv_head": 0, "model.qk_norm": False, "model.rope_theta": 10000.0,
                "model.norm_eps": 1e-5, "model.moe.num_shared_experts": 0, "train.init_from": ""}  # fmt: skip


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
    for key, default in ADDED_FIELDS.items():  # a checkpoint older than a field ran with its default
        old.setdefault(key, default)
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
    ] + lr_jump(saved.get("train") or {}, t, step)


def lr_jump(saved_train: dict, t, step: int) -> list[str]:
    """A new ``train.steps`` under a schedule that decays over the whole run moves the learning rate at the
    resumed step: say by how much, and what extends a run smoothly."""
    from types import SimpleNamespace

    from ..schedule import lr_at

    if not saved_train.get("steps") or saved_train["steps"] == t.steps or t.lr_schedule == "wsd":
        return []
    before = lr_at(step, SimpleNamespace(**{**vars(t), **saved_train}))
    after = lr_at(step, t)
    if math.isclose(before, after, rel_tol=1e-6):
        return []
    return [
        f"the learning rate at step {step} jumps from {before:.3g} to {after:.3g} (the {t.lr_schedule} schedule is "
        f"recomputed for train.steps {saved_train['steps']} -> {t.steps}; train.lr_schedule=wsd, a constant phase "
        f"before the decay, extends a run without a jump)"
    ]
