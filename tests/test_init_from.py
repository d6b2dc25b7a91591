"""``train.init_from`` (issue 26 §3): a run starts from another run's weights, in another parallel layout,
or from an exported folder; another vocabulary or architecture is refused with the difference named."""

import re

import pytest
import torch
from e2e import assert_ok, cli, deepspeed_train, single_train

from s2moe_ds.checkpoint.export import load_for_eval

pytestmark = pytest.mark.slow
CFG = "configs/tiny_llama.yaml"
COMMON = ["train.log_interval=1", "train.eval_iters=1", "train.progress=false", "train.eval_interval=2",
          "train.steps=2", "train.save_interval=2"]  # fmt: skip
STILL = ["train.lr=1e-30", "train.min_lr=1e-30", "train.warmup_steps=0"]  # steps that leave the weights as loaded


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    data = root / "data"
    assert_ok(cli("prepare", "--config", CFG, f"data.data_dir={data}"))
    run = root / "source"
    assert_ok(single_train([f"data.data_dir={data}", f"train.out_dir={run}", *COMMON], config=CFG))
    export = root / "export"
    assert_ok(cli("export", str(run), "--out", str(export)))
    return root, data, run, export


def weights(run) -> dict:
    state, _, _ = load_for_eval(str(run))
    return state


def test_a_two_process_expert_parallel_run_starts_from_a_one_process_run(source, tmp_path):
    root, data, run, _ = source
    out = tmp_path / "tuned"
    args = [f"data.data_dir={data}", f"train.out_dir={out}", f"train.init_from={run}", "model.moe.backend=deepspeed",
            "model.moe.ep_size=2", *COMMON, *STILL]  # fmt: skip
    proc = deepspeed_train(2, args, config=CFG)
    assert_ok(proc)
    assert "weights from checkpoint" in proc.stdout and "optimizer and schedule fresh" in proc.stdout
    assert "steps 0->2" in proc.stdout  # the step count starts fresh
    before, after = weights(run), weights(out)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_a_run_starts_from_an_exported_folder(source, tmp_path):
    root, data, run, export = source
    out = tmp_path / "from-export"
    args = [f"data.data_dir={data}", f"train.out_dir={out}", f"train.init_from={export}", *COMMON, *STILL]
    proc = single_train(args, config=CFG)
    assert_ok(proc)
    assert f"weights from the export {export}" in proc.stdout
    before, after = weights(run), weights(out)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_another_architecture_or_vocabulary_is_refused_with_the_difference(source, tmp_path, shakespeare_path):
    root, data, run, _ = source
    out = tmp_path / "bad"
    wide = single_train([f"data.data_dir={data}", f"train.out_dir={out}", f"train.init_from={run}",
                         "model.d_model=128", *COMMON], config=CFG)  # fmt: skip
    assert wide.returncode == 2 and "is another architecture" in wide.stderr
    assert re.search(r"source \(\d+, 64\), this model \(\d+, 128\)", wide.stderr), wide.stderr
    experts = single_train([f"data.data_dir={data}", f"train.out_dir={tmp_path / 'e8'}", f"train.init_from={run}",
                            "model.moe.num_experts=8", *COMMON], config=CFG)  # fmt: skip
    assert experts.returncode == 2 and "4 experts in the source, 8 in this model" in experts.stderr
    other = tmp_path / "shakespeare"
    assert_ok(cli("prepare", "--config", CFG, "data.dataset=shakespeare", f"data.source={shakespeare_path}",
                  f"data.data_dir={other}"))  # fmt: skip
    vocab = single_train([f"data.data_dir={other}", f"train.out_dir={tmp_path / 'v'}", f"train.init_from={run}",
                          *COMMON], config=CFG)  # fmt: skip
    assert vocab.returncode == 2 and "trained on another vocabulary" in vocab.stderr
    missing = single_train([f"data.data_dir={data}", f"train.out_dir={tmp_path / 'm'}",
                            f"train.init_from={tmp_path / 'nowhere'}", *COMMON], config=CFG)  # fmt: skip
    assert missing.returncode == 2 and "'train.init_from'" in missing.stderr and "does not exist" in missing.stderr
    assert not (tmp_path / "m").exists()  # refused before anything is written


def test_another_corpus_prepared_with_the_exports_tokenizer_fine_tunes_and_resumes(source, tmp_path, shakespeare_path):
    """The documented path to fine-tune on other text: prepare it with the source export's tokenizer.json
    (the same ids); a resume of the fine-tuning run needs the source no more."""
    root, data, run, export = source
    other = tmp_path / "shakespeare"
    assert_ok(cli("prepare", "--config", CFG, "data.dataset=shakespeare", f"data.source={shakespeare_path}",
                  f"data.tokenizer={export / 'tokenizer.json'}", f"data.data_dir={other}"))  # fmt: skip
    out = tmp_path / "ft"
    args = [f"data.data_dir={other}", f"train.out_dir={out}", "train.steps=4", "train.log_interval=1",
            "train.eval_iters=1", "train.progress=false", "train.eval_interval=2", "train.save_interval=2"]  # fmt: skip
    first = single_train([*args, f"train.init_from={run}", "train.stop_at_step=2"], config=CFG)
    assert_ok(first)
    assert "weights from checkpoint" in first.stdout
    moved = tmp_path / "source-moved"
    run.rename(moved)
    try:
        resumed = single_train([*args, f"train.init_from={run}", "train.resume=auto"], config=CFG)
        assert_ok(resumed)  # the source is gone: a resume continues its own checkpoint and ignores init_from
        assert "weights from" not in resumed.stdout and "steps 2->4" in resumed.stdout
    finally:
        moved.rename(run)


def test_a_tied_model_refuses_a_source_with_its_own_output_head(source, tmp_path):
    root, data, run, _ = source  # tiny_llama: tie_embeddings false
    tied = single_train([f"data.data_dir={data}", f"train.out_dir={tmp_path / 't'}", f"train.init_from={run}",
                         "model.tie_embeddings=true", *COMMON], config=CFG)  # fmt: skip
    assert tied.returncode == 2 and "an output head of its own" in tied.stderr
