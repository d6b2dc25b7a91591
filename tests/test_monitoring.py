"""What a user watching a long run sees: the progress line in a redirected log, the same numbers in
metrics.jsonl, TensorBoard, CSV and a W&B offline run (read back from W&B's own run file)."""

import json
import re
import struct

import pytest
from e2e import assert_ok, cli, deepspeed_train

pytestmark = pytest.mark.slow
COMMON = ["train.log_interval=2", "train.eval_iters=2", "train.eval_interval=4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "pydoc"
    assert_ok(cli("prepare", "--config", "configs/tiny.yaml", f"data.data_dir={d}"))
    return d


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def wandb_history(run_dir) -> dict[int, dict]:
    """W&B's offline run file, read with W&B's own record definitions: a LevelDB-style log (32 KiB
    blocks of [crc32 (4) | length (2) | type (1) | data] records after a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    history = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.HasField("history"):
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
    return history


def test_progress_line_in_a_redirected_log_and_every_tracker_gets_the_same_numbers(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    proc = deepspeed_train(
        2,
        [
            f"data.data_dir={data_dir}",
            f"train.out_dir={out}",
            "train.steps=8",
            "train.save_interval=4",
            "train.trackers=[tensorboard,csv,wandb]",
            *COMMON,
        ],
    )
    assert_ok(proc)  # output captured: not a terminal, so no tqdm bar, and the line must still be there
    lines = [l for l in proc.stdout.splitlines() if re.match(r"\[s2moe\] step \d+/8 \|", l)]
    assert len(lines) == 4, proc.stdout[-3000:]
    assert re.search(
        r"step 8/8 \| loss \d\.\d{4} \| lr \S+ \| [\d,]+ tok/s \| \d\.\d{3} s/step \| MFU \d+\.\d{2}% \| "
        r"grad \S+ \| rss \d+\.\d{2} GB \| elapsed \S+ \(eval \d+ s, ckpt \d+ s\) \| eta 0:00:00",
        lines[-1],
    )
    assert "MFU against" in proc.stdout
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    moe = {r["step"]: r for r in recs if r["kind"] == "moe"}
    assert sorted(train) == [2, 4, 6, 8]
    for key in (
        "train/mfu",
        "train/step_time_s",
        "train/grad_norm",
        "train/peak_memory_gb",
        "time/eval_s",
        "time/checkpoint_s",
        "time/eta_s",
    ):
        assert key in train[8], key
    assert train[8]["time/eval_s"] > 0 and train[8]["time/checkpoint_s"] > 0  # eval at 4, a checkpoint at 4
    # TensorBoard, CSV and W&B hold what metrics.jsonl holds
    tb_loss = tensorboard_scalars(out, "train/loss")
    tb_mfu = tensorboard_scalars(out, "train/mfu")
    csv_rows = [l.split(",") for l in (out / "metrics.csv").read_text().splitlines()[1:]]
    csv = {(int(s), n): float(v) for s, n, v in csv_rows}
    history = wandb_history(out)
    for step, rec in train.items():
        assert tb_loss[step] == pytest.approx(rec["train/loss"], rel=1e-6)
        assert tb_mfu[step] == pytest.approx(rec["train/mfu"], rel=1e-6)
        assert csv[(step, "train/loss")] == pytest.approx(rec["train/loss"], rel=1e-12)
        assert history[step]["train/loss"] == pytest.approx(rec["train/loss"], rel=1e-12)
        assert history[step]["train/mfu"] == pytest.approx(rec["train/mfu"], rel=1e-12)
    for step, rec in moe.items():  # every MoE metric reaches W&B too
        assert history[step]["moe/layer0/load_imbalance"] == pytest.approx(rec["layer0/load_imbalance"], rel=1e-6)
        assert history[step]["moe/layer1/aux_balance"] == pytest.approx(rec["aux/layer1/balance"], rel=1e-6)
        assert history[step]["moe/layer0/tokens_per_expert/values"] == rec["layer0/tokens_per_expert"]
    val = {r["step"]: r["val/loss"] for r in recs if r["kind"] == "val"}
    assert history[4]["val/loss"] == pytest.approx(val[4], rel=1e-12)
