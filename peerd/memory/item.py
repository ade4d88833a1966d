"""A memory item, signed by its author, and what this peer measured about it.

`MemoryItem` is the verified content of a `protocols.memory.SignedItem`: its id is the
SHA-256 of the signed bytes. `ItemStats` is local: the utility weight this peer's own
replays and uses gave the item, never taken from another peer. `Record` is the two
together, as the store keeps them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from libp2p.crypto.keys import PrivateKey

from peerd.agents.sealing import seal, unseal
from protocols.errors import PeerError
from protocols.memory import MemoryItemMsg, SignedItem


@dataclass(frozen=True, slots=True)
class MemoryItem:
    id: str  # sha256 hex of the signed body
    text: str
    domain: str
    kind: str
    author: str
    origin: str  # SCEC hash or ""
    parent: str  # item id or ""
    created: float


@dataclass(frozen=True, slots=True)
class ItemStats:
    """What this peer measured about an item. Utilities are in score units (a score is
    in [0, 1]) less the latency and prompt-token charges of the admission rule."""

    weight: float  # the utility weight retrieval multiplies similarity by
    admitted_utility: float  # what the admission replay measured; the weight's prior
    uses: int = 0  # scored runs it was given to
    delta_sum: float = 0.0  # sum over those uses of (score - the no-memory baseline)
    last_used: float = 0.0  # unix seconds; the admission time until its first use
    admitted_at: float = 0.0
    source: str = "local"  # "local", or the peer id it was fetched from

    def used(self, delta: float, weight: float, now: float) -> ItemStats:
        return replace(self, uses=self.uses + 1, delta_sum=self.delta_sum + delta,
                       weight=weight, last_used=now)


@dataclass(frozen=True, slots=True)
class Record:
    item: MemoryItem
    signed: SignedItem
    stats: ItemStats


def sign_item(key: PrivateKey, author: str, text: str, domain: str, kind: str, *,
              origin: str = "", parent: str = "", created: float | None = None
              ) -> tuple[MemoryItem, SignedItem]:
    """A new item by this peer. Raises WireError when a field is out of bounds (the
    caller's input: say so to the user)."""
    msg = MemoryItemMsg(text=text, domain=domain, kind=kind, author=author, origin=origin,
                        parent=parent, created=time.time() if created is None else created)
    msg.check()
    body, sig = seal(msg, key)
    signed = SignedItem(body=body, sig=sig)
    return to_item(signed.item_id, msg), signed


def verify_item(signed: SignedItem, *, item_id: str | None = None,
                author: str | None = None) -> MemoryItem:
    """The item in `signed` once its size, signature and fields check; with `item_id` /
    `author`, also that it is the item announced under that id, by that peer. Raises
    PeerError (a WireError for a malformed one)."""
    signed.check()
    msg = unseal(signed.body, signed.sig, MemoryItemMsg, lambda m: m.author)
    msg.check()
    if item_id is not None and signed.item_id != item_id:
        raise PeerError(f"item {item_id[:12]} came with another body", reason="tampered")
    if author is not None and msg.author != author:
        raise PeerError(f"an item by {msg.author:.20} announced as {author:.20}'s",
                        reason="impersonation")
    return to_item(signed.item_id, msg)


def to_item(item_id: str, msg: MemoryItemMsg) -> MemoryItem:
    return MemoryItem(id=item_id, text=msg.text, domain=msg.domain, kind=msg.kind,
                      author=msg.author, origin=msg.origin, parent=msg.parent,
                      created=msg.created)
