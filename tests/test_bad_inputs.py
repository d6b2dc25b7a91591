"""At least 25 bad inputs, each a clear error naming the problem and the fix, each leaving an existing
run's checkpoints and logs exactly as they were. Plus an unwritable run directory and a full disk."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e import REPO, assert_ok, cli, env, single_train, snapshot

pytestmark = pytest.mark.slow
CFG = ["--config", "configs/tiny.yaml"]
COMMON = ["train.log_interval=1", "train.eval_iters=2", "train.progress=false", "train.eval_interval=100"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    data = base / "pydoc"
    assert_ok(cli("prepare", *CFG, f"data.data_dir={data}"))
    run = base / "run"
    assert_ok(single_train([f"data.data_dir={data}", f"train.out_dir={run}", "train.steps=2", *COMMON]))
    other = base / "other"  # a dataset with a different vocabulary
    src = base / "t.txt"
    src.write_text("abcd " * 2000)
    assert_ok(cli("prepare", "data.dataset=text", f"data.source={src}", f"data.data_dir={other}"))
    # damaged copies of the dataset
    for name in ("truncated", "badmeta", "mismatch"):
        d = base / name
        d.mkdir()
        for f in data.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
    with open(base / "truncated" / "train.bin", "r+b") as f:
        f.truncate(1000)
    (base / "badmeta" / "meta.json").write_text("{broken")
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_size"] = 20
    (base / "mismatch" / "meta.json").write_text(json.dumps(meta))
    (base / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    (base / "badds.json").write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": "lots"}}')
    (base / "twice.yaml").write_text("train:\n  steps: 5\nmodel:\n  n_layer: 2\ntrain:\n  lr: 0.01\n")
    d = base / "nofield"
    d.mkdir()
    for f in data.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    meta = json.loads((data / "meta.json").read_text())
    del meta["splits"]
    (d / "meta.json").write_text(json.dumps(meta))
    (base / "bad.yaml").write_text("train: [unclosed")
    (base / "a_file").write_text("not a directory")
    return base


def cases(b: Path):
    d, run, fresh = f"data.data_dir={b / 'pydoc'}", f"train.out_dir={b / 'run'}", f"train.out_dir={b / 'fresh'}"
    ok = [d, fresh, "train.steps=1", *COMMON]  # valid on their own: every case adds one fault
    return [
        # (name, argv, needles in stderr)
        ("typo in a field", CFG + ok + ["train.stpes=5"], ["train.stpes", "did you mean 'steps'"]),
        ("typo in a section", CFG + ok + ["modle.n_layer=2"], ["modle", "valid keys"]),
        ("wrong type", CFG + ok + ["train.lr=fast"], ["train.lr", "expected a number"]),
        ("integer expected", CFG + ok + ["train.micro_batch_size=2.5"], ["train.micro_batch_size", "integer"]),
        ("negative steps", CFG + ok + ["train.steps=-1"], ["train.steps", "> 0"]),
        ("k > experts", CFG + ok + ["model.moe.k=5"], ["model.moe.k", "num_experts (4)"]),
        (
            "ep_size not dividing experts",
            CFG + ok + ["model.moe.backend=deepspeed", "model.moe.ep_size=3"],
            ["model.moe.ep_size", "divide num_experts (4)"],
        ),
        (
            "ep_size with the local backend",
            CFG + ok + ["model.moe.ep_size=2"],
            ["model.moe.ep_size", "backend 'deepspeed'"],
        ),
        (
            "world size not divisible by ep_size",
            CFG + ok + ["model.moe.backend=deepspeed", "model.moe.ep_size=2"],
            ["world size (1) must be a multiple of ep_size (2)"],
        ),
        ("negative noise scale", CFG + ok + ["model.moe.s2moe.sigma1=-0.5"], ["model.moe.s2moe.sigma1", ">"]),
        ("zero temperature", CFG + ok + ["model.moe.s2moe.temperature=0"], ["model.moe.s2moe.temperature", "> 0"]),
        ("unknown router", CFG + ok + ["model.moe.router=hash"], ["model.moe.router", "competesmoe"]),
        ("unknown router option", CFG + ok + ["model.moe.router_args.tau=1"], ["tau", "z_loss_coef"]),
        ("unknown precision", CFG + ok + ["train.precision=fp8"], ["train.precision", "bf16"]),
        ("dropout out of range", CFG + ok + ["model.dropout=1.5"], ["model.dropout", "[0.0, 1.0]"]),
        ("heads not dividing width", CFG + ok + ["model.d_model=65"], ["model.d_model", "divisible by model.n_head"]),
        ("ZeRO 3 with MoE", CFG + ok + [f"train.ds_config={b / 'zero3.json'}"], ["ZeRO stage 3", "zero2.json"]),
        ("missing DeepSpeed config", CFG + ok + ["train.ds_config=nope.json"], ["train.ds_config", "zero2.json"]),
        ("missing config file", ["--config", str(b / "nope.yaml")] + ok, ["does not exist"]),
        ("malformed config file", ["--config", str(b / "bad.yaml")] + ok, ["not valid YAML"]),
        ("bad override syntax", CFG + ok + ["train.steps"], ["section.field=value"]),
        (
            "missing data",
            CFG + [f"data.data_dir={b / 'nowhere'}", fresh, *COMMON],
            ["missing meta.json", "s2moe prepare"],
        ),
        (
            "truncated token file",
            CFG + [f"data.data_dir={b / 'truncated'}", fresh, *COMMON],
            ["train.bin", "truncated"],
        ),
        ("corrupt meta.json", CFG + [f"data.data_dir={b / 'badmeta'}", fresh, *COMMON], ["meta.json", "corrupt"]),
        (
            "token file / vocabulary mismatch",
            CFG + [f"data.data_dir={b / 'mismatch'}", fresh, *COMMON],
            ["vocabulary size 20", "do not match"],
        ),
        (
            "model vocab_size disagrees with data",
            CFG + ok + ["model.vocab_size=50"],
            ["model.vocab_size", "103 symbols"],
        ),
        (
            "checkpoint trained on another vocabulary",
            CFG + [f"data.data_dir={b / 'other'}", run, "train.steps=4", "train.resume=auto", *COMMON],
            ["different vocabulary"],
        ),
        (
            "fresh start over an existing run",
            CFG + [d, run, "train.steps=4", *COMMON],
            ["already holds a run", "train.resume=auto"],
        ),
        ("infinite learning rate", CFG + ok + ["train.lr=.inf"], ["train.lr", "finite number"]),
        ("absurd learning rate", CFG + ok + ["train.lr=1e30"], ["train.lr", "at most 1"]),
        ("min_lr above lr", CFG + ok + ["train.min_lr=0.5"], ["train.min_lr", "must not exceed train.lr"]),
        ("beta2 = 1", CFG + ok + ["train.beta2=1.0"], ["train.beta2", "[0, 1)"]),
        ("an MoE layer listed twice", CFG + ok + ["model.moe_layers=[1,1]"], ["model.moe_layers", "twice"]),
        (
            "a section given twice",
            ["--config", str(b / "twice.yaml")] + ok,
            ["'train' is given twice", "line 1", "line 5"],
        ),
        (
            "context longer than a split",
            CFG + [f"data.data_dir={b / 'other'}", fresh, "model.context=1000", *COMMON],
            ["model.context", "only 500 tokens"],
        ),
        (
            "meta.json missing a field",
            CFG + [f"data.data_dir={b / 'nofield'}", fresh, *COMMON],
            ["meta.json lacks splits", "s2moe prepare"],
        ),
        (
            "DeepSpeed rejects its config",
            CFG + ok + [f"train.ds_config={b / 'badds.json'}"],
            ["DeepSpeed rejected", "reduce_bucket_size"],
        ),
        (
            "resume from a path that is no checkpoint",
            CFG + ok + [f"train.resume={b / 'pydoc'}"],
            ["not 'auto' and not a checkpoint folder"],
        ),
        (
            "run directory under a file",
            CFG + [d, f"train.out_dir={b / 'a_file' / 'run'}", *COMMON],
            ["train.out_dir", "not writable"],
        ),
    ]


def test_bad_inputs_give_clear_errors_and_touch_nothing(world):
    table = cases(world)
    assert len(table) >= 25
    before = snapshot(world / "run")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "bad_input_runner.py")],
        input=json.dumps([c[1] for c in table]),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=600,
    )
    results = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(results) == len(table), proc.stderr[-3000:]
    failures = []
    for (name, _, needles), res in zip(table, results):
        if res["rc"] not in (2,) or not all(n in res["stderr"] for n in needles) or "Traceback" in res["stderr"]:
            failures.append(f"{name}: rc={res['rc']} stderr={res['stderr'][-400:]!r}")
    assert not failures, "\n".join(failures)
    assert snapshot(world / "run") == before  # checkpoints, logs and config of the existing run untouched
    assert not (world / "fresh" / "checkpoints").exists()  # no failed case trained anything


def test_read_only_run_directory(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        proc = single_train([f"data.data_dir={world / 'pydoc'}", f"train.out_dir={ro / 'run'}", *COMMON])
        assert proc.returncode == 2 and "train.out_dir" in proc.stderr and "not writable" in proc.stderr
        assert "Read-only file system" in proc.stderr
    finally:
        subprocess.run(["umount", str(ro)])


def test_full_disk_keeps_the_published_checkpoint(world, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    # one checkpoint of the tiny model (with its portable copy) takes ~6 MB: room for one, not two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        out = small / "run"
        proc = single_train(
            [
                f"data.data_dir={world / 'pydoc'}",
                f"train.out_dir={out}",
                "train.steps=6",
                "train.save_interval=2",
                *COMMON,
            ]
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "bytes free on that file system" in proc.stderr and "intact" in proc.stderr, proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr
        assert (out / "checkpoints" / "latest").read_text().strip() == "step0000002"
        ev = cli("eval", str(out), "--max-batches", "2")  # the published checkpoint still verifies and loads
        assert_ok(ev)
        assert (out / "metrics.jsonl").read_text().count('"kind": "train"') >= 2
    finally:
        subprocess.run(["umount", str(small)])
