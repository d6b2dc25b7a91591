"""Checkpoints that survive a change of parallel layout: model *and* optimizer state.

DeepSpeed restores model weights but not the ZeRO-partitioned optimizer state when ``ep_size`` or the
world size changes. So next to every DeepSpeed checkpoint we write a *portable* copy, keyed by
layout-free names, and load from it whenever the layout differs:

- every parameter's fp32 value and Adam moments (``exp_avg``, ``exp_avg_sq``);
- expert parameters one entry per **global** expert (``blocks.3.ffn.experts.w1#5``), whatever backend
  or expert-parallel rank held them: the local backend's stacked ``w1[5]`` and DeepSpeed's
  ``...deepspeed_experts.{j}.w1`` on the rank owning expert 5 map to the same key;
- the Adam step count. The learning-rate schedule and client state come from DeepSpeed's own files.

Writing costs no collective: under ZeRO 1/2 every rank writes the fragments of the fp32 master weights
and moments it owns (``{"shape", "frags": [(offset, values)]}`` per key; the fragments of all ranks tile
each tensor), which is also all the memory it needs. Without ZeRO partitioning (stage 0) every rank
holds whole tensors; rank 0 writes the shared parameters and the first rank of each
expert-data-parallel group its experts. Reading merges every rank's file and assembles whole tensors
(checkpoints written by earlier versions, whole tensors only, read the same way). Loading sets the
module parameter, the fp32 master partition and both moments, then the step.

``s2moe reshard SRC DST`` (``reshard_run``) does the same conversion ahead of time: it loads SRC's
checkpoint into a run with the new layout and saves it at once into DST, a native checkpoint of that
layout (for DeepSpeed's own tools, or to stop relying on the portable copy), without training a step.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist

PORTABLE = "s2moe_portable"
_DS_EXPERT = re.compile(
    r"^(?P<prefix>.*\.ffn\.experts)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<j>\d+)\.(?P<w>\w+)$"
)
_LOCAL_EXPERT = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<w>w[123])$")
MOMENTS = ("exp_avg", "exp_avg_sq")


def _moe_backends(model) -> dict:
    return {f"blocks.{i}.ffn.experts": layer.experts for i, layer in model.moe_layers()}


def portable_keys(model) -> list[tuple[str, torch.nn.Parameter, list[tuple[str, int | None]]]]:
    """(name, param, [(portable key, index along dim 0 or None)]) for every parameter."""
    backends = _moe_backends(model)
    out = []
    for name, p in model.named_parameters():
        m = _DS_EXPERT.match(name)
        if m:
            backend = backends[m["prefix"]]
            e = backend.local_expert_ids()[int(m["j"])]
            out.append((name, p, [(f"{m['prefix']}.{m['w']}#{e}", None)]))
            continue
        m = _LOCAL_EXPERT.match(name)
        if m and m["prefix"] in backends:
            out.append((name, p, [(f"{m['prefix']}.{m['w']}#{e}", e) for e in range(p.shape[0])]))
            continue
        out.append((name, p, [(name, None)]))
    return out


def _is_expert(p) -> bool:
    return hasattr(p, "allreduce") and not p.allreduce


def _writer(p) -> bool:
    if not dist.is_initialized():
        return True
    if _is_expert(p):
        from deepspeed.utils import groups

        return groups._get_expert_data_parallel_rank(p.group_name) == 0
    return dist.get_rank() == 0


def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _adam_step(engine) -> int:
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _get(engine, p, key=None) -> torch.Tensor:
    """Full fp32 value (key None) or moment of a parameter that is not ZeRO-partitioned."""
    if key is None:
        return p.detach().float().cpu()
    return _inner_optimizer(engine).state[p][key].detach().float().cpu()


def _owned_fragment(p):
    """``(offset, {"fp32", "exp_avg", "exp_avg_sq"})`` for the slice of flattened ``p`` this rank's ZeRO
    partition holds; ``()`` if it holds none of it; None if ``p`` is not ZeRO-partitioned (stage 0)."""
    if not hasattr(p, "_hp_mapping"):
        return None
    m = p._hp_mapping
    if m is None:
        return ()
    values = {"fp32": m.get_hp_fragment()} | {k: m.get_hp_fragment(k) for k in MOMENTS}
    return m.lp_fragment_address.start, {k: v.detach().float().cpu().flatten() for k, v in values.items()}


def save_portable(engine, model, ckpt_dir: Path, layout: dict) -> None:
    """Write this rank's share of the portable state into ``ckpt_dir/s2moe_portable/``. Every rank calls it;
    no collective is involved."""
    _relink(engine)
    entries = {}
    for _name, p, keys in portable_keys(model):
        owned = _owned_fragment(p)
        if owned is None:  # whole tensors on every rank: one writer saves them
            if not _writer(p):
                continue
            values = {"fp32": _get(engine, p)} | {k: _get(engine, p, k) for k in MOMENTS}
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
        (out / "meta.json").write_text(json.dumps({"adam_step": _adam_step(engine), "layout": layout}))


def _assemble(key: str, entry: dict, source: Path) -> dict:
    from .checkpoint import CheckpointError

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


def _relink(engine) -> None:
    """ZeRO 1/2 map each parameter to its optimizer-state fragments when linking; torch creates Adam
    state lazily at the first step, after DeepSpeed linked, so link again before reading or writing it."""
    opt = engine.optimizer
    if hasattr(opt, "_link_all_hp_params"):
        opt._link_all_hp_params()
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _ensure_state(engine, step: int) -> None:
    """Give every optimizer tensor Adam state (created lazily by torch) and the saved step count."""
    opt = _inner_optimizer(engine)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            for k in MOMENTS:
                if k not in st:
                    st[k] = torch.zeros_like(p, dtype=torch.float32)
            st["step"] = torch.tensor(float(step)) if not isinstance(st.get("step"), int) else step


def load_portable(engine, model, ckpt_dir: Path) -> dict:
    """Load model and optimizer state written under any layout into this (different) layout."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from .checkpoint import CheckpointError

    merged, meta = read_portable(ckpt_dir)
    _ensure_state(engine, meta["adam_step"])
    _relink(engine)
    opt = _inner_optimizer(engine)
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
        if hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, full["fp32"].to(p.device))
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, full[k].to(p.device), k)
        else:
            for k in MOMENTS:
                opt.state[p][k].copy_(full[k])
    return meta


