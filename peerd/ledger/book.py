"""The capability ledger's book: verify, merge, expire, query.

`Ledger` is sans-I/O: it is handed signed entries and the current time and answers
accept or reject-with-reason. The gossip service (gossip.py) feeds it from gossip and
sync; `LedgerStore` (store.py) persists it in SQLite so a restarted peer starts warm.

Rules:
- the signature must verify against the public key embedded in the entry's peer id;
- last writer wins per peer, by seq: a lower seq is a replay (refused, counted);
  the same seq again is a harmless duplicate (gossip and sync overlap);
- an entry is void after `timestamp + ttl_s`; an expired entry is refused and
  live entries are dropped when they pass it;
- a timestamp further than MAX_CLOCK_SKEW_S in the future is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from protocols.codec import decode, encode
from protocols.errors import PeerError, WireError
from protocols.ledger import (
    MAX_CLOCK_SKEW_S,
    MAX_ENTRY_BYTES,
    MAX_TTL_S,
    MIN_TTL_S,
    LedgerEntry,
    SignedEntry,
)


class LedgerReject(PeerError):
    """An entry refused by the ledger rules; `reason` labels the metric."""


@dataclass(frozen=True, slots=True)
class Accepted:
    entry: LedgerEntry
    signed: SignedEntry
    previous: LedgerEntry | None


@dataclass(frozen=True, slots=True)
class Duplicate:
    entry: LedgerEntry


Outcome = Accepted | Duplicate


@dataclass(slots=True)
class _Held:
    entry: LedgerEntry
    signed: SignedEntry
    received_at: float


def sign_entry(entry: LedgerEntry, key: PrivateKey) -> SignedEntry:
    body = encode(entry)
    if len(body) > MAX_ENTRY_BYTES:
        raise ValueError(f"our own ledger entry is {len(body)} bytes, over {MAX_ENTRY_BYTES}")
    return SignedEntry(body=body, sig=key.sign(body))


def verify_entry(signed: SignedEntry) -> LedgerEntry:
    """Decode and authenticate a signed entry. Raises LedgerReject."""
    if len(signed.body) > MAX_ENTRY_BYTES:
        raise LedgerReject(f"entry of {len(signed.body)} bytes is too large", reason="oversized")
    try:
        entry = decode(signed.body, LedgerEntry)
    except WireError as exc:
        raise LedgerReject(f"entry does not decode: {exc}", reason="malformed") from None
    try:
        pub = ID.from_base58(entry.peer_id).extract_public_key()
    except Exception:
        pub = None
    if pub is None:
        raise LedgerReject(f"peer id {entry.peer_id!r:.60} embeds no public key",
                           reason="bad_peer_id")
    try:
        ok = pub.verify(signed.body, signed.sig)
    except Exception:
        ok = False
    if not ok:
        raise LedgerReject(f"bad signature on entry of {entry.peer_id}", reason="bad_signature")
    if not (MIN_TTL_S <= entry.ttl_s <= MAX_TTL_S) or not math.isfinite(entry.timestamp):
        raise LedgerReject(f"entry of {entry.peer_id}: ttl {entry.ttl_s} out of range",
                           reason="malformed")
    if entry.seq < 0:
        raise LedgerReject(f"entry of {entry.peer_id}: negative seq", reason="malformed")
    return entry


class Ledger:
    """Live, verified entries by peer id (our own included)."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._held

    def offer(self, signed: SignedEntry, now: float) -> Outcome:
        """Verify and merge one entry. Raises LedgerReject with the reason."""
        entry = verify_entry(signed)
        if entry.timestamp > now + MAX_CLOCK_SKEW_S:
            raise LedgerReject(
                f"entry of {entry.peer_id} is dated {entry.timestamp - now:.0f} s in the future",
                reason="future_timestamp",
            )
        held = self._held.get(entry.peer_id)
        if held is not None:
            if entry.seq == held.entry.seq:
                if signed.body == held.signed.body:
                    return Duplicate(entry)
                raise LedgerReject(f"two different entries of {entry.peer_id} with seq "
                                   f"{entry.seq}", reason="equivocation")
            if entry.seq < held.entry.seq:
                raise LedgerReject(f"entry of {entry.peer_id} has seq {entry.seq} older than "
                                   f"{held.entry.seq}", reason="stale_seq")
        if entry.expires_at <= now:
            raise LedgerReject(f"entry of {entry.peer_id} expired {now - entry.expires_at:.1f} s"
                               " ago", reason="expired")
        self._held[entry.peer_id] = _Held(entry, signed, now)
        return Accepted(entry, signed, held.entry if held else None)

    def expire(self, now: float) -> list[LedgerEntry]:
        gone = [h.entry for h in self._held.values() if h.entry.expires_at <= now]
        for e in gone:
            del self._held[e.peer_id]
        return gone

    def remove(self, peer_id: str) -> None:
        self._held.pop(peer_id, None)

    def get(self, peer_id: str) -> LedgerEntry | None:
        held = self._held.get(peer_id)
        return held.entry if held else None

    def signed(self, peer_id: str) -> SignedEntry | None:
        held = self._held.get(peer_id)
        return held.signed if held else None

    def received_at(self, peer_id: str) -> float | None:
        held = self._held.get(peer_id)
        return held.received_at if held else None

    def entries(self) -> list[LedgerEntry]:
        return sorted((h.entry for h in self._held.values()), key=lambda e: e.peer_id)

    def signed_entries(self) -> list[SignedEntry]:
        return [self._held[k].signed for k in sorted(self._held)]
