"""Streaming preparation (data.dataset=corpus) and the tokenizers: sources (files, folders, globs, several,
.txt/.jsonl/.gz), end-of-document tokens, deterministic document splits, SentencePiece and Hugging Face
tokenizer files brought by the user, uint32 tokens for big vocabularies, the Tokenizer save/load round
trip, and memory that does not grow with the corpus."""

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from s2moe_ds.config import load_config
from s2moe_ds.configtools import ConfigError
from s2moe_ds.data import (
    CharTokenizer,
    DataError,
    Decoder,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_split,
    load_tokenizer,
    prepare_corpus,
    read_meta,
    resolve_sources,
)
from s2moe_ds.data.prepare import prepare
from s2moe_ds.data.splits import split_of_documents

REPO = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]


def docs_of(data_dir, split, meta=None):
    """The documents of a split, cut at the end-of-document id and decoded."""
    meta = meta or read_meta(data_dir)
    tok = load_tokenizer(data_dir, meta)
    ids = load_split(data_dir, split, meta).astype(np.int64)
    assert len(ids) == 0 or ids[-1] == meta["eod_id"], "every document ends with the end-of-document id"
    cuts = np.flatnonzero(ids == meta["eod_id"])
    starts = np.concatenate([[0], cuts[:-1] + 1]) if len(cuts) else []
    return [tok.decode(ids[s:e]) for s, e in zip(starts, cuts)]


def all_docs(data_dir):
    meta = read_meta(data_dir)
    return {s: docs_of(data_dir, s, meta) for s in meta["splits"]}


def write_jsonl(path, texts, field="text", gz=False):
    lines = "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")


