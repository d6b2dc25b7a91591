"""The results table and the claim statements, on hand-written result files (no training): every finished
run of the suite is tabled whatever seeds or variants the last command named, runs of another budget are
kept out, the command history is kept (also by two shard workers at once), and the parity verdict follows
the 95% interval of the paired gap."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from s2moe_ds.configtools import ConfigError
from s2moe_ds.experiments.claims import claims
from s2moe_ds.experiments.results import aggregate, read_json, record_command
from s2moe_ds.experiments.stats import t_interval
from s2moe_ds.experiments.suite import run_spec, suite_from_dict

REPO = Path(__file__).resolve().parents[1]
TOY = {
    "description": "toy suite",
    "base": "configs/tiny.yaml",
    "overrides": ["train.steps=10"],
    "seeds": [0, 1, 2],
    "variants": [
        {"name": "smoe-top2", "overrides": ["model.moe.k=2"], "label": "SMoE top-2"},
        {"name": "s2moe-top1", "overrides": ["model.moe.k=1"], "label": "S2MoE top-1"},
    ],
    "claims": [
        {
            "kind": "parity",
            "name": "S2MoE claim (top-1 at inference within {margin}% {metric} of SMoE top-2)",
            "candidate": "s2moe-top1",
            "baseline": "smoe-top2",
        }
    ],
}
SUITE = suite_from_dict(TOY, "toy.yaml")


def _row(variant, seed, bpc, k):
    return {
        "inference": "train_k",
        "k": k,
        "pathways": "clean" if variant.startswith("s2moe") else "",
        "loss": bpc * math.log(2),
        "bpc": bpc,
        "metric": "bpc",
        "tokens": 1000,
        "inference_mflops_per_token": 1.0 * k,
        "train_mflops_per_token": 3.0,
        "tokens_per_sec": 100.0,
        "params_total": 10,
        "params_active": 5,
        "step": 10,
    }


def _write_run(out, suite, variant, seed, bpc, steps=None, code=None):
    spec = run_spec(suite, variant, seed, steps).to_dict()
    d = out / "runs" / f"{variant.name}-seed{seed}"
    d.mkdir(parents=True)
    k = 1 if variant.name.startswith("s2moe") else 2
    extra = {"code": code} if code else {}
    (d / "result.json").write_text(
        json.dumps(
            {
                **spec,
                **extra,
                "train_wall_s": 1.0,
                "resumed": False,
                "rows": [_row(variant.name, seed, bpc, k)],
                "analysis": [],
            }
        )
    )


def test_runs_of_two_code_versions_never_share_a_table(tmp_path, capsys):
    from s2moe_ds.experiments.results import code_version

    smoe, s2 = SUITE.variants
    now = code_version()
    old = {"fingerprint": "0" * 16, "commit": "abc1234"}
    _write_run(tmp_path, SUITE, smoe, 0, 2.50, code=old)
    _write_run(tmp_path, SUITE, smoe, 1, 2.60, code=now)
    _write_run(tmp_path, SUITE, s2, 0, 2.55, code=old)
    rows = aggregate(tmp_path, SUITE)  # the current code's runs, although fewer
    assert [(r["variant"], r["seed"]) for r in rows] == [("smoe-top2", 1)] and rows[0]["code"] == now["commit"]
    assert "smoe-top2-seed0 was made by other code (commit abc1234)" in capsys.readouterr().err
    (tmp_path / "runs" / "smoe-top2-seed1" / "result.json").unlink()
    rows = aggregate(tmp_path, SUITE)  # without the current code: the version most runs have
    assert [(r["variant"], r["seed"]) for r in rows] == [("smoe-top2", 0), ("s2moe-top1", 0)]


def test_variant_seed_lists_and_shards():
    from s2moe_ds.cli.experiment import parse_shard

    suite = suite_from_dict(
        {"seeds": [0, 1, 2], "variants": [{"name": "a"}, {"name": "b", "seeds": [0, 1, 2, 3]}]}, "s"
    )
    a, b = suite.variants
    assert suite.variant_seeds(a) == [0, 1, 2]
    assert suite.variant_seeds(b) == [0, 1, 2, 3]
    suite.seeds, suite.seeds_given = [3, 7], True  # what --seeds 3,7 does
    assert suite.variant_seeds(a) == [3, 7] and suite.variant_seeds(b) == [3]
    assert parse_shard("1/2") == (1, 2) and parse_shard(None) == (0, 1)
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(ConfigError, match="--shard must be I/N"):
            parse_shard(bad)


def test_table_holds_every_finished_seed_and_variant_not_only_the_last_commands(tmp_path, capsys):
    smoe, s2 = SUITE.variants
    for seed, bpc in [(0, 2.50), (1, 2.52), (2, 2.54)]:
        _write_run(tmp_path, SUITE, smoe, seed, bpc)
    _write_run(tmp_path, SUITE, s2, 2, 2.60)
    # a command that named only seed 2 of one variant must still table all four runs
    partial = suite_from_dict({**TOY, "seeds": [2]}, "toy.yaml")
    rows = aggregate(tmp_path, partial)
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("smoe-top2", 0),
        ("smoe-top2", 1),
        ("smoe-top2", 2),
        ("s2moe-top1", 2),
    ]
    md = (tmp_path / "results.md").read_text()
    assert "| smoe-top2 | train_k (k=2) | 2.5200 ± 0.0200 | 3 |" in md
    assert "| s2moe-top1 | train_k (k=1, clean) | 2.6000 | 1 |" in md
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 5


def test_a_run_of_another_budget_is_left_out_with_a_warning(tmp_path, capsys):
    smoe, _ = SUITE.variants
    _write_run(tmp_path, SUITE, smoe, 0, 2.50)
    _write_run(tmp_path, SUITE, smoe, 1, 9.99, steps=5)  # made by `--steps 5` into the same folder
    rows = aggregate(tmp_path, SUITE)
    assert [r["seed"] for r in rows] == [0]
    assert "smoe-top2-seed1 was run with another spec" in capsys.readouterr().err
    assert [r["seed"] for r in aggregate(tmp_path, SUITE, steps=5)] == [1]


def test_suite_json_keeps_every_command_and_the_one_that_reruns_the_whole_table(tmp_path):
    record_command(tmp_path, SUITE, None, "s2moe experiment toy --seeds 0", "s2moe experiment toy")
    record_command(tmp_path, SUITE, None, "s2moe experiment toy --seeds 1,2 --only smoe-top2", "s2moe experiment toy")
    record_command(tmp_path, SUITE, None, "s2moe experiment toy --seeds 0", "s2moe experiment toy")
    meta = json.loads((tmp_path / "suite.json").read_text())
    assert meta["command"] == "s2moe experiment toy"
    assert meta["commands"] == ["s2moe experiment toy --seeds 0", "s2moe experiment toy --seeds 1,2 --only smoe-top2"]


RECORD = """
import sys, time
from pathlib import Path
from s2moe_ds.experiments.results import record_command
from s2moe_ds.experiments.suite import suite_from_dict

