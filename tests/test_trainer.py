"""The Trainer's Python API: hooks see every step the log records, the loop stops when a hook asks,
and a benchmark-style build (``run_dir=False``) writes nothing. Each case runs in a subprocess (a
process group must not leak into the test process)."""

from __future__ import annotations

import json
import sys

import pytest
from e2e import assert_ok, cli, run, train_losses

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
from s2moe_ds.config import load_config
from s2moe_ds.train import Hook, Trainer

class Record(Hook):
    def __init__(self):
        self.losses, self.calls = {}, 0
    def on_loss(self, trainer, step, loss):
        self.calls += 1
        return loss
    def after_step(self, trainer, result):
        self.losses[result.done] = result.loss
    def stop_requested(self):
        return len(self.losses) >= STOP_AFTER

data, out, mode = sys.argv[1:4]
cfg = load_config("configs/tiny.yaml", [f"data.data_dir={data}", f"train.out_dir={out}", "train.steps=6",
                                        "train.grad_accum=2", "train.log_interval=1", "train.eval_iters=1"])
rec = Record()
STOP_AFTER = 2 if mode == "stop" else 10**9
if mode in ("fit", "stop"):
    result = Trainer.build(cfg, hooks=[rec]).fit()
else:
    trainer = Trainer.build(cfg, hooks=[rec], run_dir=False)
    result = {"steps": [trainer.train_step(s).loss for s in range(3)]}
print("RESULT " + json.dumps({"losses": rec.losses, "calls": rec.calls, "result": result}))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "pydoc"
    assert_ok(cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={d}"))
    return d


def _run(data_dir, out, mode):
    proc = run([sys.executable, "-c", SCRIPT, str(data_dir), str(out), mode])
    assert_ok(proc)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_hooks_see_every_micro_batch_and_every_logged_step(data_dir, tmp_path):
    got = _run(data_dir, tmp_path / "run", "fit")
    assert got["calls"] == 6 * 2  # on_loss: once per micro-batch
    logged = train_losses(tmp_path / "run")
    assert sorted(int(k) for k in got["losses"]) == sorted(logged) == list(range(1, 7))
    assert all(abs(got["losses"][str(k)] - v) < 1e-6 for k, v in logged.items())
    assert got["result"]["step"] == 6 and got["result"]["val_loss"] > 0
    assert (tmp_path / "run" / "checkpoints" / "step0000006").is_dir()


def test_a_benchmark_build_trains_the_same_steps_and_writes_nothing(data_dir, tmp_path):
    fit = _run(data_dir, tmp_path / "run", "fit")
    bench = _run(data_dir, tmp_path / "bench", "bench")
    assert not (tmp_path / "bench").exists()
    # the same seeded windows and weights: the first steps equal the full run's
    assert [round(v, 5) for v in bench["result"]["steps"]] == [round(fit["losses"][str(s)], 5) for s in (1, 2, 3)]


def test_a_hook_can_end_the_run_early_with_a_checkpoint(data_dir, tmp_path):
    got = _run(data_dir, tmp_path / "run", "stop")
    assert sorted(int(k) for k in got["losses"]) == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step0000002"


def test_the_periodic_validation_is_the_first_batches_of_the_eval_walk(data_dir, tmp_path):
    """One evaluation path: the trainer's val loss at the last step equals `s2moe eval` over the same
    first batches (micro-batch size 8, eval_iters 1 per rank) of the final checkpoint."""
    got = _run(data_dir, tmp_path / "run", "fit")
    proc = cli("eval", str(tmp_path / "run"), "--batch-size", "8", "--max-batches", "1", "--device", "cpu")
    assert_ok(proc)
    line = next(x for x in proc.stdout.splitlines() if "val: loss" in x)
    evaluated = float(line.split("loss ")[1].split()[0])
    assert evaluated == pytest.approx(got["result"]["val_loss"], abs=5e-5)


def test_a_signal_after_the_stop_collective_is_acted_on_at_the_next_step():
    """The loop stops on the ranks' agreed answer, not on a rank's own flag: a SIGTERM landing between
    the collective and the check used to stop that rank alone, without the checkpoint its message named."""
    import os
    import signal

    from s2moe_ds.train.hooks import StopOnSignal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopOnSignal()
        assert not stop.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)  # after this step's collective
        assert stop.signum == signal.SIGTERM and not stop.agreed  # this step goes on, on every rank
        assert stop.stop_requested() and stop.agreed  # the next collective stops (and saves) everywhere
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
