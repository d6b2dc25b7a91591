"""Tokenizers: the one way text becomes token ids (and back) in this project.

Kinds (``Tokenizer.kind``, the ``tokenizer`` field of meta.json):

- ``char``: one id per character (or per byte for byte-level data such as enwik8); the vocabulary is
  the sorted list of code points (byte values) seen in the corpus, optionally followed by one
  end-of-document id;
- ``sentencepiece``: a SentencePiece model, trained by ``s2moe prepare`` or brought by the user
  (``data.tokenizer=PATH.model``);
- ``huggingface``: a Hugging Face ``tokenizer.json`` (``data.tokenizer=PATH/tokenizer.json``).

``save_pretrained(dir)`` writes everything needed to rebuild a tokenizer (``s2moe_tokenizer.json`` plus
the model file); ``Tokenizer.from_pretrained(dir)`` rebuilds it from those files alone.
The tokenizer of a prepared data folder is ``store.load_tokenizer(data_dir, meta)``; this module knows
nothing of data folders.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DataError
from .text import byte_chars, split_pieces

SPEC_FILE = "s2moe_tokenizer.json"
SPM_FILE = "spm.model"
HF_FILE = "tokenizer.json"
KINDS = ("char", "sentencepiece", "huggingface")
# end-of-document tokens looked for in a Hugging Face tokenizer when data.eod_token is ''
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
EOD_TOKEN = "<|endoftext|>"  # the character tokenizer's end-of-document token, where it needs a name


class Tokenizer:
    """Text <-> token ids. Subclasses: CharTokenizer, SentencePieceTokenizer, HFTokenizer."""

    kind: str = ""
    vocab_size: int = 0
    eod_id: int | None = None

    file_label, file_kind = "", ""  # a tokenizer kept in a model file: how its errors name that file

    @classmethod
    def from_file(cls, path: str | Path, eod_token: str = "") -> Tokenizer:
        """A tokenizer kept in a model file (SentencePiece ``.model``, Hugging Face ``tokenizer.json``), its
        end-of-document id the token named ``eod_token`` or (``''``) the model's own (``find_eod``)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{cls.file_label} {str(path)!r} does not exist; data.tokenizer must name an existing {cls.file_kind}"
            )
        tok = cls(path.read_bytes())
        tok.eod_id = tok.find_eod(eod_token)
        return tok

    def find_eod(self, eod_token: str = "") -> int | None:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_array(self, text: str, dtype=np.int64) -> np.ndarray:
        """``encode`` for long texts (a whole document or split), piece by piece, as an array of ``dtype``."""
        out = [np.asarray(self.encode(p), dtype=dtype) for p in split_pieces(text)]
        return np.concatenate(out) if out else np.zeros(0, dtype=dtype)

    def encode_documents(self, texts: Sequence[str], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        """(the ids of all ``texts`` concatenated, the number of ids of each)."""
        parts = [self.encode_array(t, dtype) for t in texts]
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), lengths

    @property
    def sha256(self) -> str:
        """Fingerprint of the vocabulary and model (two tokenizers with equal fingerprints encode alike)."""
        raise NotImplementedError

    def spec(self) -> dict:
        """The ``s2moe_tokenizer.json`` content (model files are named, not embedded)."""
        raise NotImplementedError

    def model_files(self) -> dict:
        """Files besides s2moe_tokenizer.json that rebuild this tokenizer: {file name: bytes}."""
        return {}

    def save_pretrained(self, out_dir: str | Path) -> list[str]:
        """Write ``s2moe_tokenizer.json`` (kind, end-of-document id, vocabulary or model file name) and the
        model file into ``out_dir``; returns the file names written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in self.model_files().items():
            tmp = out / (name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, out / name)
            written.append(name)
        tmp = out / (SPEC_FILE + ".tmp")
        tmp.write_text(json.dumps(self.spec(), indent=1))
        os.replace(tmp, out / SPEC_FILE)
        return [SPEC_FILE] + written

    @staticmethod
    def from_pretrained(directory: str | Path) -> Tokenizer:
        """Rebuild a tokenizer from the files ``save_pretrained`` wrote (a folder holding only a
        ``tokenizer.json`` or ``spm.model`` works too)."""
        d = Path(directory)
        spec_path = d / SPEC_FILE
        if not spec_path.exists():
            if (d / HF_FILE).exists():
                return HFTokenizer.from_file(d / HF_FILE)
            if (d / SPM_FILE).exists():
                return SentencePieceTokenizer.from_file(d / SPM_FILE)
            raise DataError(
                f"no tokenizer in {d}: expected {SPEC_FILE} (written by Tokenizer.save_pretrained), "
                f"{HF_FILE} or {SPM_FILE}"
            )
        try:
            spec = json.loads(spec_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{spec_path} is corrupt ({e!r}); write it again with Tokenizer.save_pretrained") from None

        def read(name: str) -> bytes:
            if not (d / name).exists():
                raise DataError(f"{spec_path} names {name}, which is missing from {d}; copy it there")
            return (d / name).read_bytes()

        return Tokenizer.from_spec(spec, read, str(spec_path))

    def id_table(self) -> list[str]:
        """Every id's token, as text: what the ids mean (characters; a byte as ``ByteLevel``'s character for
        it; SentencePiece pieces; tokenizer.json tokens), whichever tokenizer kind holds them."""
        raise NotImplementedError

    def vocab_identity(self) -> str:
        """A hash of ``id_table()``: equal for two tokenizers whose ids mean the same tokens."""
        return hashlib.sha256(json.dumps(self.id_table()).encode()).hexdigest()[:16]

    def __reduce__(self):  # pickled (to worker processes, in checkpoints) as what rebuilds it
        return Tokenizer.from_saved, (self.saved(),)

    def saved(self) -> dict:
        """Everything that rebuilds this tokenizer, in one picklable dict (kept in every checkpoint):
        ``{'spec': spec(), 'files': model_files()}``; ``Tokenizer.from_saved`` reads it."""
        return {"spec": self.spec(), "files": dict(self.model_files())}

    @staticmethod
    def from_saved(saved: dict, where: str = "the checkpoint") -> Tokenizer:
        files = saved.get("files") or {}

        def read(name: str) -> bytes:
            if name not in files:
                raise DataError(f"{where} keeps no {name} for its tokenizer; it is incomplete")
            return files[name]

        return Tokenizer.from_spec(saved.get("spec") or {}, read, where)

    @staticmethod
    def from_spec(spec: dict, read, where: str) -> Tokenizer:
        """The tokenizer a ``spec()`` describes, its model file (if any) from ``read(name) -> bytes``."""
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind == "char":
            if "symbols" not in spec:
                raise DataError(f"{where} is corrupt (a character tokenizer without its symbols)")
            return CharTokenizer(spec["symbols"], spec.get("unit", "char"), spec.get("eod_id"))
        if kind in ("sentencepiece", "huggingface"):
            data = read(spec.get("file", SPM_FILE if kind == "sentencepiece" else HF_FILE))
            cls = SentencePieceTokenizer if kind == "sentencepiece" else HFTokenizer
            return cls(data, eod_id=spec.get("eod_id"))
        raise DataError(f"{where} has unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")


class CharTokenizer(Tokenizer):
    """One id per character (unit 'char') or byte (unit 'byte'): id i is ``symbols[i]``, a code point or
    byte value (sorted ascending); ``eod_id`` (if set) is ``len(symbols)``, the last id."""

    kind = "char"

    def __init__(self, symbols: Sequence[int], unit: str = "char", eod_id: int | None = None):
        if unit not in ("char", "byte"):
            raise DataError(f"character tokenizer unit must be 'char' or 'byte', got {unit!r}")
        self.symbols = [int(s) for s in symbols]
        self.unit = unit
        if eod_id is not None and int(eod_id) != len(self.symbols):
            raise DataError(
                f"character tokenizer: the end-of-document id must be {len(self.symbols)} "
                f"(after the {len(self.symbols)} symbols), got {eod_id}"
            )
        self.eod_id = None if eod_id is None else int(eod_id)
        self.vocab_size = len(self.symbols) + (self.eod_id is not None)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self._lut = None

    def _units(self, text) -> np.ndarray:
        if isinstance(text, (bytes, bytearray)):
            return np.frombuffer(text, dtype=np.uint8).astype(np.uint32)
        if self.unit == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)

    def _unknown_error(self, units) -> DataError:
        unknown = sorted({chr(u) if self.unit == "char" else u for u in map(int, units) if u not in self.index})
        what = "character" if self.unit == "char" else "byte"
        n = len(unknown)
        return DataError(
            f"the text has {n} {what}{'s' if n > 1 else ''} outside the model's vocabulary (the {len(self.symbols)} "
            f"its training data held): {unknown[:10]}; give text made of those {what}s"
        )

    def encode(self, text: str) -> list[int]:
        units = text.encode("utf-8") if self.unit == "byte" else [ord(c) for c in text]
        if any(u not in self.index for u in units):
            raise self._unknown_error(units)
        return [self.index[u] for u in units]

    def encode_array(self, text, dtype=np.int64) -> np.ndarray:
        """Vectorised ``encode`` (a lookup table over code points); ``text`` may be ``bytes`` for unit 'byte'."""
        units = self._units(text)
        if self._lut is None:
            # every code point (byte value) -> its id, -1 outside the vocabulary: one gather per text
            self._lut = np.full(0x110000 if self.unit == "char" else 256, -1, dtype=np.int32)
            self._lut[np.asarray(self.symbols, dtype=np.int64)] = np.arange(len(self.symbols), dtype=np.int32)
        ids = self._lut[units]
        if len(ids) and ids.min() < 0:
            raise self._unknown_error(np.unique(units[ids < 0]))
        return ids.astype(dtype, copy=False)

    def encode_documents(self, texts: Sequence[str], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        """All documents in one lookup (one id per character, so the lengths are the texts' lengths)."""
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        if self.unit == "byte":
            return super().encode_documents(texts, dtype)
        return self.encode_array("".join(texts), dtype), lengths

    def id_table(self) -> list[str]:
        chars = byte_chars() if self.unit == "byte" else None
        table = [chars[s] if chars else chr(s) for s in self.symbols]
        return table + ([EOD_TOKEN] if self.eod_id is not None else [])

    def decode(self, ids) -> str:
        values = [self.symbols[int(i)] for i in ids if self.eod_id is None or int(i) != self.eod_id]
        if self.unit == "byte":
            return bytes(values).decode("utf-8", errors="replace")
        return "".join(map(chr, values))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.unit, self.symbols, self.eod_id]).encode()).hexdigest()

    def spec(self) -> dict:
        return {
            "kind": "char",
            "unit": self.unit,
            "symbols": self.symbols,
            "eod_id": self.eod_id,
            "vocab_size": self.vocab_size,
        }


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (the serialized ``.model`` bytes); the end-of-document id is the model's
    ``</s>`` (eos) piece unless another is named."""

    kind = "sentencepiece"
    file_label, file_kind = "SentencePiece model", ".model file"

    def __init__(self, model: bytes, eod_id: int | None = None):
        import sentencepiece as spm

        self.model = bytes(model)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        except (RuntimeError, OSError, TypeError) as e:
            raise DataError(
                f"not a valid SentencePiece model ({e}); give a .model file written by SentencePiece training"
            ) from None
        self.vocab_size = int(self.sp.get_piece_size())
        if eod_id is not None and not 0 <= int(eod_id) < self.vocab_size:
            raise DataError(f"SentencePiece end-of-document id {eod_id} is outside the vocabulary ({self.vocab_size})")
        self.eod_id = None if eod_id is None else int(eod_id)

    def find_eod(self, eod_token: str = "") -> int | None:
        """The id of piece ``eod_token``, or (``''``) the model's eos piece; None if it has none."""
        if eod_token:
            i = self.sp.piece_to_id(eod_token)
            if i == self.sp.unk_id() and eod_token != self.sp.id_to_piece(i):
                raise DataError(
                    f"data.eod_token {eod_token!r} is not a piece of the SentencePiece model; name one "
                    f"of its pieces (e.g. {self.sp.id_to_piece(min(2, self.vocab_size - 1))!r}), or "
                    f"set data.eod=false"
                )
            return int(i)
        eos = self.sp.eos_id()
        return int(eos) if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_array(self, text: str, dtype=np.int64) -> np.ndarray:
        """Line by line (line ends kept), as SentencePiece was trained."""
        out = [
            np.array(list(itertools.chain.from_iterable(self.sp.encode(piece.splitlines(keepends=True)))), dtype=dtype)
            for piece in split_pieces(text)
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=dtype)

    def id_table(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if self.eod_id is None or int(i) != self.eod_id])

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model).hexdigest()

    def spec(self) -> dict:
        return {"kind": "sentencepiece", "file": SPM_FILE, "eod_id": self.eod_id, "vocab_size": self.vocab_size}

    def model_files(self) -> dict:
        return {SPM_FILE: self.model}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (the ``tokenizer.json`` text). Encoding adds no special
    tokens (no BOS/CLS templates); the end-of-document id is the named token, else the first of
    ``HF_EOD_CANDIDATES`` in the vocabulary."""

    kind = "huggingface"
    file_label, file_kind = "tokenizer file", "Hugging Face tokenizer.json"

    def __init__(self, data: bytes | str, eod_id: int | None = None):
        self.data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            from tokenizers import Tokenizer as Backend  # a dependency of the package (requirements.txt)

            self.tok = Backend.from_str(self.data.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise DataError(
                f"not a valid Hugging Face tokenizer.json ({e}); give the tokenizer.json a "
                f"`tokenizers` tokenizer was saved to"
            ) from None
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        if eod_id is not None and not 0 <= int(eod_id) < self.vocab_size:
            raise DataError(f"tokenizer.json end-of-document id {eod_id} is outside the vocabulary ({self.vocab_size})")
        self.eod_id = None if eod_id is None else int(eod_id)

    def find_eod(self, eod_token: str = "") -> int | None:
        if eod_token:
            i = self.tok.token_to_id(eod_token)
            if i is None:
                raise DataError(
                    f"data.eod_token {eod_token!r} is not in the tokenizer.json vocabulary; name one of "
                    f"its tokens, or set data.eod=false"
                )
            return int(i)
        for name in HF_EOD_CANDIDATES:
            i = self.tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: Sequence[str], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tok.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter(
            itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype, count=int(lengths.sum())
        )
        return ids, lengths

    def id_table(self) -> list[str]:
        return [self.tok.id_to_token(i) for i in range(self.vocab_size)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if self.eod_id is None or int(i) != self.eod_id])

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def spec(self) -> dict:
        return {"kind": "huggingface", "file": HF_FILE, "eod_id": self.eod_id, "vocab_size": self.vocab_size}

    def model_files(self) -> dict:
        return {HF_FILE: self.data}
