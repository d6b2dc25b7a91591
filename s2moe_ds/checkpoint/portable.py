"""Checkpoints that survive a change of parallel layout: model *and* optimizer state.

DeepSpeed restores model weights but not the ZeRO-partitioned optimizer state when ``ep_size`` or the
world size changes. So next to every DeepSpeed checkpoint we write a *portable* copy, keyed by
layout-free names, and load from it whenever the layout differs:

- every parameter's fp32 value and Adam moments (``exp_avg``, ``exp_avg_sq``);
- expert parameters one entry per **global** expert (``blocks.3.ffn.experts.w1#5``), whatever backend
  or expert-parallel rank held them: each backend names its parameters so (``global_names()``,
  ``s2moe_ds/moe/global_names.py``): the local backend's stacked ``w1[5]`` and DeepSpeed's
  ``...deepspeed_experts.{j}.w1`` on the rank owning expert 5 map to the same key;
- the Adam step count. The learning-rate schedule and client state come from DeepSpeed's own files.

Writing costs no collective: under ZeRO 1/2 every rank writes the fragments of the fp32 master weights
and moments it owns (``{"shape", "frags": [(offset, values)]}`` per key; the fragments of all ranks tile
each tensor), which is also all the memory it needs. Without ZeRO partitioning (stage 0) every rank
holds whole tensors; rank 0 writes the shared parameters and the first rank of each
expert-data-parallel group its experts. Reading merges every rank's file and assembles whole tensors
(checkpoints written by earlier versions, whole tensors only, read the same way). Loading sets the
module parameter, the fp32 master partition and both moments, then the step.

``ParallelLayout`` (world size, ``ep_size``, backend, ZeRO stage) is what a checkpoint's DeepSpeed files
depend on: saved as a plain dict in the client state and in ``meta.json``; a resume under another one
goes through this copy.

Resharding ahead of time (``s2moe reshard``): ``reshard.py``. Every access to DeepSpeed's internals:
``deepspeed_private.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from . import deepspeed_private as ds
from .deepspeed_private import MOMENTS
from .store import CheckpointError, model_state_file, read_state_file

PORTABLE = "s2moe_portable"


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel layout a checkpoint's DeepSpeed files depend on; printed and saved as a plain dict."""

    world: int | None
    ep_size: int | None
    backend: str | None
    zero_stage: int | None

    def to_dict(self) -> dict:
        """``{"world", "ep_size", "backend", "zero_stage"}``: the form checkpoints hold."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ParallelLayout:
        """From a checkpoint's dict; a field it lacks is None (never equal to a real layout's)."""
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})

    def __str__(self) -> str:
        return str(self.to_dict())


def portable_keys(model) -> list[tuple[str, torch.nn.Parameter, list[tuple[str, int | None]]]]:
    """(name, param, [(portable key, index along dim 0 or None)]) for every parameter: expert
    parameters under their backend's global names, the others under their own."""
    names = {}
    for i, layer in model.moe_layers():
        prefix = f"blocks.{i}.ffn.experts"
        for local, keys in layer.experts.global_names().items():
            names[f"{prefix}.{local}"] = [(f"{prefix}.{g}", index) for g, index in keys]
    return [(name, p, names.get(name, [(name, None)])) for name, p in model.named_parameters()]


def _is_expert(p) -> bool:
    return hasattr(p, "allreduce") and not p.allreduce


def _writer(p) -> bool:
    if not dist.is_initialized():
        return True
    if _is_expert(p):
        return ds.expert_data_parallel_rank(p.group_name) == 0
    return dist.get_rank() == 0


def save_portable(engine, model, ckpt_dir: Path, layout: ParallelLayout) -> None:
    """Write this rank's share of the portable state into ``ckpt_dir/s2moe_portable/``. Every rank calls it;
    no collective is involved."""
    ds.relink(engine)
    entries = {}
    for _name, p, keys in portable_keys(model):
        owned = ds.owned_fragment(p)
        if owned is None:  # whole tensors on every rank: one writer saves them
            if not _writer(p):
                continue
            values = {"fp32": p.detach().float().cpu()} | {k: ds.moment(engine, p, k) for k in MOMENTS}
            for key, index in keys:
                entries[key] = {k: (v if index is None else v[index]).clone() for k, v in values.items()}
            continue
        if not owned:
            continue
        start, values = owned
        n = values["fp32"].numel()
        stacked = keys[0][1] is not None  # the local backend's [E, ...] expert tensor: one key per expert
        shape = list(p.shape[1:]) if stacked else list(p.shape)
        per = p[0].numel() if stacked else p.numel()
        for key, index in keys:
            base = (index or 0) * per
            lo, hi = max(start, base), min(start + n, base + per)
            if lo < hi:
                piece = {k: v[lo - start : hi - start].clone() for k, v in values.items()}
                entries.setdefault(key, {"shape": shape, "frags": []})["frags"].append((lo - base, piece))
    out = ckpt_dir / PORTABLE
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(entries, out / f"rank{rank:05d}.pt")
    if rank == 0:
        (out / "meta.json").write_text(json.dumps({"adam_step": ds.adam_step(engine), "layout": layout.to_dict()}))


