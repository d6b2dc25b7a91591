"""A prepared data folder holds the same bytes as before the data package was split into modules
(issue 27): the in-memory path (the built-in corpus, Tiny Shakespeare by characters and by SentencePiece)
and the streamed path (a folder of text files and a gzipped JSON-lines file, by a worker pool in small
blocks; JSON lines by SentencePiece), each compared with the digests recorded before the move.

meta.json is compared without the fields that name the machine or the moment (``prepare_seconds``, the
temporary ``source`` path); every token file is compared byte for byte. A trained SentencePiece model
records its trainer's temporary file names, so ``spm.model`` is compared by its pieces and scores, and
meta.json's ``tokenizer_sha256`` (the hash of those bytes) is left out beside it."""

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from s2moe_ds.data.prepare import prepare

VOLATILE = ("prepare_seconds", "source")

# digests of each file of the prepared folder, recorded at 6456070, before the data package was split
RECORDED = {
    "pydoc-char": {
        "meta.json": "a6249888f5633a4080f016ab6cc2b9b91e520c21e81a8b0b4710fc7dce74e402",
        "test.bin": "2178935d39ca95c9da52350aced9910562aacfdf3bc87496fd553a5e37a2799a",
        "train.bin": "266d1220fb1754ba71296027f14561a98b09ca7568ce55e05bba1ad6ae8b68c7",
        "val.bin": "acce569e1cee05c8c37945ccef7663a648ef17b6cafa9dee40e5d88433c30be8",
    },
    "shakespeare-char": {
        "meta.json": "81becca6b3a1a03454d0f9e7dc0a3d40ea41312914f7ef7932c2a6fc613b11d9",
        "test.bin": "80a5ca4c42acf794775673d73e7e1a3c4c39dfb3fc283a7af77c3a952bb29605",
        "train.bin": "6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f",
        "val.bin": "c61e240bc4a6c3411a96774929ae80207fb3f3e486027e9c4d82c4bcd7a74bf8",
    },
    "shakespeare-spm": {
        "meta.json": "b198ceff93ed5c68143dfca01faea148e313d9e5701d74060af1a8df64859b85",
        "spm.model": "3a8a8f5a672ceac73a79304cf8fdb36e6e819a24037739e557d122d703fab3ee",
        "test.bin": "23ffabf00d1f76b5a892995850ae59f857a36cdb671907f81b59658d0bf9db1e",
        "train.bin": "be293a2562bb5874f92e8b5d89783965c0b1baf70cb996a23dc7042d7903bf9a",
        "val.bin": "89e455022366c6a7ec42114939d9675d4a2e13fc48c9dad7039d05b9a60dba3a",
    },
    "stream-char": {
        "meta.json": "887e62dd0067e4335b3611671cb1fb853ebcd70c8e8044ecd201c3f8783bcced",
        "test.bin": "d78f71b4fa580eb8d17c446a0abfde8a5c4c9b45ec236f3d28d40d11b7fdfddf",
        "train.bin": "59b22e8c0db203e0a2e4136083fff6259bcfed9c8d08102821e30d8ea89e3e38",
        "val.bin": "035135a0f542c419bff47a94195d647bc9068cd8e58dd8cbed57746de38cf960",
    },
    "stream-spm": {
        "meta.json": "33601cd326e5387dc40849670ed32c539e2e3b5a36e73a562a221306f34b3064",
        "spm.model": "c03d5adc6cd11ea4d5c627b103e503aa9f28297131158b583b2cf494c935859e",
        "test.bin": "9daade7c60ce16f8876707b11bb756dd237b395307b207868cc7cce01ac9bcab",
        "train.bin": "fda9bb9dca53b20dfb388028a5517790b61139e70d9a6b1d3f43affe39a77381",
        "val.bin": "f318bdb243600465f8c6fbb6643e0f6e3df214c1c90954ef32c1911bcac3278c",
    },
}
# the built-in corpus is the running Python's own documentation: its digests hold for this text only
PYDOC_TOPICS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"


def spm_pieces(path: Path) -> bytes:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    return json.dumps([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]).encode()


def folder_digests(folder: Path) -> dict:
    out = {}
    trained = (folder / "spm.model").exists()
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.name == "meta.json":
            drop = VOLATILE + (("tokenizer_sha256",) if trained else ())
            meta = {k: v for k, v in json.loads(data).items() if k not in drop}
            data = json.dumps(meta, sort_keys=True).encode()
        elif f.name == "spm.model":
            data = spm_pieces(f)
        out[f.name] = hashlib.sha256(data).hexdigest()
    return out


def streamed_sources(root: Path, text: str) -> str:
    """Three .txt documents in a folder (one in a subfolder) and a .jsonl.gz of 40 documents."""
    (root / "docs" / "more").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text(text[:30_000], encoding="utf-8")
    (root / "docs" / "b.txt").write_text(text[30_000:45_000], encoding="utf-8")
    (root / "docs" / "more" / "c.txt").write_text(text[45_000:60_000], encoding="utf-8")
    lines = [json.dumps({"text": text[60_000 + i * 1500 : 60_000 + (i + 1) * 1500], "id": i}) for i in range(40)]
    with gzip.GzipFile(root / "docs" / "d.jsonl.gz", "wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return str(root / "docs")


def prepared(case: str, tmp_path: Path, shakespeare: Path) -> Path:
    out = tmp_path / case
    text = shakespeare.read_text(encoding="utf-8")
    if case == "pydoc-char":
        prepare("pydoc", out)
    elif case == "shakespeare-char":
        prepare("shakespeare", out, source=str(shakespeare))
    elif case == "shakespeare-spm":
        prepare("shakespeare", out, source=str(shakespeare), tokenizer="sentencepiece", vocab_size=300)
    elif case == "stream-char":
        src = streamed_sources(tmp_path / "src", text)
        prepare("corpus", out, source=src, workers=2, block_bytes=4096, progress=False)
    else:
        jsonl = tmp_path / "docs.jsonl"
        jsonl.write_text("".join(json.dumps({"text": text[i : i + 2000]}) + "\n" for i in range(0, 200_000, 2000)))
        prepare("corpus", out, source=str(jsonl), tokenizer="sentencepiece", vocab_size=300, workers=1, progress=False)
    return out


@pytest.mark.parametrize("case", list(RECORDED))
def test_prepared_folder_bytes_are_unchanged(case, tmp_path, shakespeare_path):
    if case == "pydoc-char":
        from pydoc_data import topics

        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        if hashlib.sha256(text.encode()).hexdigest() != PYDOC_TOPICS_SHA256:
            pytest.skip("this Python's documentation differs from the one the digests were recorded on")
    digests = folder_digests(prepared(case, tmp_path, shakespeare_path))
    assert digests == RECORDED[case]
