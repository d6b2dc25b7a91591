"""Data preparation on small files the tests write, loaders, and the errors for bad data."""

import json
import zipfile

import numpy as np
import pytest

from s2moe_ds.data import DataError, Decoder, load_split, read_meta
from s2moe_ds.data.loader import WindowSampler
from s2moe_ds.data.prepare import prepare


def test_text8_zip_layout_splits_90_5_5(tmp_path):
    text = ("anarchism originated as a term of abuse " * 500)[:20000]
    archive = tmp_path / "text8.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("text8", text)
    meta = prepare("text8", tmp_path / "out", source=str(archive))
    assert meta["splits"] == {"train": 18000, "val": 1000, "test": 1000}
    assert meta["vocab_size"] == len(set(text)) and meta["dtype"] == "uint16"
    train = load_split(tmp_path / "out", "train")
    assert Decoder(tmp_path / "out").decode(train[:40]) == text[:40]
    test = load_split(tmp_path / "out", "test")
    assert Decoder(tmp_path / "out").decode(test) == text[19000:]


def test_enwik8_is_byte_level(tmp_path):
    data = ("<page>caf\u00e9 \u65e5\u672c</page>\n" * 100).encode("utf-8")
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8", data)
    meta = prepare("enwik8", tmp_path / "out", source=str(archive))
    assert meta["unit"] == "byte" and meta["vocab_size"] == len(set(data))
    assert sum(meta["splits"].values()) == len(data)
    dec = Decoder(tmp_path / "out")
    assert dec.decode(load_split(tmp_path / "out", "train")[:30]) == data[:30].decode("utf-8", errors="replace")


def test_shakespeare_from_shared_data_is_90_5_5(tmp_path, shakespeare_path):
    meta = prepare("shakespeare", tmp_path, source=str(shakespeare_path))
    assert meta["vocab_size"] == 65
    # the train part is the old 90/10 split's; its 111,540 val characters are now val + test
    assert meta["splits"] == {"train": 1003854, "val": 55769, "test": 55771}
    assert meta["source_sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_builtin_pydoc_corpus_needs_no_download(tmp_path):
    meta = prepare("pydoc", tmp_path)
    assert meta["splits"]["train"] > 100_000 and set(meta["splits"]) == {"train", "val", "test"}


def test_sentencepiece_any_text(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    rng = np.random.default_rng(0)
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(3000)))
    meta = prepare("text", tmp_path / "out", source=str(src), tokenizer="sentencepiece", vocab_size=25)
    assert meta["tokenizer"] == "sentencepiece" and meta["vocab_size"] == 25
    dec = Decoder(tmp_path / "out")
    assert dec.decode(dec.encode("alpha beta gamma")) == "alpha beta gamma"
    assert load_split(tmp_path / "out", "val").max() < 25


def test_sampler_is_a_function_of_seed_step_rank(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    s = WindowSampler(tokens, context=16)
    x1, y1 = s.batch(4, seed=1, step=5, index=0)
    x2, _ = s.batch(4, seed=1, step=5, index=0)
    x3, _ = s.batch(4, seed=1, step=5, index=1)
    assert (x1 == x2).all() and not (x1 == x3).all()
    assert (y1[:, :-1] == x1[:, 1:]).all()  # targets are inputs shifted by one
    windows = list(s.sequential(batch_size=10))
    assert sum(len(x) for x, _ in windows) == (1000 - 17) // 16 + 1


def test_missing_data_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="s2moe prepare"):
        read_meta(tmp_path / "nothing")


def test_offline_download_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import s2moe_ds.data.datasets as prep

    monkeypatch.setitem(prep.DEFAULT_SOURCES, "text8", ("raw/text8.zip", "http://127.0.0.1:9/text8.zip"))
    with pytest.raises(DataError, match=r"put it at raw/text8.zip.*data.source=PATH"):
        prepare("text8", tmp_path / "out")


def test_truncated_and_mismatched_token_files_are_detected(tmp_path):
    prepare("pydoc", tmp_path)
    with open(tmp_path / "val.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="val.bin is 100 bytes but meta.json says"):
        load_split(tmp_path, "val")
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["vocab_size"] = 10
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="token ids >= the vocabulary size 10"):
        load_split(tmp_path, "train")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        read_meta(tmp_path)


def test_bad_archive_and_missing_split(tmp_path):
    bad = tmp_path / "text8.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="not a valid zip|no member"):
        prepare("text8", tmp_path / "o", source=str(bad))
    src = tmp_path / "s.txt"
    src.write_text("to be or not to be " * 200)
    prepare("shakespeare", tmp_path / "sh", source=str(src))
    with pytest.raises(DataError, match=r"no 'dev' split \(it has \['train', 'val', 'test'\]\)"):
        load_split(tmp_path / "sh", "dev")
    # a folder prepared before the 90/5/5 split (no test part) is refused, not read with other val numbers
    meta_path = tmp_path / "sh" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["splits"]["test"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="old 90/10 train/val split.*run `s2moe prepare` again"):
        load_split(tmp_path / "sh", "val")


def test_decoder_is_the_data_folders_tokenizer(tmp_path):
    from s2moe_ds.data import load_tokenizer

    meta = prepare("pydoc", tmp_path)
    dec, tok = Decoder(tmp_path), load_tokenizer(tmp_path, meta)
    assert meta["eod_id"] is None and tok.vocab_size == meta["vocab_size"] and meta["dtype"] == "uint16"
    assert dec.encode("def f():") == tok.encode("def f():") and dec.decode(tok.encode("def f():")) == "def f():"
    with pytest.raises(DataError, match="the text has 1 character outside the model's vocabulary"):
        dec.encode("def \ue000")
