"""SEDM's memory items on the wire.

A memory item is a short text (a worked example, a rule, a correction, an insight)
with its domain, kind and provenance: the peer that wrote it, the execution context
(SCEC) it was distilled from, and the item it was abstracted from. Items are kept and
re-served by other peers, so each is signed by its author over its canonical bytes
(`SignedItem`), like ledger entries and rollouts; an item's id is the SHA-256 of those
bytes, so a tampered item is another item and an announced id checks a fetched body.

What a peer measured about an item (its utility weight, uses) is local, never signed
and never trusted from another peer: a receiver admits an item only by its own replay.

This module holds the item; the gossip announcement and `/peerd/memory/1.0.0` (fetch
items, search a peer's memory) are declared beside it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from protocols.codec import Message
from protocols.errors import WireError

KINDS = ("example", "rule", "correction", "insight")
DOMAIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")  # "arithmetic", "gsm8k", "chat", "general"
ITEM_ID = re.compile(r"[0-9a-f]{64}")  # sha256 hex of a SignedItem's body
SCEC_HASH = ITEM_ID  # sha256 hex of an SCEC's canonical bytes
MAX_TEXT_CHARS = 4_000
MAX_PEER_ID_CHARS = 128
MAX_SIGNATURE_BYTES = 128
MAX_ITEM_BYTES = MAX_TEXT_CHARS * 4 + 1_024  # UTF-8 text plus the other fields


def check_domain(domain: str) -> None:
    if not DOMAIN.fullmatch(domain):
        raise WireError(f"domain {domain!r:.40}: 1-32 of a-z 0-9 . _ -, starting with a "
                        "letter or digit")


@dataclass(frozen=True, slots=True)
class MemoryItemMsg(Message):
    """One item as its author signs it."""

    KIND = "memory.item"
    text: str
    domain: str
    kind: str  # one of KINDS
    author: str  # the author's peer id: the signer
    origin: str  # the SCEC hash it was distilled from, or ""
    parent: str  # the id of the item it was abstracted from, or ""
    created: float  # unix seconds, as the author's clock said

    def check(self) -> None:
        if not self.text.strip():
            raise WireError("item text empty")
        if len(self.text) > MAX_TEXT_CHARS:
            raise WireError(f"item text of {len(self.text)} characters "
                            f"(at most {MAX_TEXT_CHARS})", reason="oversized")
        check_domain(self.domain)
        if self.kind not in KINDS:
            raise WireError(f"item kind {self.kind!r:.20} not one of {', '.join(KINDS)}")
        if not 0 < len(self.author) <= MAX_PEER_ID_CHARS:
            raise WireError("item author empty or too long")
        if self.origin and not SCEC_HASH.fullmatch(self.origin):
            raise WireError("item origin is not an SCEC hash")
        if self.parent and not ITEM_ID.fullmatch(self.parent):
            raise WireError("item parent is not an item id")
        if not (math.isfinite(self.created) and self.created >= 0):
            raise WireError("item creation time is not a time")


@dataclass(frozen=True, slots=True)
class SignedItem(Message):
    KIND = "memory.signed"
    body: bytes  # canonical msgpack of a MemoryItemMsg
    sig: bytes  # the author's ed25519 signature over body

    @property
    def item_id(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def check(self) -> None:
        if len(self.body) > MAX_ITEM_BYTES or len(self.sig) > MAX_SIGNATURE_BYTES:
            raise WireError(f"a signed item of {len(self.body)} + {len(self.sig)} bytes",
                            reason="oversized")
