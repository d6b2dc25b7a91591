"""Text helpers the tokenizers share: long texts cut at line ends, and the byte-to-character table of
``ByteLevel`` (how a byte-level vocabulary's tokens are written as text)."""

from __future__ import annotations


def split_pieces(text: str, max_chars: int = 1 << 20) -> list[str]:
    """``text`` cut into pieces of about ``max_chars`` characters, each ending at a line end (a line
    longer than that stays whole), so encoding piece by piece matches encoding line by line."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = start + max_chars
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl < start:
                nl = text.find("\n", end)
            end = len(text) if nl < 0 else nl + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def byte_chars() -> dict[int, str]:
    """The character ``ByteLevel`` stands each byte for (GPT-2's table): printable bytes stand for
    themselves, the other bytes, in order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
