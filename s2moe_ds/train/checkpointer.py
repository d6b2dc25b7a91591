"""A run's checkpoints, seen from the trainer: which one to resume, loading it (or resharding it into this
run's parallel layout), the run's records beside it, and saving (``{tag}.partial`` on every rank, then
rank 0 verifies and publishes it). The file formats live in the ``s2moe_ds.checkpoint`` package.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.portable import ParallelLayout, has_portable, read_layout, resume_resharded, save_portable
from ..checkpoint.resume import check_compatible, check_resume_config, resolve_resume, vocab_fingerprint
from ..checkpoint.store import (
    PARTIAL,
    CheckpointError,
    latest_tag,
    publish,
    read_client_state,
    run_id_of,
    write_config,
    write_run_id,
)
from ..config import Config
from ..configtools import ConfigError
from ..data.store import load_tokenizer
from ..distributed import broadcast_str
from ..runlock import lock_run_dir
from .hooks import NonFiniteLoss
from .optim import apply_schedule


def describe_os_error(e: OSError, path: Path) -> str:
    """The real cause of a failed write: permissions, space, or what the OS said."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({e.strerror}): make {path} writable"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path if path.exists() else path.parent).free
        return f"no space left ({free:,} bytes free on that file system): free space there (or set train.keep_last)"
    return f"{e.strerror or e}"


def global_batch_change(client: dict, t, world: int) -> list[str]:
    """A line when the global batch (windows per optimizer step) differs from the checkpoint's, with the
    ``train.grad_accum`` that would keep it."""
    saved_t = (client.get("config") or {}).get("train", {})
    saved_world = ParallelLayout.from_dict(client.get("layout") or {}).world
    if not saved_world or "micro_batch_size" not in saved_t:
        return []
    old = saved_world * saved_t["micro_batch_size"] * saved_t.get("grad_accum", 1)
    new = world * t.micro_batch_size * t.grad_accum
    if old == new:
        return []
    per_accum = world * t.micro_batch_size
    keep = (
        f"train.grad_accum={old // per_accum} keeps it"
        if old % per_accum == 0
        else f"no train.grad_accum keeps it with {world} rank(s) x {t.micro_batch_size}"
    )
    return [
        f"global batch {old} -> {new} windows per step ({saved_world} rank(s) x {saved_t['micro_batch_size']} x "
        f"{saved_t.get('grad_accum', 1)} -> {world} x {t.micro_batch_size} x {t.grad_accum}; {keep})"
    ]


def check_writable(out_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, when the run directory cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"config field 'train.out_dir': {str(out_dir)!r} is not writable ({e.strerror or e}); "
            f"choose a directory you can write to"
        ) from None


