"""The experiment runner and report on the CI smoke suite (real training subprocesses, real data):
a results table, resumption without retraining, refusal of a changed spec, plots that load."""

import json

import pytest
import yaml
from e2e import REPO, assert_ok, cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    shakespeare = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not shakespeare.exists():
        pytest.skip(f"{shakespeare} not present (the shared data folder sits beside the repository)")
    tmp = tmp_path_factory.mktemp("experiment")
    suite = yaml.safe_load((REPO / "experiments" / "cpu-shakespeare-smoke.yaml").read_text())
    suite["overrides"] += [
        f"data.data_dir={tmp / 'data'}",
        "train.steps=8",
        "train.eval_interval=4",
        "train.save_interval=4",
        "train.log_interval=2",
    ]
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp / "results"
    proc = cli("experiment", str(path), "--out", str(out), "--data-source", str(shakespeare), timeout=900)
    assert_ok(proc)
    return path, out, proc


def test_suite_writes_one_table_with_every_variant_and_inference_setting(smoke):
    _, out, proc = smoke
    rows = json.loads((out / "results.json").read_text())
    got = {(r["variant"], r["inference"]) for r in rows}
    assert got == {
        ("dense", "train_k"),
        ("smoe-top2", "train_k"),
        ("smoe-top2", "top1"),
        ("smoe-top2", "top1-perk"),
        ("s2moe-top1", "train_k"),
        ("s2moe-top1", "top2"),
        ("s2moe-top1", "top2-perk"),
        ("s2moe-top1", "top1-both"),
    }
    by = {(r["variant"], r["inference"]): r for r in rows}
    for r in rows:
        assert r["step"] == 8 and 1.0 < r["bpc"] < 8.0 and r["tokens"] > 50_000  # val: 5% of 1.1M characters
    # the cost columns follow the inference top-k: S2MoE top-1 costs what SMoE run at top-1 costs
    assert by[("s2moe-top1", "train_k")]["inference_mflops_per_token"] == pytest.approx(
        by[("smoe-top2", "top1")]["inference_mflops_per_token"]
    )
    assert (
        by[("smoe-top2", "train_k")]["inference_mflops_per_token"]
        > by[("smoe-top2", "top1")]["inference_mflops_per_token"]
    )
    assert by[("s2moe-top1", "train_k")]["k"] == 1 and by[("s2moe-top1", "top1-both")]["pathways"] == "both"
    # both weight conventions at the other top-k: the training rule and the old per-k one differ
    assert by[("smoe-top2", "top1")]["weights"] == "train" and by[("smoe-top2", "top1-perk")]["weights"] == "per_k"
    assert by[("smoe-top2", "top1")]["bpc"] != by[("smoe-top2", "top1-perk")]["bpc"]
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 8 and "s2moe-top1 | top1-both (k=1, both)" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 9 and csv_lines[0].startswith("variant,seed,train_wall_s,split,inference")
    res = json.loads((out / "runs" / "s2moe-top1-seed0" / "result.json").read_text())
    assert [la["kind"] for la in res["analysis"]] == ["moe"] * 4
    assert len(res["code"]["fingerprint"]) == 16 and res["code"]["commit"]
    assert "train.seed=0" in res["overrides"] and "1/3 dense seed 0" in proc.stdout


def test_eval_cli_reproduces_both_weight_conventions_of_the_table(smoke):
    _, out, _ = smoke
    rows = {(r["variant"], r["inference"]): r for r in json.loads((out / "results.json").read_text())}
    run = out / "runs" / "smoe-top2-seed0"
    for weights, label in (("train", "top1"), ("per_k", "top1-perk")):
        proc = cli("eval", str(run), "--k", "1", "--weights", weights, "--json", timeout=300)
        assert_ok(proc)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["value"] == pytest.approx(rows[("smoe-top2", label)]["bpc"], rel=1e-6), weights


def test_rerun_skips_finished_runs_and_resumes_an_unfinished_one(smoke):
    path, out, _ = smoke
    run = out / "runs" / "smoe-top2-seed0"
    before = json.loads((out / "results.json").read_text())
    (run / "result.json").unlink()  # as if interrupted after training, before evaluation
    proc = cli("experiment", str(path), "--out", str(out), timeout=600)
    assert_ok(proc)
    assert proc.stdout.count("done earlier, skipped") == 2
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "steps 8->8" in log  # nothing retrained
    after = json.loads((out / "results.json").read_text())
    key = lambda r: (r["variant"], r["inference"])  # noqa: E731
    assert {key(r): r["bpc"] for r in after} == pytest.approx({key(r): r["bpc"] for r in before})


def test_an_unfinished_run_of_other_code_is_not_resumed(smoke):
    path, out, _ = smoke
    run = out / "runs" / "dense-seed0"
    spec = json.loads((run / "spec.json").read_text())
    result = (run / "result.json").read_text()
    (run / "result.json").unlink()
    (run / "spec.json").write_text(json.dumps({**spec, "code": {"fingerprint": "0" * 16, "commit": "abc1234"}}))
    try:
        proc = cli("experiment", str(path), "--out", str(out), "--only", "dense", timeout=300)
        assert (
            proc.returncode == 2
            and "other code (commit abc1234)" in proc.stderr
            and "mix two code versions" in proc.stderr
        )
    finally:
        (run / "spec.json").write_text(json.dumps(spec))
        (run / "result.json").write_text(result)


