"""A vocabulary learnt from text: the character (byte) set of an in-memory corpus, and SentencePiece
trained on a text file (the train split, or a sample of a streamed corpus)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError
from .tokenizers import CharTokenizer, SentencePieceTokenizer, Tokenizer

if TYPE_CHECKING:
    from .datasets import Corpus


def codepoints(part) -> np.ndarray:
    if isinstance(part, (bytes, bytearray)):
        return np.frombuffer(part, dtype=np.uint8).astype(np.uint32)
    return np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)


def tokenize_chars(corpus: Corpus) -> tuple[Tokenizer, dict]:
    """The character (byte) vocabulary of all splits, sorted by code point."""
    symbols = np.unique(np.concatenate([codepoints(p) for p in corpus.splits.values()]))
    tok = CharTokenizer(symbols.tolist(), corpus.unit)
    return tok, {"tokenizer": "char", "unit": corpus.unit, "vocab_size": tok.vocab_size, "symbols": tok.symbols}


def train_sentencepiece(text_file: Path, vocab_size: int, eos: bool = False) -> SentencePieceTokenizer:
    """A unigram SentencePiece model trained on ``text_file`` (unk id 0; with ``eos`` a ``</s>`` piece, id 1,
    that serves as the end-of-document token)."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_file),
                model_prefix=str(Path(tmp) / "spm"),
                vocab_size=vocab_size,
                model_type="unigram",
                character_coverage=1.0,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                bos_id=-1,
                eos_id=1 if eos else -1,
                unk_id=0,
                pad_id=-1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(
                f"SentencePiece training failed ({e}); a smaller data.vocab_size usually fixes it"
            ) from None
        tok = SentencePieceTokenizer((Path(tmp) / "spm.model").read_bytes())
    tok.eod_id = tok.find_eod()
    return tok


def tokenize_sentencepiece(corpus: Corpus, vocab_size: int) -> tuple[Tokenizer, dict]:
    """Train SentencePiece on the train split."""
    with tempfile.TemporaryDirectory() as tmp:
        train_txt = Path(tmp) / "train.txt"
        train_txt.write_text(text_of(corpus.splits["train"]), encoding="utf-8")
        tok = train_sentencepiece(train_txt, vocab_size)
    return tok, {"tokenizer": "sentencepiece", "unit": "piece", "vocab_size": tok.vocab_size, "spm_model": "spm.model"}


def text_of(part) -> str:
    return part.decode("utf-8", errors="replace") if isinstance(part, (bytes, bytearray)) else part
