"""Bad input gets one clear line, and a refused command leaves what was there as it was (issue 24 §3-4):
empty or wrong-kind paths, values of the wrong kind, a device the machine lacks, an empty corpus."""

import os

import pytest
from e2e import assert_ok, cli, single_train, snapshot

from s2moe_ds.config import load_config
from s2moe_ds.configtools import ConfigError
from s2moe_ds.data import DataError
from s2moe_ds.data.prepare import prepare


def test_an_empty_out_dir_is_refused_not_the_current_directory():
    with pytest.raises(ConfigError, match=r"'train.out_dir': is empty; give the run's directory"):
        load_config("configs/tiny.yaml", ["train.out_dir="])


def test_an_empty_or_folder_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"is empty; give a file with model/data/train sections"):
        load_config(empty)
    with pytest.raises(ConfigError, match=r"is a directory; give a YAML or JSON file"):
        load_config(tmp_path)


def test_a_quoted_boolean_is_read_as_the_boolean(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"model": {"tie_embeddings": "false"}, "train": {"progress": "True"}}')
    loaded = load_config(cfg)
    assert loaded.model.tie_embeddings is False and loaded.train.progress is True
    with pytest.raises(ConfigError, match=r"'model.tie_embeddings': expected true or false, got 'no'"):
        load_config("configs/tiny.yaml", ["model.tie_embeddings='no'"])


def test_a_device_the_machine_lacks_is_named(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for command in ("sample", "eval"):
        proc = cli(command, str(tmp_path), "--device", "cuda")
        assert proc.returncode == 2 and "no usable CUDA GPU" in proc.stderr and "use --device cpu" in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = cli("sample", str(tmp_path), "--device", "gpu")
    assert proc.returncode == 2 and "'gpu' is not a torch device" in proc.stderr


def test_an_empty_corpus_or_a_pipe_is_refused_and_the_data_folder_kept(tmp_path):
    data = tmp_path / "data"
    prepare("text", data, source=str(_write(tmp_path / "ok.txt", "some text to learn from. " * 40)))
    before = snapshot(data)
    with pytest.raises(DataError, match=r"holds no text \(train 0, val 0, test 0 tokens\).*is left as it was"):
        prepare("text", data, source=str(_write(tmp_path / "empty.txt", "")))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"is not a regular file \(a pipe, socket or device\)"):
        prepare("text", data, source=str(fifo))  # reading it would block forever
    assert snapshot(data) == before


def test_a_single_file_export_never_replaces_a_file(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"another run's weights")
    proc = cli("export", str(tmp_path / "no-run"), "--out", str(target))
    assert proc.returncode == 2 and "already exists (a file); the export never replaces" in proc.stderr
    assert target.read_bytes() == b"another run's weights"


def _write(path, text: str):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def one_step_run(pydoc_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("refusals") / "run"
    assert_ok(
        single_train([f"data.data_dir={pydoc_dir}", f"train.out_dir={run}", "train.steps=1", "train.progress=false"])
    )
    return run


def test_eval_names_what_it_was_given_when_it_is_no_checkpoint(one_step_run, pydoc_dir):
    cases = [
        (pydoc_dir, "is a prepared data folder (no checkpoints/latest, no *model_states.pt): give a run directory"),
        (one_step_run / "checkpoints" / "latest", "is the file naming the newest checkpoint; give the run directory"),
        (one_step_run / "config.yaml", "is a file, not a run, checkpoint or exported folder"),
    ]
    for path, said in cases:
        proc = cli("eval", str(path))
        assert proc.returncode == 2 and said in proc.stderr, (path, proc.stderr)
        assert "never completed" not in proc.stderr


def test_reshard_writes_only_into_a_new_or_empty_folder_outside_the_source(tmp_path, one_step_run):
    run = one_step_run
    taken = tmp_path / "export"
    taken.mkdir()
    (taken / "config.json").write_text("{}")  # an export folder, a data folder: not a run to write into
    before = snapshot(tmp_path), snapshot(run)
    proc = cli("reshard", str(run), str(taken))
    assert (
        proc.returncode == 2 and "already holds something (config.json); s2moe reshard writes a new run" in proc.stderr
    )
    proc = cli("reshard", str(run), str(run / "checkpoints" / "copy"))
    assert proc.returncode == 2 and "is inside the source run" in proc.stderr
    assert (snapshot(tmp_path), snapshot(run)) == before


def test_eval_on_another_corpus_with_the_same_vocabulary_says_so(one_step_run, tmp_path):
    from pydoc_data import topics

    text = tmp_path / "pydoc.txt"
    text.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))  # the same characters
    other = tmp_path / "other"
    prepare("text", other, source=str(text))
    proc = cli("eval", str(one_step_run), "--data-dir", str(other), "--max-batches", "2")
    assert proc.returncode == 0, proc.stderr
    assert "is not the corpus this run was trained on (dataset 'text', the run's 'pydoc')" in proc.stderr


def test_prepare_never_replaces_other_prepared_data_without_force(tmp_path, shakespeare_path):
    """A data folder runs were trained on is not replaced by another corpus (or tokenizer) silently."""
    d = tmp_path / "data"
    assert_ok(cli("prepare", "--config", "tiny", f"data.data_dir={d}"))
    before = snapshot(d)
    other = ["data.dataset=shakespeare", f"data.source={shakespeare_path}", f"data.data_dir={d}"]
    bad = cli("prepare", "--config", "tiny", *other)
    assert bad.returncode == 2 and "already holds other prepared data" in bad.stderr
    assert "dataset pydoc -> shakespeare" in bad.stderr and "--force" in bad.stderr
    assert snapshot(d) == before  # nothing changed, no temporary left
    again = cli("prepare", "--config", "tiny", f"data.data_dir={d}")  # the same preparation: fine
    assert_ok(again)
    assert snapshot(d) == before
    assert_ok(cli("prepare", "--config", "tiny", *other, "--force"))
    assert '"dataset": "shakespeare"' in (d / "meta.json").read_text()


def test_a_run_stands_on_its_own_without_its_data_folder(tmp_path):
    """Every checkpoint keeps its tokenizer: with the data folder moved away a run samples, evaluates text
    and exports; only its own splits need the folder, and the message says so."""
    data, run = tmp_path / "data", tmp_path / "run"
    assert_ok(cli("prepare", "--config", "tiny", f"data.data_dir={data}"))
    assert_ok(single_train([f"data.data_dir={data}", f"train.out_dir={run}", "train.steps=1", "train.progress=false"]))
    data.rename(tmp_path / "moved")
    text = _write(tmp_path / "held.txt", "def f(x):\n    return x + 1\n" * 20)
    sample = cli("sample", str(run), "--prompt", "def ", "--tokens", "10", "--device", "cpu")
    assert_ok(sample)
    assert sample.stdout.startswith("def ") and "using the tokenizer kept in" in sample.stderr
    assert_ok(cli("eval", str(run), "--text", str(text), "--device", "cpu"))
    assert_ok(cli("export", str(run), "--out", str(tmp_path / "export")))
    assert (tmp_path / "export" / "tokenizer.json").exists()
    splits = cli("eval", str(run), "--device", "cpu")
    assert splits.returncode == 2 and "whose prepared data folder is not there" in splits.stderr
    assert "--data-dir" in splits.stderr and "Traceback" not in splits.stderr
    assert_ok(cli("eval", str(run), "--data-dir", str(tmp_path / "moved"), "--max-batches", "2", "--device", "cpu"))
