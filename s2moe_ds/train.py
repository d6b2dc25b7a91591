"""Train an MoE language model under the DeepSpeed engine.

    # 2 CPU processes (gloo) or 2 GPUs (nccl), ZeRO from the config's ds_config
    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml train.steps=200
    # one plain process
    python -m s2moe_ds.train --config configs/tiny.yaml
    # resume the latest checkpoint of a run
    deepspeed --num_gpus 2 --module s2moe_ds.train --config configs/tiny.yaml train.resume=auto

Every random stream is re-seeded from (seed, step, micro-step, rank) before each micro-step, and
batches are drawn from the same key, so a resumed run repeats an uninterrupted one step for step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import (
    PARTIAL,
    CheckpointError,
    check_compatible,
    check_resume_config,
    latest_tag,
    publish,
    read_client_state,
    resolve_resume,
    run_id_of,
    vocab_fingerprint,
    write_config,
    write_run_id,
)
from .config import Config, load_config, validate
from .configtools import ConfigError
from .data.loader import WindowSampler, stream_seed
from .data.prepare import DataError, load_split, read_meta
from .distributed import (
    MasterWeights,
    all_reduce_mean,
    apply_schedule,
    broadcast_str,
    build_engine,
    device,
    init_distributed,
)
from .flops import flops_per_token
from .model import MoELanguageModel
from .monitor import Monitor, StepMoEMetrics, quality
from .progress import Progress, device_peak_flops
from .reshard import has_portable, read_layout, resume_resharded, save_portable
from .runlock import lock_run_dir


def tqdm_write(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg)


class NonFiniteLoss(RuntimeError):
    pass


class Stopped(Exception):
    """Training stopped on SIGTERM/SIGINT after every rank saved a checkpoint (exit code 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def finite_parameters(model) -> bool:
    """Every parameter finite (a step can apply a finite gradient with a non-finite update, e.g. lr too large)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def describe_os_error(e: OSError, path: Path) -> str:
    """The real cause of a failed write: permissions, space, or what the OS said."""
    import errno

    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({e.strerror}): make {path} writable"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left ({shutil.disk_usage(path if path.exists() else path.parent).free:,} bytes free on that "
            f"file system): free space there (or set train.keep_last)"
        )
    return f"{e.strerror or e}"


def is_comm_failure(e: BaseException) -> bool:
    """A collective failed because of the other ranks (gloo/NCCL report these as RuntimeError)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "NCCL", "gloo")
    )


def inject_rank_fault(rank: int, step: int) -> None:
    """``S2MOE_INJECT_FAULT=raise@R:S`` or ``hang@R:S``: rank R fails or stops responding at step S
    (fault injection for the reliability tests)."""
    spec = os.environ.get("S2MOE_INJECT_FAULT")
    if not spec:
        return
    kind, where = spec.split("@")
    r, s = (int(v) for v in where.split(":"))
    if (r, s) != (rank, step):
        return
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    time.sleep(10**6)


def grad_norm(engine) -> float | None:
    """The global gradient norm of the last step, when the engine computed one (it does when clipping)."""
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    value = float(value)
    return value if value == value and value >= 0 else None


def global_batch_change(client: dict, t, world: int) -> list[str]:
    """A line when the global batch (windows per optimizer step) differs from the checkpoint's, with the
    ``train.grad_accum`` that would keep it."""
    saved_t = (client.get("config") or {}).get("train", {})
    saved_world = (client.get("layout") or {}).get("world")
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


def set_aside_leftovers(out_dir: Path, rank: int) -> None:
    """``train.resume=auto`` with no checkpoint to resume but logs of a run that died before its first
    checkpoint: move them into ``abandoned-N/`` (rank 0) so the new run's logs do not mix with them."""
    if rank == 0:
        leftovers = [
            n
            for n in ("metrics.jsonl", "config.yaml", "run.json", "tensorboard", "checkpoints")
            if (out_dir / n).exists()
        ]
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


