"""The trainer: ``Trainer.build(cfg)`` makes the process group, data, model, DeepSpeed engine and the
run's checkpointer; ``train_step(step)`` is one optimizer step over ``train.grad_accum`` micro-batches;
``fit()`` is the loop (log, evaluate, checkpoint, stop) with its hooks.

Every random stream is re-seeded from (seed, step, micro-step, rank) before each micro-step, and
batches are drawn from the same key, so a resumed run repeats an uninterrupted one step for step.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.portable import ParallelLayout
from ..checkpoint.resume import resolve_resume
from ..config import Config, validate
from ..configtools import ConfigError
from ..data.loader import WindowSampler, stream_seed
from ..data.store import load_split, read_meta
from ..distributed import MasterWeights, all_reduce_mean, build_engine, device, init_distributed
from ..evaluate import quality, summed_loss
from ..flops import flops_per_token
from ..model import MoELanguageModel
from ..monitor import Monitor, StepMoEMetrics, check_trackers
from ..progress import Progress, device_peak_flops
from .checkpointer import Checkpointer
from .hooks import Hook, NonFinitePolicy, StopOnSignal
from .optim import build_optimizer


@dataclass
class StepResult:
    """One optimizer step, reduced over every micro-batch and rank."""

    step: int  # 0-based index of the step just taken
    loss: float
    aux: float
    finite: bool
    skipped: bool  # the optimizer did not apply it (non-finite loss or gradient)
    seconds: float
    moe: StepMoEMetrics = field(repr=False)
    reduced: tuple | None = field(default=None, repr=False)  # moe.reduce(), when already taken

    @property
    def done(self) -> int:
        return self.step + 1


def grad_norm(engine) -> float | None:
    """The global gradient norm of the last step, when the engine computed one (it does when clipping)."""
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    value = float(value)
    return value if value == value and value >= 0 else None


def load_data(cfg: Config) -> tuple[dict, WindowSampler, WindowSampler]:
    """The prepared dataset's meta and the train/val window samplers; fills ``model.vocab_size`` from the data."""
    meta = read_meta(cfg.data.data_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size != meta["vocab_size"]:
        raise ConfigError(
            f"config field 'model.vocab_size' is {cfg.model.vocab_size} but the dataset in {cfg.data.data_dir} "
            f"has {meta['vocab_size']} symbols; set it to 0 (take it from the data)"
        )
    splits = {name: load_split(cfg.data.data_dir, name, meta) for name in ("train", "val")}
    for name, tokens in splits.items():
        if len(tokens) <= cfg.model.context + 1:
            lower = f"lower model.context below {len(tokens) - 1} or " if len(tokens) > 2 else ""
            raise ConfigError(
                f"config field 'model.context' is {cfg.model.context} but the {name} split of {cfg.data.data_dir} "
                f"has only {len(tokens)} tokens; {lower}prepare more data"
            )
    return meta, WindowSampler(splits["train"], cfg.model.context), WindowSampler(splits["val"], cfg.model.context)


def preflight(cfg: Config) -> None:
    """The checks that read a few files, run before any build, process group or model: a start fails in one
    line within seconds. Every rank runs them before it joins the group, so none sees another's writes."""
    read_meta(cfg.data.data_dir)
    check_trackers(cfg.train.trackers)
    if cfg.train.resume == "":
        resolve_resume("", cfg.train.out_dir)  # refuses a folder that holds a run
    if cfg.train.init_from and cfg.train.resume == "" and not Path(cfg.train.init_from).exists():
        raise ConfigError(
            f"config field 'train.init_from': {cfg.train.init_from!r} does not exist; give a run directory, a "
            f"checkpoint folder or an exported folder (relative paths start at {Path.cwd()})"
        )


class Trainer:
    def __init__(self, cfg: Config, rank: int, world: int, meta: dict, windows: tuple, hooks: list[Hook]):
        self.cfg, self.rank, self.world, self.meta = cfg, rank, world, meta
        self.train_windows, self.val_windows = windows
        self.hooks = [NonFinitePolicy(), *hooks]
        self.dev = device()
        self.out_dir = Path(cfg.train.out_dir)
        self.checkpointer: Checkpointer | None = None
        self.monitor: Monitor | None = None
        self._bar = None
        self.result: dict = {}
        self._interval_losses: list[float] = []

    @classmethod
    def build(cls, cfg: Config, hooks=(), run_dir: bool = True, ds_overrides: dict | None = None) -> Trainer:
        """Everything a step needs. ``run_dir=False`` (benchmarks) takes no lock, resumes nothing and
        writes nothing; ``ds_overrides`` are merged into the DeepSpeed config."""
        t = cfg.train
        if run_dir:
            preflight(cfg)
        rank, world = init_distributed(t.dist_timeout_s)
        validate(cfg, world_size=world)  # the rules that need the world size (model.moe.ep_size)
        meta, *windows = load_data(cfg)
        self = cls(cfg, rank, world, meta, tuple(windows), list(hooks))
        if run_dir:
            self.checkpointer = Checkpointer(cfg, meta, rank)
            self.checkpointer.open()
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = MoELanguageModel(cfg.model, seed=t.seed)
        resuming = self.checkpointer is not None and self.checkpointer.resume is not None
        if t.init_from and not resuming:  # before the engine: its fp32 masters and ZeRO partitions copy these
            from ..checkpoint.init_from import init_from

            self.say(init_from(self.model, t.init_from, meta, cfg.data.data_dir))
        self.model = self.model.to(self.dev)
        self.model.set_total_steps(t.steps, t.seed)
        optimizer, schedule = build_optimizer(self.model, cfg)
        self.engine, self.scheduler = build_engine(self.model, cfg, optimizer, schedule, ds_overrides)
        self.layout = ParallelLayout(
            world, cfg.model.moe.ep_size, cfg.model.moe.backend, self.engine.zero_optimization_stage()
        )
        self.can_skip = self.engine.zero_optimization_stage() >= 1
        self.bias_balancing = self.model.uses_selection_bias()
        if self.checkpointer:
            self.checkpointer.attach(self.engine, self.model, self.scheduler, self.layout)
        return self

    def say(self, msg: str) -> None:
        """A line on rank 0's stdout (above the progress bar when there is one)."""
        if self.rank != 0:
            return
        if self._bar:
            from tqdm import tqdm

            tqdm.write(msg)
        else:
            print(msg, flush=True)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step: ``train.grad_accum`` micro-batches, each seeded from (seed, step, global
        micro-batch index), so the same windows and noise come whatever the (world, accum) split."""
        t, t0 = self.cfg.train, time.perf_counter()
        self.model.set_step(step)
        losses, moe = [], StepMoEMetrics()
        for micro in range(t.grad_accum):
            g = micro * self.world + self.rank
            torch.manual_seed(stream_seed(t.seed, step, g, 1))
            x, y = self.train_windows.batch(t.micro_batch_size, t.seed, step, g)
            out = self.engine(x.to(self.dev), y.to(self.dev))
            total = out.loss + out.aux_loss
            for hook in self.hooks:
                total = hook.on_loss(self, step, total)
            self.engine.backward(total)
            self.engine.step()
            moe.add(out.aux_losses, out.metrics)
            main = out.loss.detach().float()
            losses.append(torch.stack([main, total.detach().float() - main]))
        stats = all_reduce_mean(torch.stack(losses).mean(0))
        finite = bool(torch.isfinite(stats).all())
        result = StepResult(step, float(stats[0]), float(stats[1]), finite, False, 0.0, moe)
        result.skipped = not (self.engine.was_step_applied() and finite)
        if not result.skipped:
            self.model.after_optimizer_step(MasterWeights)  # e.g. XMoE's embeddings back to norm 1.5
            if self.bias_balancing:  # aux-loss-free balancing: every step, from the global load
                result.reduced = moe.reduce()
                self.model.update_selection_bias(result.reduced[1])
        result.seconds = time.perf_counter() - t0
        return result

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss (token mean) over the first ``train.eval_iters`` batches per rank of the walk
        ``s2moe eval`` makes over the whole split (the same windows on every call)."""
        t = self.cfg.train
        self.engine.eval()
        windows = self.val_windows.walk_prefix(t.micro_batch_size, t.eval_iters, self.rank, self.world)
        acc = summed_loss(self.engine, windows, self.dev)
        self.engine.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(acc)
        return float(acc[0] / acc[1].clamp_min(1))

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        try:
            self.checkpointer.save(step)
        finally:
            self.progress.add_ckpt(time.perf_counter() - t0)

    def _open_run(self) -> None:
        """Resume (or start), write the run's records, open the monitor and the progress line."""
        if self.checkpointer is None:
            raise RuntimeError("Trainer.fit() needs a run directory: build it with run_dir=True")
        t, ck = self.cfg.train, self.checkpointer
        self.start = ck.restore(self.world)
        self.end = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
        self.nothing_to_train = ck.resuming_own_run and self.start >= self.end
        ck.record(self.start, self.nothing_to_train)
        self.monitor = Monitor(self.out_dir, self.rank == 0, t.trackers, ck.resolved, run_id=ck.run_id)
        self.quality_name = quality(0.0, self.meta["tokenizer"])[0]
        counts = self.model.param_counts()
        flops = flops_per_token(self.cfg.model, training=True, batch_tokens=t.micro_batch_size * self.cfg.model.context)
        resumed = f" (resumed from {ck.resume[0]}/{ck.resume[1]})" if ck.resume else ""
        self.say(
            f"[s2moe] world={self.world} device={self.dev} params total={counts['total']:,} "
            f"active/token={counts['active_per_token']:,} train GFLOPs/token={flops / 1e9:.4f} "
            f"steps {self.start}->{t.steps}{resumed}"
        )
        tokens_per_step = t.micro_batch_size * t.grad_accum * self.world * self.cfg.model.context
        peak, peak_source = device_peak_flops(t.precision, t.peak_tflops)
        self.progress = Progress(self.end, self.start, tokens_per_step, flops, peak * self.world)
        self.say(
            f"[s2moe] MFU against {peak * self.world / 1e12:.3f} TFLOP/s ({self.world} x {peak / 1e12:.3f}, "
            f"{peak_source})"
        )
        self._bar = None
        if self.rank == 0 and t.progress and sys.stderr.isatty():  # a bar only on a terminal; the line goes to any log
            from tqdm import tqdm

            self._bar = tqdm(total=t.steps, initial=self.start, desc="train", mininterval=2, file=sys.stderr)

    def _before_loop(self) -> None:
        t, ck = self.cfg.train, self.checkpointer
        self.engine.train()
        if ck.resume and self.start >= self.end and not self.nothing_to_train:
            self.save(self.start)  # another run's checkpoint and no step to train (`s2moe reshard`): this layout
        if self.nothing_to_train:
            stop_at = f", train.stop_at_step={t.stop_at_step}" if t.stop_at_step else ""
            self.say(
                f"[s2moe] {ck.resume[0]}/{ck.resume[1]} is already at step {self.start} "
                f"(train.steps={t.steps}{stop_at}): nothing to train"
            )

    def _log(self, r: StepResult) -> None:
        if self._bar:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{r.loss:.3f}")
        if not r.skipped:
            self._interval_losses.append(r.loss)
        if r.skipped or not (r.done % self.cfg.train.log_interval == 0 or r.done == self.end):
            return
        # train/loss: the mean over the steps since the last record (since the start, after a resume), so a
        # curve logged every N steps is not one noisy batch in N; the logged step's own loss is train/loss_step
        loss = sum(self._interval_losses) / len(self._interval_losses)
        self._interval_losses = []
        aux_by_layer, metrics = r.reduced or r.moe.reduce()
        lr = self.scheduler.get_last_lr()[0]
        line, timing = self.progress.report(r.done, loss, lr, grad_norm(self.engine))
        q = self.quality_name
        values = {
            "train/loss": loss,
            "train/loss_step": r.loss,
            f"train/{q}": quality(loss, self.meta["tokenizer"])[1],
        }
        self.monitor.scalars(r.done, {**values, "train/aux_loss": r.aux, "train/lr": lr, **timing})
        self.monitor.moe(r.done, aux_by_layer, metrics)
        self.say(line)

    def _maybe_evaluate(self, r: StepResult) -> None:
        if not (r.done % self.cfg.train.eval_interval == 0 or r.done == self.end):
            return
        t0 = time.perf_counter()
        val = self.evaluate()
        self.progress.add_eval(time.perf_counter() - t0)
        q = self.quality_name
        score = quality(val, self.meta["tokenizer"])[1]
        self.result = {"step": r.done, "val_loss": val, f"val_{q}": score}
        self.monitor.scalars(r.done, {"val/loss": val, f"val/{q}": score}, record="val")
        self.say(f"[s2moe] step {r.done}: train loss {r.loss:.4f}  val loss {val:.4f}  val {q} {score:.4f}")

    def fit(self) -> dict:
        """Train from the resumed step to ``train.steps`` (or ``train.stop_at_step``); the last validation
        result ({step, val_loss, val_<quality>})."""
        self._open_run()
        try:
            stop = StopOnSignal()
            self.hooks.append(stop)
            self._before_loop()
            for step in range(self.start, self.end):
                result = self.train_step(step)
                self.progress.add_train(result.seconds)
                for hook in self.hooks:
                    hook.after_step(self, result)
                self._log(result)
                self._maybe_evaluate(result)
                asked = [hook.stop_requested() for hook in self.hooks]  # every hook is asked (collectives)
                if self.checkpointer.due(result.done, self.end) or any(asked):
                    self.save(result.done)
                self.monitor.flush()
                if stop.agreed:  # not stop.signum: a signal after the collective would stop this rank alone, unsaved
                    raise stop.stopped(result.done)
                if any(asked):  # another hook ended the run early: saved, a normal end
                    break
        finally:  # logs written so far reach disk even when a step fails or a peer is lost
            if self._bar:
                self._bar.close()
            self.monitor.close()
        return self.result


def train(cfg: Config, hooks=()) -> dict:
    """Build a trainer for ``cfg`` and fit it; the last validation result."""
    return Trainer.build(cfg, hooks=hooks).fit()