@pytest.fixture
def mixed_source(tmp_path):
    """A folder with .txt (nested), .jsonl, .jsonl.gz and .txt.gz files, plus a file that is not a source."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("the first document\nhas two lines\n")
    (src / "sub" / "b.txt").write_text("caf\u00e9 document number two")
    with gzip.open(src / "sub" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("a gzipped text document")
    write_jsonl(src / "d.jsonl", [f"json line {i}" for i in range(12)] + [""])  # the empty one is skipped
    write_jsonl(src / "e.jsonl.gz", [f"gz line {i} \u65e5\u672c" for i in range(15)], gz=True)
    (src / "notes.md").write_text("not read: folders take .txt, .jsonl and their .gz")
    (src / ".hidden.txt").write_text("not read either")
    expected = (
        ["the first document\nhas two lines\n"]
        + [f"json line {i}" for i in range(12)]
        + [f"gz line {i} \u65e5\u672c" for i in range(15)]
        + ["caf\u00e9 document number two", "a gzipped text document"]
    )
    return src, expected


def test_folder_of_mixed_formats_every_document_once_with_eod(tmp_path, mixed_source):
    src, expected = mixed_source
    meta = prepare("corpus", tmp_path / "out", str(src), workers=1, block_bytes=64, progress=False)
    assert meta["source_files"] == 5 and meta["eod"] and meta["eod_id"] == meta["vocab_size"] - 1
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    docs = all_docs(tmp_path / "out")
    assert sorted(d for split in docs.values() for d in split) == sorted(expected)
    assert all(len(docs[s]) >= 1 for s in ("train", "val", "test"))  # small corpora still get every split
    assert meta["documents"] == {s: len(d) for s, d in docs.items()}
    assert sum(meta["splits"].values()) == sum(len(d) for d in expected) + len(expected)  # + one EOD each
    # document order inside a split follows the source order (files sorted by path)
    order = {d: i for i, d in enumerate(expected)}
    assert all(order[a] < order[b] for split in docs.values() for a, b in zip(split, split[1:]))
    assert Decoder(tmp_path / "out").encode("caf\u00e9") == load_tokenizer(tmp_path / "out").encode("caf\u00e9")


def test_glob_several_sources_and_workers_give_identical_files(tmp_path, mixed_source):
    src, expected = mixed_source
    a = prepare("corpus", tmp_path / "w1", str(src), workers=1, block_bytes=64, progress=False)
    b = prepare("corpus", tmp_path / "w3", str(src), workers=3, block_bytes=64, progress=False)
    c = prepare("corpus", tmp_path / "big", str(src), workers=2, progress=False)  # other block size
    for out, m in (("w3", b), ("big", c)):
        assert m["splits"] == a["splits"] and m["documents"] == a["documents"]
        assert m["source_sha256"] == a["source_sha256"] and m["symbols"] == a["symbols"]
        for s in a["splits"]:
            assert (tmp_path / out / f"{s}.bin").read_bytes() == (tmp_path / "w1" / f"{s}.bin").read_bytes()
    # the same files named as a glob plus a comma-separated list, in the same order
    source = f"{src}/*.txt,{src}/sub/b.txt,{src}/*.jsonl*,{src}/sub/c.txt.gz,{src}/a.txt"
    files = resolve_sources(source)
    assert [Path(f.path).name for f in files] == ["a.txt", "b.txt", "d.jsonl", "e.jsonl.gz", "c.txt.gz"]
    m = prepare("corpus", tmp_path / "glob", source, workers=2, progress=False)
    assert sorted(d for split in all_docs(tmp_path / "glob").values() for d in split) == sorted(expected)
    assert m["source_files"] == 5


def test_split_rule_is_a_hash_of_the_document_index(tmp_path):
    texts = [f"document {i} " + " ".join(WORDS[j % 10] for j in range(i % 7 + 1)) for i in range(3000)]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    meta = prepare(
        "corpus",
        tmp_path / "out",
        str(tmp_path / "docs.jsonl"),
        val_fraction=0.1,
        test_fraction=0.05,
        workers=2,
        block_bytes=4096,
        progress=False,
    )
    codes = split_of_documents(0, 3000, 0.1, 0.05).tolist()
    # the documented small-corpus rule: a document hashed to train goes to val, then test, while that
    # split is empty and train is not
    seen = [0, 0, 0]
    for i, c in enumerate(codes):
        if c == 0 and seen[0]:
            c = 1 if not seen[1] else 2 if not seen[2] else 0
        codes[i] = c
        seen[c] += 1
    assert sum(a != b for a, b in zip(codes, split_of_documents(0, 3000, 0.1, 0.05))) <= 2
    want = {s: [t for t, c in zip(texts, codes) if c == i] for i, s in enumerate(("train", "val", "test"))}
    assert all_docs(tmp_path / "out") == want
    assert abs(meta["documents"]["val"] / 3000 - 0.1) < 0.02 and abs(meta["documents"]["test"] / 3000 - 0.05) < 0.015
    assert "SplitMix64" in meta["split_rule"]
    # test_fraction=0: no test split at all
    meta = prepare(
        "corpus", tmp_path / "two", str(tmp_path / "docs.jsonl"), test_fraction=0.0, workers=1, progress=False
    )
    assert set(meta["splits"]) == {"train", "val"} and not (tmp_path / "two" / "test.bin").exists()


def test_txt_documents_file_or_line_and_eod_switch(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("first line\n\nsecond line\r\nthird line\n" * 3)
    with pytest.raises(DataError, match="gave 1 document.*data.txt_document=line.*data.dataset=text"):
        prepare("corpus", tmp_path / "o1", str(one), progress=False)
    assert not (tmp_path / "o1" / "meta.json").exists() and not list((tmp_path / "o1").glob("*.tmp"))
    meta = prepare("corpus", tmp_path / "o2", str(one), txt_document="line", workers=1, progress=False)
    assert meta["eod"] and sum(meta["documents"].values()) == 9
    assert sorted(d for s in all_docs(tmp_path / "o2").values() for d in s) == sorted(
        ["first line", "second line", "third line"] * 3
    )
    write_jsonl(tmp_path / "d.jsonl", [f"doc {i}" for i in range(20)])
    meta = prepare("corpus", tmp_path / "o3", str(tmp_path / "d.jsonl"), eod=False, workers=1, progress=False)
    assert not meta["eod"] and meta["eod_id"] is None and meta["vocab_size"] == len(meta["symbols"])
    assert sum(meta["splits"].values()) == sum(len(f"doc {i}") for i in range(20))


def test_long_lines_and_multibyte_characters_across_blocks(tmp_path):
    text = "\u65e5\u672c\u8a9e caf\u00e9 \U0001f600 " * 400  # one long line, no newline: cut at character bounds
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("short")
    (tmp_path / "c.txt").write_text("another")
    prepare("corpus", tmp_path / "out", f"{tmp_path}/*.txt", workers=2, block_bytes=37, progress=False)
    assert sorted(d for s in all_docs(tmp_path / "out").values() for d in s) == sorted([text, "short", "another"])


def test_bad_sources_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare("corpus", tmp_path / "o", str(tmp_path / "missing.txt"), progress=False)
    with pytest.raises(DataError, match="matches no file"):
        prepare("corpus", tmp_path / "o", f"{tmp_path}/*.jsonl", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt, .jsonl"):
        prepare("corpus", tmp_path / "o", str(tmp_path / "empty"), progress=False)
    with pytest.raises(DataError, match="needs data.source"):
        prepare("corpus", tmp_path / "o", "", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "body": "one"}\n{"text": "ok", "body": "two"}\n{"body": "three"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: no 'text' field.*data.text_field"):
        prepare("corpus", tmp_path / "o", str(bad), progress=False)
    meta = prepare("corpus", tmp_path / "o", str(bad), text_field="body", workers=1, progress=False)
    assert meta["documents"] == {"train": 1, "val": 1, "test": 1}
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        prepare("corpus", tmp_path / "o", str(bad), progress=False)
    bad.write_bytes(b'{"text": "ok"}\n' + b"\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not UTF-8"):
        prepare("corpus", tmp_path / "o", str(bad), progress=False)
    gz = tmp_path / "cut.jsonl.gz"
    write_jsonl(gz, [f"document {i} " * 50 for i in range(200)], gz=True)
    gz.write_bytes(gz.read_bytes()[:-100])
    with pytest.raises(DataError, match="cut.jsonl.gz cannot be read as gzip.*truncated"):
        prepare("corpus", tmp_path / "o", str(gz), progress=False)
    # a failure while scanning (pass 1) or writing (pass 2) leaves the previous preparation as it was and
    # removes every temporary: the old files are replaced only at the end, meta.json last
    assert not list((tmp_path / "o").glob("*.tmp")) and read_meta(tmp_path / "o")["text_field"] == "body"
    load_split(tmp_path / "o", "train")
    symbols = sorted({ord(c) for c in '{"text": "ok"}'})
    tok = CharTokenizer(symbols, eod_id=len(symbols))
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not UTF-8"):
        prepare_corpus(tmp_path / "o", str(bad), tokenizer=tok, progress=False, workers=2)
    assert not list((tmp_path / "o").glob("*.tmp")) and read_meta(tmp_path / "o")["text_field"] == "body"
    load_split(tmp_path / "o", "train")
    with pytest.raises(DataError, match="data.dataset=text reads one plain UTF-8 file.*data.dataset=corpus"):
        prepare("text", tmp_path / "o", str(tmp_path / "empty"), progress=False)


def test_config_fields_are_validated():
    cfg = load_config(None, ["data.dataset=corpus", "data.source=a,b", "data.workers=2", "data.eod=false"]).data
    assert cfg.workers == 2 and cfg.eod is False and cfg.val_fraction == 0.05 and cfg.text_field == "text"
    for bad, field in (
        ("data.tokenizer=bpe", "data.tokenizer"),
        ("data.txt_document=page", "data.txt_document"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("data.test_fraction=1.5", "data.test_fraction"),
        ("data.workers=-1", "data.workers"),
        ("data.text_field=", "data.text_field"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="val_fraction.*plus data.test_fraction"):
        load_config(None, ["data.val_fraction=0.6", "data.test_fraction=0.5"])
    cfg = load_config(None, ["data.tokenizer=/nowhere/tok.model"]).data  # checked at prepare time, not here
    with pytest.raises(ConfigError, match="data.tokenizer.*does not exist"):
        cfg.check_tokenizer_file()


def spm_model(tmp_path, vocab_size=28) -> Path:
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    corpus = tmp_path / "spm_train.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "my"), vocab_size=vocab_size, model_type="unigram", minloglevel=2
    )  # defaults: unk 0, bos 1, eos 2
    return tmp_path / "my.model"


def hf_tokenizer_json(tmp_path, n_words=0) -> Path:
    """A word-level tokenizer.json: WORDS (plus ``n_words`` filler words), [UNK] and <|endoftext|>."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "<|endoftext|>": 1}
    for w in WORDS + [f"w{i}" for i in range(n_words)]:
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "hf" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    tok.save(str(path))
    return path


