"""The ``data.tokenizer`` option: a kind (``char``, ``sentencepiece``) or the path of a user's tokenizer file
(a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``), and the errors for anything else."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer


def invalid_tokenizer(spec: str) -> DataError:
    """The error for a ``data.tokenizer`` that is neither a kind nor a tokenizer file's path."""
    return DataError(
        f"data.tokenizer {spec!r} is not valid; use 'char', 'sentencepiece', or the path of a "
        f"SentencePiece .model file or a Hugging Face tokenizer.json"
    )


def is_tokenizer_path(spec: str) -> bool:
    """Whether ``data.tokenizer`` names a file (a SentencePiece .model or a Hugging Face tokenizer.json)."""
    return spec.endswith(".model") or spec.endswith("tokenizer.json")


def user_tokenizer(path: str | Path, eod_token: str = "") -> Tokenizer:
    """The tokenizer in a user's file: ``*.model`` (SentencePiece) or ``*tokenizer.json`` (Hugging Face)."""
    p = str(path)
    if p.endswith(".model"):
        return SentencePieceTokenizer.from_file(p, eod_token)
    if p.endswith("tokenizer.json"):
        return HFTokenizer.from_file(p, eod_token)
    raise DataError(
        f"data.tokenizer {p!r}: a tokenizer file must be a SentencePiece .model or a Hugging Face tokenizer.json"
    )


def tokenizer_from_spec(tokenizer: str, eod_token: str) -> Tokenizer | None:
    """A user's tokenizer file (data.tokenizer=PATH), or None for 'char' / 'sentencepiece'."""
    if tokenizer in ("char", "sentencepiece"):
        return None
    if not is_tokenizer_path(tokenizer):
        raise invalid_tokenizer(tokenizer)
    path = Path(tokenizer).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.tokenizer {tokenizer!r} does not exist; give the path of an existing SentencePiece "
            f".model file or Hugging Face tokenizer.json (relative paths start at {Path.cwd()})"
        )
    tok = user_tokenizer(path, eod_token)
    tok.source = str(tokenizer)
    return tok
