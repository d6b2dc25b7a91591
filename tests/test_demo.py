"""The README's first command: `bash launch/demo_cpu.sh` trains a tiny S2MoE through the deepspeed launcher
on 2 CPU processes, writes TensorBoard logs and a checkpoint, and prints evaluation and a sample."""

import pytest
from e2e import REPO, assert_ok, free_port, run


@pytest.mark.slow
def test_demo_script_trains_logs_checkpoints_and_evaluates(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tiny"
    proc = run(
        [
            "env",
            f"OUT={out}",
            f"MASTER_PORT={free_port()}",
            "bash",
            str(REPO / "launch/demo_cpu.sh"),
            "train.steps=20",
            "train.eval_interval=10",
            "train.save_interval=10",
            "train.progress=false",
        ],
        timeout=600,
    )
    assert_ok(proc)
    assert "+ deepspeed --num_gpus 2" in proc.stderr  # printed before it runs
    assert (out / "checkpoints" / "latest").read_text().strip() == "step0000020"
    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    assert [s.step for s in ev.Scalars("train/loss")][-1] == 20
    assert "val/bpc" in ev.Tags()["scalars"]
    # evaluation on val and test, then a sample
    assert "[s2moe eval] val: loss" in proc.stdout and "[s2moe eval] test: loss" in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.count(" bpc ") >= 2, proc.stdout[-2000:]