def _assemble(key: str, entry: dict, source: Path) -> dict:
    numel = math.prod(entry["shape"])
    full = {k: torch.zeros(numel) for k in ("fp32",) + MOMENTS}
    seen = torch.zeros(numel, dtype=torch.bool)  # replicated owners (unpartitioned optimizers) may overlap
    for offset, piece in entry["frags"]:
        for k in full:
            full[k][offset : offset + piece[k].numel()] = piece[k]
        seen[offset : offset + piece["fp32"].numel()] = True
    covered = int(seen.sum())
    if covered != numel:
        raise CheckpointError(
            f"{source}: {key!r} has {covered} of its {numel} elements (a rank's file is missing "
            f"or from another save); the portable state is incomplete"
        )
    return {k: v.view(entry["shape"]) for k, v in full.items()}


def read_portable(ckpt_dir: Path) -> tuple[dict, dict]:
    require_portable(ckpt_dir)
    folder = ckpt_dir / PORTABLE
    merged, fragmented = {}, {}
    for f in sorted(folder.glob("rank*.pt")):
        for key, entry in torch.load(f, map_location="cpu", weights_only=True).items():
            if "frags" in entry:
                fragmented.setdefault(key, {"shape": entry["shape"], "frags": []})["frags"].extend(entry["frags"])
            else:
                merged[key] = entry
    for key, entry in fragmented.items():
        merged[key] = _assemble(key, entry, folder)
    return merged, json.loads((folder / "meta.json").read_text())


def load_portable(engine, model, ckpt_dir: Path) -> dict:
    """Load model and optimizer state written under any layout into this (different) layout."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    merged, meta = read_portable(ckpt_dir)
    ds.ensure_state(engine, meta["adam_step"])
    ds.relink(engine)
    for name, p, keys in portable_keys(model):
        missing = [k for k, _ in keys if k not in merged]
        if missing:
            raise CheckpointError(
                f"{ckpt_dir}/{PORTABLE} has no entry {missing[0]!r} for parameter {name}: "
                f"the checkpoint is from a different model configuration"
            )
        full = {
            k: torch.stack([merged[key][k] for key, _ in keys]) if keys[0][1] is not None else merged[keys[0][0]][k]
            for k in ("fp32",) + MOMENTS
        }
        if full["fp32"].shape != p.shape:
            raise CheckpointError(
                f"parameter {name}: checkpoint shape {tuple(full['fp32'].shape)} != model {tuple(p.shape)}"
            )
        with torch.no_grad():
            p.copy_(full["fp32"].to(p.dtype))
        if ds.is_partitioned(p):
            safe_set_full_fp32_param(p, full["fp32"].to(p.device))
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, full[k].to(p.device), k)
        else:
            for k in MOMENTS:
                ds.set_moment(engine, p, k, full[k])
    return meta


def has_portable(ckpt_dir: Path) -> bool:
    return (ckpt_dir / PORTABLE / "meta.json").exists()


def require_portable(ckpt_dir: Path) -> None:
    if not has_portable(ckpt_dir):
        raise CheckpointError(
            f"{ckpt_dir} has no {PORTABLE}/ (the run had train.portable_checkpoints=false, or "
            f"predates resharding): it can only be resumed with the parallel layout that wrote it "
            f"(its world size, model.moe.ep_size, backend and ZeRO stage)"
        )


def read_layout(ckpt_dir: Path, client_state: dict | None = None) -> ParallelLayout | None:
    """The parallel layout that wrote a checkpoint: from its portable copy, else from the client state
    saved with it (every checkpoint records it), else None (a checkpoint older than both)."""
    if has_portable(ckpt_dir):
        saved = json.loads((ckpt_dir / PORTABLE / "meta.json").read_text())["layout"]
    else:
        saved = (client_state or {}).get("layout")
    return None if saved is None else ParallelLayout.from_dict(saved)


def resume_resharded(engine, model, scheduler, ckpt_dir: Path) -> dict:
    """Resume from a checkpoint written under another layout; returns the client state. The scheduler gets
    the saved position only (the caller recomputes each group's learning rate from the pure schedule)."""
    states = read_state_file(model_state_file(ckpt_dir))
    meta = load_portable(engine, model, ckpt_dir)
    if states.get("lr_scheduler") is not None:
        # the number of parameter groups depends on the layout (expert groups), so restore the schedule's
        # position only
        scheduler.last_epoch = states["lr_scheduler"]["last_epoch"]
    engine.global_steps = states.get("global_steps", meta["adam_step"])
    engine.global_samples = states.get("global_samples", 0)
    return {k: states[k] for k in ("step", "config", "vocab_fingerprint", "run_id", "data") if k in states}