def test_a_changed_spec_is_refused_and_nothing_is_lost(smoke):
    path, out, _ = smoke
    before = (out / "suite.json").read_text()
    proc = cli("experiment", str(path), "--out", str(out), "--steps", "9", timeout=300)
    assert proc.returncode == 2 and "different spec" in proc.stderr and "another --out" in proc.stderr
    assert (out / "suite.json").read_text() == before  # the refused command is not recorded as the runs' maker
    assert (out / "runs" / "dense-seed0" / "result.json").exists()
    bad = cli("experiment", "no-such-suite")
    assert bad.returncode == 2 and "known suites: " in bad.stderr and "cpu-shakespeare" in bad.stderr
    bad = cli("experiment", str(path), "--out", str(out), "--only", "nope")
    assert bad.returncode == 2 and "unknown variant(s) ['nope']" in bad.stderr


def test_report_has_the_table_claims_and_loadable_plots(smoke, tmp_path):
    import matplotlib.image as mpimg

    _, out, _ = smoke
    report = tmp_path / "results.md"
    notes = tmp_path / "notes.md"
    notes.write_text("## What changed\n\nA hand-written paragraph.\n")
    assert_ok(cli("report", str(out), "--out", str(report), "--notes", str(notes)))
    text = report.read_text()
    assert f"s2moe report {out} --out {report} --notes {notes}" in text  # the command that reproduces the page
    assert text.index("## What the numbers say") < text.index("A hand-written paragraph.") < text.index("## Repr")
    assert "S2MoE claim (top-1 at inference within 1% bpc of SMoE top-2)" in text
    assert "**Not evidence:** one seed per variant" in text  # a smoke suite is marked as one
    assert "Dense baseline:" in text and "| s2moe-top1 | train_k (k=1, clean) |" in text
    assert f"s2moe experiment {out.parent / 'smoke.yaml'} --out {out}" in text
    for name in ("val_curves", "expert_load", "routing_over_training", "collapse"):
        png = tmp_path / "results" / f"{name}.png"
        assert f"](results/{name}.png)" in text
        img = mpimg.imread(png)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a real, non-blank picture
    mine = tmp_path / "mine.md"
    mine.write_text("# My notes\n")  # a user's file: never replaced without --force
    refused = cli("report", str(out), "--out", str(mine))
    assert refused.returncode == 2 and "is not a report this command wrote" in refused.stderr
    assert mine.read_text() == "# My notes\n" and not (tmp_path / "mine").exists()
    assert_ok(cli("report", str(out), "--out", str(report)))  # an earlier report is brought up to date
    assert_ok(cli("report", str(out)))  # by default into the folder itself
    assert (out / "report.md").read_text().startswith("# Results: ")
    bad = cli("report", str(tmp_path))
    assert bad.returncode == 2 and "not an experiment folder" in bad.stderr


def test_a_run_stopped_early_is_not_recorded_as_finished(smoke, tmp_path):
    """A SIGTERM-stopped training exits 0 with a checkpoint short of train.steps: not a result."""
    import shutil

    from s2moe_ds.experiments.runner import evaluate_run
    from s2moe_ds.experiments.suite import find_suite, load_suite

    path, out, _ = smoke
    run = tmp_path / "dense-seed0"
    shutil.copytree(out / "runs" / "dense-seed0", run)
    (run / "checkpoints" / "latest").write_text("step0000004")  # as if stopped at step 4 of 8
    with pytest.raises(RuntimeError, match="step 4 of 8 .*rerun the same command to resume"):
        evaluate_run(run, load_suite(find_suite(str(path))))


def test_report_reads_each_runs_result_not_the_cached_table(smoke, tmp_path):
    """The report's numbers come from runs/*/result.json: an edit to the cached results.json does not reach
    it, an edit to a run's own result does; the notes sit under a heading that marks them hand-written."""
    import shutil

    _, out, _ = smoke
    folder = tmp_path / "copy"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("checkpoints"))
    cached = json.loads((folder / "results.json").read_text())
    for row in cached:
        row["bpc"] = 7.1234  # not what any run measured
    (folder / "results.json").write_text(json.dumps(cached))
    result_file = folder / "runs" / "dense-seed0" / "result.json"
    result = json.loads(result_file.read_text())
    result["rows"][0]["bpc"] = 6.5432
    result_file.write_text(json.dumps(result))
    notes = tmp_path / "notes.md"
    notes.write_text("A hand-written paragraph.\n")
    report = tmp_path / "r.md"
    assert_ok(cli("report", str(folder), "--out", str(report), "--notes", str(notes)))
    text = report.read_text()
    assert "7.1234" not in text and "| dense | train_k | 6.5432 | 1 |" in text
    assert f"## Notes (hand-written: `{notes}`" in text and "Top-2-trained models run at top-1" in text