class StopRequest:
    """SIGTERM / SIGINT (what SLURM sends before pre-emption, or Ctrl-C) only set a flag; at the end of
    the step every rank learns whether any rank was signalled, so all save together and exit cleanly."""

    def __init__(self):
        self.name = None
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        self.signum = int(signum)

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.signum)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.name:
            self.name = "a stop signal (on another rank)"
            self.signum = int(flag.item())
        return bool(flag.item())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML/JSON config (configs/*.yaml); built-in defaults if omitted")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.moe.router=xmoe")
    return ap.parse_args(argv)


@torch.no_grad()
def evaluate(engine, sampler: WindowSampler, cfg: Config, rank: int, dev) -> float:
    engine.eval()
    losses = []
    for i in range(cfg.train.eval_iters):
        x, y = sampler.batch(cfg.train.micro_batch_size, cfg.train.seed, step=-1, index=i * 1000 + rank)
        losses.append(engine(x.to(dev), y.to(dev)).loss.float())
    engine.train()
    return float(all_reduce_mean(torch.stack(losses).mean()))


def train(cfg: Config) -> dict:
    t = cfg.train
    rank, world = init_distributed(t.dist_timeout_s)
    validate(cfg, world_size=world)  # the rules that need the world size (model.moe.ep_size)
    dev = device()
    meta = read_meta(cfg.data.data_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size != meta["vocab_size"]:
        raise ConfigError(
            f"config field 'model.vocab_size' is {cfg.model.vocab_size} but the dataset in "
            f"{cfg.data.data_dir} has {meta['vocab_size']} symbols; set it to 0 (take it from the data)"
        )
    splits = {name: load_split(cfg.data.data_dir, name, meta) for name in ("train", "val")}
    for name, tokens in splits.items():
        if len(tokens) <= cfg.model.context + 1:
            raise ConfigError(
                f"config field 'model.context' is {cfg.model.context} but the {name} split of "
                f"{cfg.data.data_dir} has only {len(tokens)} tokens; lower model.context below "
                f"{len(tokens) - 1} or prepare more data"
            )
    train_windows = WindowSampler(splits["train"], cfg.model.context)
    val_windows = WindowSampler(splits["val"], cfg.model.context)
    check_writable(Path(t.out_dir))
    run_lock = lock_run_dir(t.out_dir, rank)  # noqa: F841 (held open for the job's lifetime)
    resume = resolve_resume(t.resume, t.out_dir)
    out_dir = Path(t.out_dir)
    if t.resume == "auto" and not resume:
        set_aside_leftovers(out_dir, rank)
    data_id = {"dataset": meta.get("dataset"), "source_sha256": meta.get("source_sha256")}

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = MoELanguageModel(cfg.model, seed=t.seed).to(dev)
    model.set_total_steps(t.steps, t.seed)
    engine, scheduler = build_engine(model, cfg)
    layout = {
        "world": world,
        "ep_size": cfg.model.moe.ep_size,
        "backend": cfg.model.moe.backend,
        "zero_stage": engine.zero_optimization_stage(),
    }
    start = 0
    run_id = None
    if resume:
        root, tag = resume
        saved_client = read_client_state(root / tag)
        check_compatible(saved_client, meta, f"{root}/{tag}")  # before any weight is loaded
        own = root.resolve() == (out_dir / "checkpoints").resolve()
        changes = check_resume_config(saved_client, cfg, data_id, f"{root}/{tag}", own_run=own)
        changes += global_batch_change(saved_client, t, world)
        if rank == 0 and changes:
            print(f"[s2moe] resuming {root}/{tag} with changed settings: " + "; ".join(changes), flush=True)
        run_id = saved_client.get("run_id")
        saved = read_layout(root / tag, saved_client)
        if saved is not None and saved != layout:
            if not has_portable(root / tag):
                raise CheckpointError(
                    f"{root}/{tag} was written with the parallel layout {saved} and this run has {layout}, but the "
                    f"checkpoint has no portable copy (the run had train.portable_checkpoints=false), so its "
                    f"optimizer state cannot be resharded: resume with the layout that wrote it (its weights still "
                    f"evaluate and export under any layout: `s2moe eval`, `s2moe export`)"
                )
            client = resume_resharded(engine, model, scheduler, root / tag)
            if rank == 0:
                print(f"[s2moe] resharded {root / tag}: {saved} -> {layout} (model and optimizer state)", flush=True)
        else:
            try:
                path, client = engine.load_checkpoint(str(root), tag)
            except RuntimeError as e:
                if "size mismatch" not in str(e) and "Missing key" not in str(e) and "Unexpected key" not in str(e):
                    raise
                raise CheckpointError(
                    f"{root}/{tag} holds a model of another shape than this config's "
                    f"({str(e).splitlines()[0][:300]}); resume with the model settings it was "
                    f"trained with (its config.yaml)"
                ) from None
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {root}/{tag}")
            apply_schedule(scheduler, t.lr)  # the restored schedule keeps the old lr; apply the config's
        check_compatible(client, meta, f"{root}/{tag}")
        start = client["step"]
    run_id = broadcast_str(run_id or run_id_of(out_dir) or uuid.uuid4().hex[:12])
    end = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
    own_noop = bool(resume) and start >= end and resume[0].resolve() == (out_dir / "checkpoints").resolve()

    resolved = cfg.to_dict()
    if rank == 0:
        write_run_id(out_dir, run_id)
        if not own_noop:  # a resume with nothing to train leaves the run's record as it is
            write_config(out_dir, resolved, keep_previous_as=f"config.before-step{start:07d}.yaml" if resume else None)
        for stale in (out_dir / "checkpoints").glob("step*" + PARTIAL):
            print(f"[s2moe] removing {stale}: an interrupted, never-published checkpoint write", flush=True)
            shutil.rmtree(stale, ignore_errors=True)
    mon = Monitor(out_dir, rank == 0, t.trackers, resolved, run_id=run_id)
    counts = model.param_counts()
    flops_train = flops_per_token(cfg.model, training=True, batch_tokens=t.micro_batch_size * cfg.model.context)
    qname = quality(0.0, meta["tokenizer"])[0]
    if rank == 0:
        print(
            f"[s2moe] world={world} device={dev} params total={counts['total']:,} "
            f"active/token={counts['active_per_token']:,} train GFLOPs/token={flops_train / 1e9:.4f} "
            f"steps {start}->{t.steps}" + (f" (resumed from {resume[0]}/{resume[1]})" if resume else ""),
            flush=True,
        )

    def save(step: int) -> None:
        t0 = time.perf_counter()
        try:
            _save(step)
        finally:
            prog.add_ckpt(time.perf_counter() - t0)

    def _save(step: int) -> None:
        """Write to ``{tag}.partial`` on every rank, then rank 0 verifies and publishes it as ``latest``."""
        client = {
            "step": step,
            "config": resolved,
            "vocab_fingerprint": vocab_fingerprint(meta),
            "layout": layout,
            "run_id": run_id,
            "data": data_id,
        }
        root, tag = out_dir / "checkpoints", f"step{step:07d}"
        partial = tag + PARTIAL
        ok = torch.tensor([1.0 if finite_parameters(model) else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            raise NonFiniteLoss(
                f"step {step}: the weights are not finite (the updates diverged although the "
                f"gradients were finite: train.lr too large?); not saved. The last good checkpoint "
                f"is {latest_tag(root) or 'none'} in {root}; lower train.lr and resume with "
                f"train.resume=auto"
            )
        try:
            engine.save_checkpoint(str(root), tag=partial, client_state=client, save_latest=False)
            if t.portable_checkpoints:
                save_portable(engine, model, root / partial, layout)
        except (OSError, RuntimeError) as e:
            previous = latest_tag(root)
            # torch's writer reports a full disk as "unexpected pos ..." (a RuntimeError): give the free space
            cause = (
                describe_os_error(e, root)
                if isinstance(e, OSError)
                else (f"{str(e).strip()}; {shutil.disk_usage(root).free:,} bytes free on that file system")
            )
            raise CheckpointError(
                f"writing checkpoint {root / partial} failed on rank {rank}: {cause}. Nothing was "
                f"published; the previous checkpoint ({previous or 'none'}) is intact. Fix that and "
                f"resume with train.resume=auto"
            ) from None
        dist.barrier()
        if rank == 0:
            publish(root, partial, tag, keep_last=t.keep_last, run_id=run_id)
        dist.barrier()

    tokens_per_step = t.micro_batch_size * t.grad_accum * world * cfg.model.context
    peak, peak_source = device_peak_flops(t.precision, t.peak_tflops)
    prog = Progress(end, start, tokens_per_step, flops_train, peak * world)
    if rank == 0:
        print(
            f"[s2moe] MFU against {peak * world / 1e12:.3f} TFLOP/s ({world} x {peak / 1e12:.3f}, {peak_source})",
            flush=True,
        )
    progress = None
    if rank == 0 and t.progress and sys.stderr.isatty():  # a bar only on a terminal; the line goes to any log
        from tqdm import tqdm

        progress = tqdm(total=t.steps, initial=start, desc="train", mininterval=2, file=sys.stderr)
    result = {}
    stop = StopRequest()
    engine.train()
    if resume and start >= end and not own_noop:
        save(start)  # a checkpoint of another run and no step to train (`s2moe reshard`): write it in this layout
    if own_noop:
        if rank == 0:
            print(
                f"[s2moe] {resume[0]}/{resume[1]} is already at step {start} (train.steps={t.steps}"
                + (f", train.stop_at_step={t.stop_at_step}" if t.stop_at_step else "")
                + "): nothing to train",
                flush=True,
            )
    skipped = consecutive = 0
    inject = {int(v) for v in os.environ.get("S2MOE_INJECT_NONFINITE_AT", "").split(",") if v.strip()}
    can_skip = engine.zero_optimization_stage() >= 1
    bias_balancing = model.uses_selection_bias()
    try:
        for step in range(start, end):
            step_t0 = time.perf_counter()
            model.set_step(step)
            micro_losses = []
            moe_step = StepMoEMetrics()
            for micro in range(t.grad_accum):
                # the global micro-batch index: the same windows and noise whatever the (world, accum) split
                g = micro * world + rank
                torch.manual_seed(stream_seed(t.seed, step, g, 1))
                x, y = train_windows.batch(t.micro_batch_size, t.seed, step, g)
                out = engine(x.to(dev), y.to(dev))
                loss_total = out.loss + out.aux_loss
                if step in inject:  # fault injection for the reliability tests (documented in README)
                    loss_total = loss_total * float("nan")
                inject_rank_fault(rank, step)
                engine.backward(loss_total)
                engine.step()
                moe_step.add(out.aux_losses, out.metrics)
                micro_losses.append(
                    torch.stack([out.loss.detach().float(), loss_total.detach().float() - out.loss.detach().float()])
                )
            stats = all_reduce_mean(torch.stack(micro_losses).mean(0))
            loss, aux = float(stats[0]), float(stats[1])
            prog.add_train(time.perf_counter() - step_t0)
            finite = bool(torch.isfinite(stats).all())
            if not finite and not can_skip:
                raise NonFiniteLoss(
                    f"step {step}: training loss is {loss} (aux {aux}); the weights are diverging. "
                    f"Lower train.lr, keep train.grad_clip > 0, or train in fp32; the last good "
                    f"checkpoint is in {out_dir / 'checkpoints'} (resume with train.resume=auto)"
                )
            step_skipped = not (engine.was_step_applied() and finite)
            reduced = None
            if not step_skipped:
                consecutive = 0
                model.after_optimizer_step(MasterWeights)  # e.g. XMoE's embeddings back to norm 1.5
                if bias_balancing:  # aux-loss-free balancing: every step, from the global load
                    reduced = moe_step.reduce()
                    model.update_selection_bias(reduced[1])
            else:
                # ZeRO 1/2 found a non-finite gradient norm and discarded the step (parameters unchanged)
                skipped += 1
                consecutive += 1
                mon.scalars(step + 1, {"train/skipped_steps": skipped}, record="skip")
                if rank == 0:
                    print(
                        f"[s2moe] step {step + 1}: non-finite loss/gradient, step skipped "
                        f"({consecutive} in a row, {skipped} in total)",
                        flush=True,
                    )
                if consecutive > t.max_skipped_steps:
                    save(step + 1)
                    raise NonFiniteLoss(
                        f"{consecutive} steps in a row had a non-finite loss or gradient (limit "
                        f"train.max_skipped_steps={t.max_skipped_steps}); saved the last good state as "
                        f"checkpoint step{step + 1:07d}. Lower train.lr or check the data, then "
                        f"resume with train.resume=auto"
                    )
            done = step + 1
            if progress:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}")
            if (done % t.log_interval == 0 or done == end) and not step_skipped:
                aux_by_layer, metrics = reduced or moe_step.reduce()
                lr = scheduler.get_last_lr()[0]
                line, timing = prog.report(done, loss, lr, grad_norm(engine))
                mon.scalars(
                    done,
                    {
                        "train/loss": loss,
                        f"train/{qname}": quality(loss, meta["tokenizer"])[1],
                        "train/aux_loss": aux,
                        "train/lr": lr,
                        **timing,
                    },
                )
                mon.moe(done, aux_by_layer, metrics)
                if rank == 0:
                    tqdm_write(line) if progress else print(line, flush=True)
            if done % t.eval_interval == 0 or done == end:
                eval_t0 = time.perf_counter()
                val = evaluate(engine, val_windows, cfg, rank, dev)
                prog.add_eval(time.perf_counter() - eval_t0)
                result = {"step": done, "val_loss": val, f"val_{qname}": quality(val, meta["tokenizer"])[1]}
                mon.scalars(done, {"val/loss": val, f"val/{qname}": result[f"val_{qname}"]}, record="val")
                if rank == 0:
                    msg = f"[s2moe] step {done}: train loss {loss:.4f}  val loss {val:.4f}  val {qname} {result[f'val_{qname}']:.4f}"
                    tqdm_write(msg) if progress else print(msg, flush=True)
            stopping = stop.agreed()
            if (t.save_interval and done % t.save_interval == 0) or done == end or stopping:
                save(done)
            mon.flush()
            if stopping:
                raise Stopped(
                    f"{stop.name} received: saved checkpoint step{done:07d} and stopped; continue with "
                    f"train.resume=auto",
                    stop.signum,
                )
    finally:
        # logs written so far reach disk even when a step fails or a peer is lost
        if progress:
            progress.close()
        mon.close()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(load_config(args.config, args.overrides))
    except Stopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"[s2moe] {e} (exit code {128 + e.signum})", flush=True)
        return 128 + e.signum
    except (ConfigError, DataError, CheckpointError, NonFiniteLoss, OSError) as e:
        # a problem with the inputs, the disk or the run itself: one clear message per rank, no traceback
        rank = os.environ.get("RANK", "0")
        where = (
            " (while writing logs or checkpoints; published checkpoints are intact)" if isinstance(e, OSError) else ""
        )
        print(f"s2moe train [rank {rank}]: error: {e}{where}", file=sys.stderr, flush=True)
        return 3 if isinstance(e, NonFiniteLoss) else 2
    except RuntimeError as e:
        if not is_comm_failure(e):
            raise
        # a peer died (its connection closed) or stopped answering (train.dist_timeout_s passed)
        rank = os.environ.get("RANK", "0")
        print(
            f"s2moe train [rank {rank}]: error: a collective operation with the other ranks failed: another "
            f"rank died or did not answer within train.dist_timeout_s; see the other ranks' messages above "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})",
            file=sys.stderr,
            flush=True,
        )
        # The process group is now wedged: tearing it down at interpreter exit can block on the lost peer or
        # abort in gloo's destructors ("terminate called without an active exception"). Logs were closed by
        # train(); flush what is buffered and leave without running that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(4)
    except Exception as e:
        rank = os.environ.get("RANK", "0")
        print(
            f"s2moe train [rank {rank}]: failed with an unexpected {type(e).__name__}: {e}", file=sys.stderr, flush=True
        )
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