def test_bring_your_own_sentencepiece_model(tmp_path):
    model = spm_model(tmp_path)
    texts = [" ".join(WORDS[(i + j) % 10] for j in range(8)) for i in range(40)]
    write_jsonl(tmp_path / "d.jsonl", texts)
    meta = prepare(
        "corpus", tmp_path / "out", str(tmp_path / "d.jsonl"), tokenizer=str(model), workers=2, progress=False
    )
    assert meta["tokenizer"] == "sentencepiece" and meta["vocab_size"] == 28 and meta["eod_id"] == 2
    assert meta["tokenizer_file"] == "spm.model" and meta["tokenizer_source"] == str(model)
    assert (tmp_path / "out" / "spm.model").read_bytes() == model.read_bytes()  # the folder holds its tokenizer
    model.unlink()  # nothing outside the data folder is needed any more
    assert sorted(d for s in all_docs(tmp_path / "out").values() for d in s) == sorted(texts)
    dec = Decoder(tmp_path / "out")
    assert dec.decode(dec.encode("alpha beta gamma")) == "alpha beta gamma"
    # the same file for an in-memory dataset, and a named end-of-document piece
    (tmp_path / "x").mkdir()
    other = spm_model(tmp_path / "x")
    meta = prepare("pydoc", tmp_path / "pydoc", tokenizer=str(other), eod_token="<s>", progress=False)
    assert meta["eod_id"] == 1 and meta["tokenizer"] == "sentencepiece" and meta["dataset"] == "pydoc"
    assert load_split(tmp_path / "pydoc", "val").max() < 28
    with pytest.raises(DataError, match="data.eod_token 'nope' is not a piece"):
        prepare("pydoc", tmp_path / "p2", tokenizer=str(other), eod_token="nope", progress=False)