def has_portable(ckpt_dir: Path) -> bool:
    return (ckpt_dir / PORTABLE / "meta.json").exists()


def require_portable(ckpt_dir: Path) -> None:
    from .checkpoint import CheckpointError

    if not has_portable(ckpt_dir):
        raise CheckpointError(
            f"{ckpt_dir} has no {PORTABLE}/ (the run had train.portable_checkpoints=false, or "
            f"predates resharding): it can only be resumed with the parallel layout that wrote it "
            f"(its world size, model.moe.ep_size, backend and ZeRO stage)"
        )


def read_layout(ckpt_dir: Path, client_state: dict | None = None):
    """The parallel layout that wrote a checkpoint: from its portable copy, else from the client state
    saved with it (every checkpoint records it), else None (a checkpoint older than both)."""
    if has_portable(ckpt_dir):
        return json.loads((ckpt_dir / PORTABLE / "meta.json").read_text())["layout"]
    return (client_state or {}).get("layout")


def resume_resharded(engine, model, scheduler, ckpt_dir: Path) -> dict:
    """Resume from a checkpoint written under another layout; returns the client state. The scheduler gets
    the saved position only (the caller recomputes each group's learning rate from the pure schedule)."""
    from .checkpoint import _load, model_state_file

    states = _load(model_state_file(ckpt_dir))
    meta = load_portable(engine, model, ckpt_dir)
    if states.get("lr_scheduler") is not None:
        # the number of parameter groups depends on the layout (expert groups), so restore the schedule's
        # position only
        scheduler.last_epoch = states["lr_scheduler"]["last_epoch"]
    engine.global_steps = states.get("global_steps", meta["adam_step"])
    engine.global_samples = states.get("global_samples", 0)
    return {k: states[k] for k in ("step", "config", "vocab_fingerprint", "run_id", "data") if k in states}


def reshard_run(src: str, dst: str, nproc: int, overrides: list[str]) -> Path:
    """Write SRC's newest checkpoint (a run dir, checkpoints dir or tag dir) into the new run dir DST in
    the layout ``nproc`` processes and ``overrides`` (``model.moe.ep_size``, ``model.moe.backend``,
    ``train.ds_config``, ``train.grad_accum`` ...) give, model and optimizer state; returns DST's tag."""
    import shlex
    import subprocess
    import sys

    import yaml

    from .checkpoint import (
        CheckpointError,
        checkpoint_tags,
        find_checkpoint,
        read_client_state,
        verify_checkpoint,
        write_config,
    )
    from .configtools import ConfigError
    from .distributed import free_port

    ckpt = find_checkpoint(src)
    verify_checkpoint(ckpt)
    client = read_client_state(ckpt)
    if "config" not in client or "step" not in client:
        raise CheckpointError(f"{ckpt} is not an s2moe_ds training checkpoint (no step/config in its client state)")
    require_portable(ckpt)
    out = Path(dst)
    if checkpoint_tags(out / "checkpoints"):
        raise ConfigError(f"{out} already holds checkpoints; give s2moe reshard a new run directory")
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    out.mkdir(parents=True, exist_ok=True)
    source_cfg = out / "source_config.yaml"
    source_cfg.write_text(yaml.safe_dump(client["config"], sort_keys=False))
    step = int(client["step"])
    args = [
        "--config",
        str(source_cfg),
        *overrides,
        f"train.out_dir={out}",
        f"train.resume={ckpt}",
        f"train.stop_at_step={step}",
        "train.progress=false",
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "s2moe_ds.train", *args]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [
            str(launcher) if launcher.exists() else "deepspeed",
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            "--module",
            "s2moe_ds.train",
            *args,
        ]
    print("+ " + shlex.join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise CheckpointError(f"resharding {ckpt} into {out} failed (see the messages above); {ckpt} is unchanged")
    new = out / "checkpoints" / f"step{step:07d}"
    if not new.is_dir():
        raise CheckpointError(f"resharding wrote no checkpoint {new}; {ckpt} is unchanged")
    # DST continues the run: same config, the new layout, resumed automatically, no stop step
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["train"].update(resume="auto", stop_at_step=0)
    write_config(out, cfg)
    source_cfg.unlink()
    launch = "python -m s2moe_ds.train" if nproc == 1 else f"deepspeed --num_gpus {nproc} --module s2moe_ds.train"
    print(
        f"[s2moe reshard] {ckpt} ({read_layout(ckpt, client)}) -> {new} ({read_layout(new)}) at step {step}; "
        f"continue the run with: {launch} --config {out / 'config.yaml'}",
        flush=True,
    )
    return new
