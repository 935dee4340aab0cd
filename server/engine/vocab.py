"""The served vocabulary's per-token text and bytes, computed once at start-up.

Logprob responses name every token twice: ``token`` (its text) and ``bytes``
(its raw UTF-8 bytes). The bytes exist so a client can rebuild a character
that the tokenizer split across tokens; decoding such a token alone gives
U+FFFD, so the bytes come from the tokenizer's own byte mapping instead:

* byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): the token string maps back
  to bytes through the GPT-2 byte-to-unicode table;
* byte fallback (SentencePiece, Llama 2): ``<0xAB>`` tokens are one byte,
  ``▁`` is a space;
* anything else: the decoded text's UTF-8.

The tables are immutable, so any thread may read them (the event loop does,
while formatting responses), unlike the tokenizer itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's reversible byte -> printable-unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@dataclass(frozen=True)
class Vocabulary:
    texts: tuple[str, ...]
    raw: tuple[bytes, ...]

    def text(self, token_id: int) -> str:
        return self.texts[token_id] if 0 <= token_id < len(self.texts) else ""

    def bytes(self, token_id: int) -> bytes:
        return self.raw[token_id] if 0 <= token_id < len(self.raw) else b""


def build_vocabulary(tokenizer) -> Vocabulary:
    ids = list(range(len(tokenizer)))
    texts = tuple(tokenizer.batch_decode([[i] for i in ids]))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(getattr(tokenizer, "all_special_ids", ())) | set(
        getattr(tokenizer, "added_tokens_decoder", {}) or {}
    )
    decoder = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)).__name__
    byte_level = decoder == "ByteLevel"
    unicode_to_byte = _gpt2_unicode_to_byte() if byte_level else {}

    def raw(token_id: int, piece: str | None, text: str) -> bytes:
        if piece is None or token_id in special:
            return text.encode("utf-8")
        if byte_level and all(c in unicode_to_byte for c in piece):
            return bytes(unicode_to_byte[c] for c in piece)
        if match := _BYTE_FALLBACK.match(piece):
            return bytes([int(match.group(1), 16)])
        if "▁" in piece:
            return piece.replace("▁", " ").encode("utf-8")
        return text.encode("utf-8")

    return Vocabulary(
        texts=texts,
        raw=tuple(raw(i, piece, text) for i, piece, text in zip(ids, pieces, texts, strict=True)),
    )