def test_sentencepiece_trained_on_a_stream_sample(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(3):
        write_jsonl(tmp_path / f"part{k}.jsonl", [" ".join(rng.choice(WORDS, 12)) for _ in range(400)])
    meta = prepare(
        "corpus",
        tmp_path / "out",
        str(tmp_path),
        tokenizer="sentencepiece",
        vocab_size=26,
        tokenizer_sample_mb=1,
        workers=2,
        block_bytes=8192,
        progress=False,
    )
    assert meta["tokenizer"] == "sentencepiece" and meta["vocab_size"] == 26 and meta["eod_id"] == 1
    assert "sample" in meta["tokenizer_source"]
    assert sum(meta["documents"].values()) == 1200
    assert docs_of(tmp_path / "out", "val")[0].split()[0] in WORDS


def test_bring_your_own_hf_tokenizer_json(tmp_path):
    path = hf_tokenizer_json(tmp_path)
    texts = [" ".join(WORDS[(i * j) % 10] for j in range(1, 6)) for i in range(30)]
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(texts[i])
    write_jsonl(tmp_path / "more.jsonl.gz", texts[3:], gz=True)
    meta = prepare(
        "corpus",
        tmp_path / "out",
        f"{tmp_path}/doc*.txt,{tmp_path}/more.jsonl.gz",
        tokenizer=str(path),
        workers=2,
        progress=False,
    )
    assert meta["tokenizer"] == "huggingface" and meta["unit"] == "token" and meta["eod_id"] == 1
    assert meta["vocab_size"] == 12 and meta["dtype"] == "uint16" and meta["tokenizer_file"] == "tokenizer.json"
    assert sorted(d for s in all_docs(tmp_path / "out").values() for d in s) == sorted(texts)
    # no end-of-document token in the vocabulary: a clear error, unless data.eod=false
    data = json.loads(path.read_text())
    data["added_tokens"] = []
    del data["model"]["vocab"]["<|endoftext|>"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="no end-of-document token.*data.eod_token=TOKEN.*data.eod=false"):
        prepare("corpus", tmp_path / "o2", f"{tmp_path}/doc*.txt", tokenizer=str(path), progress=False)
    meta = prepare("corpus", tmp_path / "o2", f"{tmp_path}/doc*.txt", tokenizer=str(path), eod=False, progress=False)
    assert meta["eod_id"] is None and sum(meta["documents"].values()) == 3


def test_vocabulary_above_65535_is_stored_as_uint32(tmp_path):
    path = hf_tokenizer_json(tmp_path, n_words=70_000)
    texts = [f"alpha w{69_990 + i % 10} beta w{i}" for i in range(50)]
    write_jsonl(tmp_path / "d.jsonl", texts)
    meta = prepare(
        "corpus", tmp_path / "out", str(tmp_path / "d.jsonl"), tokenizer=str(path), workers=1, progress=False
    )
    assert meta["vocab_size"] == 70_012 and meta["dtype"] == "uint32"
    ids = np.concatenate([load_split(tmp_path / "out", s) for s in meta["splits"]])
    assert ids.dtype == np.uint32 and ids.max() == 70_011  # "w69999": id 2 + 10 + 69,999
    assert sorted(d for s in all_docs(tmp_path / "out").values() for d in s) == sorted(texts)
    # the in-memory datasets use the same rule
    src = tmp_path / "t.txt"
    src.write_text("alpha w69999 beta\n" * 50)
    meta = prepare("text", tmp_path / "t", str(src), tokenizer=str(path), progress=False)
    assert meta["dtype"] == "uint32" and load_split(tmp_path / "t", "train").max() == 70_011


def test_save_pretrained_from_pretrained_round_trip_every_kind(tmp_path):
    model = spm_model(tmp_path)
    kinds = {
        "char": CharTokenizer([ord(c) for c in sorted(set("hello world\u00e9\n"))], "char", eod_id=10),
        "byte": CharTokenizer(list(range(256)), "byte"),
        "sentencepiece": SentencePieceTokenizer.from_file(model),
        "huggingface": HFTokenizer.from_file(hf_tokenizer_json(tmp_path)),
    }
    texts = {
        "char": "hello w\u00e9rld\n",
        "byte": "caf\u00e9 \u65e5",
        "sentencepiece": "alpha beta gamma",
        "huggingface": "alpha beta gamma",
    }
    for name, tok in kinds.items():
        d = tmp_path / "saved" / name
        written = tok.save_pretrained(d)
        assert sorted(written) == sorted(p.name for p in d.iterdir()) and "s2moe_tokenizer.json" in written
        # rebuilt from those files alone: copy them somewhere else first
        alone = tmp_path / "alone" / name
        alone.mkdir(parents=True)
        for f in written:
            (alone / f).write_bytes((d / f).read_bytes())
        back = Tokenizer.from_pretrained(alone)
        assert type(back) is type(tok) and back.vocab_size == tok.vocab_size and back.eod_id == tok.eod_id
        ids = tok.encode(texts[name])
        assert back.encode(texts[name]) == ids and back.decode(ids) == tok.decode(ids) == texts[name]
        assert back.sha256 == tok.sha256
    assert kinds["sentencepiece"].eod_id == 2 and kinds["huggingface"].eod_id == 1
    with pytest.raises(DataError, match=r"outside the model's vocabulary .*: \['z'\]"):
        kinds["char"].encode("hello z")
    with pytest.raises(DataError, match="no tokenizer in"):
        Tokenizer.from_pretrained(tmp_path)
    # a prepared folder's tokenizer saves and loads the same way
    prepare("pydoc", tmp_path / "pydoc", progress=False)
    tok = load_tokenizer(tmp_path / "pydoc")
    tok.save_pretrained(tmp_path / "pydoc_tok")
    assert Tokenizer.from_pretrained(tmp_path / "pydoc_tok").encode("def f():") == Decoder(tmp_path / "pydoc").encode(
        "def f():"
    )


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    from s2moe_ds.data.prepare import prepare
    meta = prepare("corpus", sys.argv[2], sys.argv[1], workers=2, progress=False)
    print(json.dumps({"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                      "tokens": sum(meta["splits"].values())}))
""")


def generate_corpus(folder: Path, n_bytes: int, seed: int = 0) -> None:
    """``n_bytes`` of .jsonl documents in 10 MB files, cut from a random word stream (a little non-ASCII)."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS + ["caf\u00e9", "\u65e5\u672c", "na\u00efve"] + [f"x{i}" for i in range(300)])
    pool = " ".join(rng.choice(words, 400_000))
    folder.mkdir(parents=True)
    done, k = 0, 0
    while done < n_bytes:
        lines, size = [], 0
        while size < min(10 << 20, n_bytes - done):
            n, start = int(rng.integers(100, 6000)), int(rng.integers(0, len(pool) - 6000))
            lines.append(json.dumps({"text": pool[start : start + n]}) + "\n")
            size += len(lines[-1])
        (folder / f"part{k:03d}.jsonl").write_text("".join(lines))
        done, k = done + size, k + 1


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    peaks = {}
    for mb in (30, 120):
        generate_corpus(tmp_path / f"c{mb}", mb << 20, seed=mb)
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(tmp_path / f"c{mb}"), str(tmp_path / f"o{mb}")],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[mb] = json.loads(proc.stdout.strip().splitlines()[-1])
        (tmp_path / f"o{mb}" / "train.bin").unlink()
    small, large = peaks[30], peaks[120]
    assert large["tokens"] > 3.5 * small["tokens"]
    # ru_maxrss is in KiB: 4x the corpus may cost a few MiB of noise, not 4x the memory
    for key in ("main", "workers"):
        assert large[key] < small[key] + 16 * 1024, (key, peaks)


DEAD_WORKER = """
import os
from s2moe_ds.data import DataError
from s2moe_ds.data.pool import ordered_map

def die_on_3(task):
    if task == 3:
        os._exit(9)  # a worker killed mid-task (the OOM killer, a stray signal)
    return task

try:
    list(ordered_map(die_on_3, range(10), 2, {}))
except DataError as e:
    print("DATAERROR", e)
"""


def test_a_dead_worker_fails_the_prepare_instead_of_hanging(tmp_path):
    import subprocess
    import sys

    (tmp_path / "dead_worker.py").write_text(DEAD_WORKER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "dead_worker.py")], capture_output=True, text=True, timeout=120
    )
    assert "DATAERROR a data worker process died" in proc.stdout, proc.stdout + proc.stderr
    assert "data.workers=1" in proc.stdout