def set_aside_leftovers(out_dir: Path, rank: int) -> None:
    """Starting fresh in a folder with logs of a run that died before its first checkpoint
    (``train.resume=auto``) or before its first step (any start): move them into ``abandoned-N/`` (rank 0)
    so the new run's logs do not mix with them."""
    names = ("metrics.jsonl", "config.yaml", "run.json", "tensorboard", "checkpoints")
    leftovers = [n for n in names if (out_dir / n).exists()] if rank == 0 else []
    if leftovers:
        n = 1
        while (out_dir / f"abandoned-{n}").exists():
            n += 1
        dest = out_dir / f"abandoned-{n}"
        dest.mkdir(parents=True)
        for name in leftovers:
            (out_dir / name).rename(dest / name)
        print(
            f"[s2moe] {out_dir} held logs of a run with no checkpoint ({', '.join(leftovers)}); moved them to "
            f"{dest} and starting fresh",
            flush=True,
        )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_ranks_agree(flag: bool) -> bool:
    ok = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class Checkpointer:
    """Made by ``Trainer.build``: ``open()`` before the model exists (lock, which checkpoint), ``attach()``
    once the engine exists, then ``restore()``, ``record()`` and ``save(step)``."""

    def __init__(self, cfg: Config, meta: dict, rank: int):
        self.cfg, self.meta, self.rank = cfg, meta, rank
        self.out_dir = Path(cfg.train.out_dir)
        self.root = self.out_dir / "checkpoints"
        self.data_id = {"dataset": meta.get("dataset"), "source_sha256": meta.get("source_sha256")}
        # every checkpoint carries its tokenizer: a run samples, evaluates text and exports without its data
        self.tokenizer = load_tokenizer(cfg.data.data_dir, meta).saved()
        self.resume: tuple[Path, str] | None = None
        self.run_id = ""
        self.resolved: dict = {}
        self._lock = None

    def open(self) -> None:
        """Refuse an unwritable run directory, take the run lock (held for the job's lifetime) and decide
        which checkpoint to resume; logs of a run that died before its first checkpoint are set aside."""
        check_writable(self.out_dir)
        self._lock = lock_run_dir(self.out_dir, self.rank)
        self.resume = resolve_resume(self.cfg.train.resume, str(self.out_dir))
        if self.cfg.train.resume in ("", "auto") and not self.resume:
            set_aside_leftovers(self.out_dir, self.rank)

    def attach(self, engine, model, scheduler, layout: ParallelLayout) -> None:
        self.engine, self.model, self.scheduler, self.layout = engine, model, scheduler, layout

    @property
    def resuming_own_run(self) -> bool:
        return bool(self.resume) and self.resume[0].resolve() == self.root.resolve()

    def restore(self, world: int) -> int:
        """Load the checkpoint chosen by ``open()`` (resharding it when its layout differs) and return its
        step; 0 when starting fresh. Sets the run id on every rank."""
        start, run_id = 0, None
        if self.resume:
            root, tag = self.resume
            saved_client = read_client_state(root / tag)
            check_compatible(saved_client, self.meta, f"{root}/{tag}")  # before any weight is loaded
            changes = check_resume_config(
                saved_client, self.cfg, self.data_id, f"{root}/{tag}", own_run=self.resuming_own_run
            )
            changes += global_batch_change(saved_client, self.cfg.train, world)
            if self.rank == 0 and changes:
                print(f"[s2moe] resuming {root}/{tag} with changed settings: " + "; ".join(changes), flush=True)
            run_id = saved_client.get("run_id")
            saved = read_layout(root / tag, saved_client)
            client = self._reshard(root / tag, saved) if saved is not None and saved != self.layout else self._load()
            # the schedule is ours, a pure function of the step: recompute every group's lr with this config's lr
            apply_schedule(self.scheduler, self.cfg.train.lr)
            check_compatible(client, self.meta, f"{root}/{tag}")
            start = client["step"]
        self.run_id = broadcast_str(run_id or run_id_of(self.out_dir) or uuid.uuid4().hex[:12])
        return start

    def _reshard(self, ckpt: Path, saved: ParallelLayout) -> dict:
        if not has_portable(ckpt):
            raise CheckpointError(
                f"{ckpt} was written with the parallel layout {saved} and this run has {self.layout}, but the "
                f"checkpoint has no portable copy (the run had train.portable_checkpoints=false), so its "
                f"optimizer state cannot be resharded: resume with the layout that wrote it (its weights still "
                f"evaluate and export under any layout: `s2moe eval`, `s2moe export`)"
            )
        client = resume_resharded(self.engine, self.model, self.scheduler, ckpt)
        if self.rank == 0:
            print(f"[s2moe] resharded {ckpt}: {saved} -> {self.layout} (model and optimizer state)", flush=True)
        return client

    def _load(self) -> dict:
        root, tag = self.resume
        try:
            path, client = self.engine.load_checkpoint(str(root), tag)
        except RuntimeError as e:
            if not any(s in str(e) for s in ("size mismatch", "Missing key", "Unexpected key")):
                raise
            raise CheckpointError(
                f"{root}/{tag} holds a model of another shape than this config's ({str(e).splitlines()[0][:300]}); "
                f"resume with the model settings it was trained with (its config.yaml)"
            ) from None
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {root}/{tag}")
        return client

    def record(self, start: int, nothing_to_train: bool) -> None:
        """Rank 0 writes the run id and the resolved config (the previous one kept on resume; a resume with
        nothing to train leaves the record as it is) and removes never-published partial writes."""
        self.resolved = self.cfg.to_dict()
        if self.rank != 0:
            return
        write_run_id(self.out_dir, self.run_id)
        if not nothing_to_train:
            keep = f"config.before-step{start:07d}.yaml" if self.resume else None
            write_config(self.out_dir, self.resolved, keep_previous_as=keep)
        for stale in self.root.glob("step*" + PARTIAL):
            print(f"[s2moe] removing {stale}: an interrupted, never-published checkpoint write", flush=True)
            shutil.rmtree(stale, ignore_errors=True)

    def due(self, done: int, end: int) -> bool:
        interval = self.cfg.train.save_interval
        return bool(interval and done % interval == 0) or done == end

    def save(self, step: int) -> None:
        """Write to ``{tag}.partial`` on every rank, then rank 0 verifies and publishes it as ``latest``.
        Weights that are not finite are never saved."""
        tag = f"step{step:07d}"
        partial = tag + PARTIAL
        if not _all_ranks_agree(all(bool(torch.isfinite(p).all()) for p in self.model.parameters())):
            raise NonFiniteLoss(
                f"step {step}: the weights are not finite (the updates diverged although the gradients were "
                f"finite: train.lr too large?); not saved. The last good checkpoint is "
                f"{latest_tag(self.root) or 'none'} in {self.root}; lower train.lr and resume with train.resume=auto"
            )
        client = {
            "step": step,
            "config": self.resolved,
            "vocab_fingerprint": vocab_fingerprint(self.meta),
            "layout": self.layout.to_dict(),
            "run_id": self.run_id,
            "data": self.data_id,
            "tokenizer": self.tokenizer,
        }
        try:
            self.engine.save_checkpoint(str(self.root), tag=partial, client_state=client, save_latest=False)
            if self.cfg.train.portable_checkpoints:
                save_portable(self.engine, self.model, self.root / partial, self.layout)
        except (OSError, RuntimeError) as e:
            # torch's writer reports a full disk as "unexpected pos ..." (a RuntimeError): give the free space
            cause = (
                describe_os_error(e, self.root)
                if isinstance(e, OSError)
                else f"{str(e).strip()}; {shutil.disk_usage(self.root).free:,} bytes free on that file system"
            )
            raise CheckpointError(
                f"writing checkpoint {self.root / partial} failed on rank {self.rank}: {cause}. Nothing was "
                f"published; the previous checkpoint ({latest_tag(self.root) or 'none'}) is intact. Fix that and "
                f"resume with train.resume=auto"
            ) from None
        dist.barrier()
        if self.rank == 0:
            publish(self.root, partial, tag, keep_last=self.cfg.train.keep_last, run_id=self.run_id)
        dist.barrier()