out, me = Path(sys.argv[1]), sys.argv[2]
suite = suite_from_dict({"variants": [{"name": "a"}]}, "toy.yaml")
(out / f"ready{me}").touch()
while not all((out / f"ready{w}").exists() for w in (0, 1)):  # start together
    time.sleep(0.001)
for i in range(150):
    record_command(out, suite, None, f"s2moe experiment toy --shard {me}/2 # {i}")
"""


def test_two_shard_workers_starting_together_keep_every_command(tmp_path):
    """suite.json is read, extended and rewritten by every worker that starts: two at once must neither
    read a half-written file nor drop the other's command."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RECORD, str(tmp_path), str(w)], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for w in (0, 1)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    commands = read_json(tmp_path / "suite.json")["commands"]
    assert sorted(commands) == sorted(f"s2moe experiment toy --shard {w}/2 # {i}" for w in (0, 1) for i in range(150))


def test_a_json_file_cut_short_is_named(tmp_path):
    for name in ("suite.json", "result.json"):
        (tmp_path / name).write_text('{"suite": "to')
        with pytest.raises(ConfigError, match=rf"{tmp_path / name} is not valid JSON .*cut short"):
            read_json(tmp_path / name)
    (tmp_path / "suite.json").write_text("")  # what the racing reader got
    with pytest.raises(ConfigError, match="suite.json is not valid JSON"):
        record_command(tmp_path, SUITE, None, "s2moe experiment toy")


