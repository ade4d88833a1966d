"""Token ids to streamed text, with stop strings. Pure: no model, no I/O.

Text is re-decoded from all generated ids each time (BPE merges and multi-byte
characters make per-token decoding wrong) and released only when it is final: not
ending in an incomplete character, and not a possible start of a stop string.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TextStream:
    decode: Callable[[Sequence[int]], str]
    stop: Sequence[str] = ()
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already released
    stopped: bool = False

    def push(self, token_id: int) -> str:
        """Add one token; the text that is now safe to show (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._release(text, at)
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    safe = min(safe, len(text[:safe]) - k)
                    break
        return self._release(text, safe)

    def flush(self) -> str:
        """At the end: whatever is left (held-back text was not a stop string after all)."""
        if self.stopped:
            return ""
        return self._release(self.decode(self.ids), None)

    def text(self) -> str:
        full = self.decode(self.ids)
        return full[: self.emitted] if self.stopped else full

    def _release(self, text: str, upto: int | None) -> str:
        end = len(text) if upto is None else upto
        if end <= self.emitted:
            return ""
        out = text[self.emitted:end]
        self.emitted = end
        return out


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte
    (bytes that print stand for themselves; the rest are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_alphabet()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes one token stands for (a token may hold part of a UTF-8 character,
    which decoding it alone would turn into U+FFFD)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if piece and all(c in BYTE_LEVEL for c in piece) and _byte_level(tokenizer):
            return bytes(BYTE_LEVEL[c] for c in piece)
        if (m := _BYTE_TOKEN.fullmatch(piece)) is not None:
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece:  # SentencePiece's word-start mark: decoding alone drops it
            return piece.replace("\u2581", " ").encode()
    return str(tokenizer.decode([token_id])).encode()


def token_text(data: bytes) -> str:
    """A token's bytes as text; bytes of an unfinished character as \\xNN (as OpenAI
    shows them)."""
    return data.decode("utf-8", errors="backslashreplace")


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
