"""Any of our tokenizers as the two files ``transformers.AutoTokenizer.from_pretrained(DIR)`` reads with
nothing else installed: ``tokenizer.json`` (a Hugging Face ``tokenizers`` tokenizer) and
``tokenizer_config.json``.

- ``char``: a BPE model with no merges over the character vocabulary (every character one token, the
  same ids), no pre-tokenizer, decoded by concatenation; byte-level vocabularies (enwik8) through the
  byte-to-character mapping of ``ByteLevel``. The end-of-document id is the special token ``<|endoftext|>``
  (the tokenizer's ``eos_token``). A character outside the vocabulary is dropped (ours refuses it).
- ``sentencepiece``: the model's pieces and scores as a Unigram model with SentencePiece's normalisation
  (``tokenizers``' ``SentencePieceUnigramTokenizer.from_spm``). Ours encodes line by line, so the ids of a
  multi-line text can differ at line starts; the text round-trips either way.
- ``huggingface``: the user's own ``tokenizer.json``, unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import DataError
from .text import byte_chars
from .tokenizers import EOD_TOKEN, HF_FILE, CharTokenizer, SentencePieceTokenizer, Tokenizer

CONFIG_FILE = "tokenizer_config.json"


def _char_tokenizer(tok: CharTokenizer):
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HF

    if tok.unit == "byte":
        to_char = byte_chars()
        hf = HF(models.BPE(vocab={to_char[b]: i for i, b in enumerate(tok.symbols)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    else:
        hf = HF(models.BPE(vocab={chr(c): i for i, c in enumerate(tok.symbols)}, merges=[]))
        hf.decoder = decoders.Fuse()
    if tok.eod_id is not None:
        hf.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
    return hf


def _sentencepiece_tokenizer(tok: SentencePieceTokenizer):
    import sys

    from sentencepiece import sentencepiece_model_pb2
    from tokenizers.implementations import SentencePieceUnigramTokenizer

    # from_spm reads the model with a module of this top-level name; sentencepiece ships it
    sys.modules.setdefault("sentencepiece_model_pb2", sentencepiece_model_pb2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model)
    norm = proto.normalizer_spec
    if proto.trainer_spec.model_type != 1 or not norm.add_dummy_prefix or not norm.remove_extra_whitespaces:
        raise DataError(
            "the SentencePiece model is not a unigram model with SentencePiece's default whitespace handling, "
            "which is what tokenizers' converter writes; no tokenizer.json for AutoTokenizer (s2moe_ds reads "
            "the export's spm.model as before)"
        )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spm.model"
        path.write_bytes(tok.model)
        return SentencePieceUnigramTokenizer.from_spm(str(path))._tokenizer


def auto_tokenizer_files(tok: Tokenizer, max_length: int) -> dict[str, str]:
    """{file name: text} of ``tokenizer.json`` and ``tokenizer_config.json`` for ``tok``."""
    if tok.kind == "huggingface":
        # ours encodes without special tokens: drop the post-processor (a BOS/CLS template) so AutoTokenizer
        # gives the same ids by default
        spec = json.loads(tok.data.decode("utf-8"))
        spec["post_processor"] = None
        text = json.dumps(spec, ensure_ascii=False)
    else:
        hf = _char_tokenizer(tok) if tok.kind == "char" else _sentencepiece_tokenizer(tok)
        text = hf.to_str()
    eos = None
    if tok.eod_id is not None:
        eos = EOD_TOKEN if tok.kind == "char" else _token_of(text, tok.eod_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
    }
    return {HF_FILE: text, CONFIG_FILE: json.dumps(config, indent=1)}


def _token_of(tokenizer_json: str, token_id: int) -> str | None:
    from tokenizers import Tokenizer as HF

    return HF.from_str(tokenizer_json).id_to_token(token_id)


def write_auto_tokenizer(tok: Tokenizer, folder: str | Path, max_length: int) -> list[str]:
    """Write the AutoTokenizer files into ``folder`` (each renamed into place); returns their names."""
    folder = Path(folder)
    for name, text in auto_tokenizer_files(tok, max_length).items():
        tmp = folder / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    return [HF_FILE, CONFIG_FILE]