def test_gap_interval_is_the_student_t_interval():
    lo, hi = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 df) = 4.303 in the tables
    assert (lo, hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)), abs=1e-3)
    assert (lo, hi) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), abs=1e-6)
    # the printed table's values (two-sided 95%): 1, 10 and 30 degrees of freedom
    for df, t in ((1, 12.706), (10, 2.228), (30, 2.042)):
        lo, hi = t_interval([0.0, 2.0] + [1.0] * (df - 1))
        sd = math.sqrt(2 / df)
        assert hi - 1 == pytest.approx(t * sd / math.sqrt(df + 1), abs=1e-3 * sd)
    assert all(math.isnan(v) for v in t_interval([0.5]))


def _claim_rows(s2_bpcs, smoe_bpcs):
    rows = []
    for seed, (a, b) in enumerate(zip(s2_bpcs, smoe_bpcs)):
        rows.append({"variant": "s2moe-top1", "seed": seed, "train_wall_s": 1.0, **_row("s2moe-top1", seed, a, 1)})
        rows.append({"variant": "smoe-top2", "seed": seed, "train_wall_s": 1.0, **_row("smoe-top2", seed, b, 2)})
    return rows


@pytest.mark.parametrize(
    "s2, verdict",
    [
        ([2.501, 2.5015, 2.502], "within 1%, the whole 95% interval too"),  # +0.04..0.08%: tight
        ([2.51, 2.48, 2.54], "within 1% on the mean, not established"),  # +0.4% ± 1.2%
        ([2.60, 2.601, 2.602], "outside 1%, the whole 95% interval too"),  # +4%: tight
        ([2.45, 2.45, 2.46], "better than SMoE top-2, the whole 95% interval too"),  # -2%: tight
    ],
)
def test_claim_verdict_follows_the_interval(s2, verdict):
    text = claims(_claim_rows(s2, [2.5, 2.5, 2.5]), SUITE)[0]
    assert f"Verdict on this run: **{verdict}" in text and "95% interval of the mean gap" in text


def test_one_seed_gives_no_interval_and_says_so():
    text = claims(_claim_rows([2.51], [2.5]), SUITE)[0]
    assert "within 1% on the mean (one seed: no interval)" in text


def test_the_suite_file_chooses_what_each_claim_compares():
    """Nothing in the report names a variant: the suite's claims and labels decide every statement."""
    swapped = {"kind": "parity", "candidate": "smoe-top2", "baseline": "s2moe-top1", "margin": 2.0}
    suite = suite_from_dict(
        {**TOY, "claims": [swapped, {"kind": "rank", "candidate": "smoe-top2", "baselines": ["s2moe-top1"]}]}, "t.yaml"
    )
    parity, rank = claims(_claim_rows([2.40, 2.40, 2.401], [2.5, 2.5, 2.5]), suite)
    assert parity.startswith(
        "**SMoE top-2 within 2% bpc of S2MoE top-1:** SMoE top-2 2.5000 ± 0.0000 vs S2MoE top-1 2.4003"
    )
    assert "Verdict on this run: **outside 2%, the whole 95% interval too**" in parity
    assert rank.startswith("Where SMoE top-2 does **not** win: s2moe-top1 (2.4003")
    assert claims(_claim_rows([2.5], [2.5]), suite_from_dict({**TOY, "claims": []}, "t.yaml")) == []
