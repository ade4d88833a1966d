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
- a timestamp further than MAX_CLOCK_SKEW_S in the future is refused;
- the book holds at most `max_entries` entries and `max_bytes` of signed bodies (peer
  ids cost nothing to make). An entry of a new peer that does not fit evicts the
  entries heard from least recently, except those the caller keeps (`keep`: ourselves
  and the peers we are connected to, whose existence a live connection proves); when
  only kept entries are left, it is refused ("book_full", not an offence: the sender
  may be honest).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass

from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from protocols.codec import decode, encode
from protocols.errors import PeerError, WireError
from protocols.ledger import (
    MAX_BOOK_BYTES,
    MAX_BOOK_ENTRIES,
    MAX_CLOCK_SKEW_S,
    MAX_ENTRY_BYTES,
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
    evicted: tuple[LedgerEntry, ...] = ()  # made room for it (a new peer, a full book)


@dataclass(frozen=True, slots=True)
class Duplicate:
    entry: LedgerEntry


Outcome = Accepted | Duplicate


@dataclass(slots=True)
class _Held:
    entry: LedgerEntry
    signed: SignedEntry
    received_at: float


class EntryTooLarge(ValueError):
    """Our own entry would be over MAX_ENTRY_BYTES: no peer would take it."""


def sign_entry(entry: LedgerEntry, key: PrivateKey) -> SignedEntry:
    body = encode(entry)
    if len(body) > MAX_ENTRY_BYTES:
        raise EntryTooLarge(f"our own ledger entry is {len(body)} bytes, over "
                            f"{MAX_ENTRY_BYTES}")
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
    try:
        entry.check()
    except WireError as exc:
        raise LedgerReject(str(exc), reason="malformed") from None
    return entry


class Ledger:
    """Live, verified entries by peer id (our own included), at most `max_entries` of
    them and `max_bytes` of signed bodies."""

    def __init__(self, max_entries: int = MAX_BOOK_ENTRIES,
                 max_bytes: int = MAX_BOOK_BYTES) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        # least recently heard from first: an accepted newer entry moves to the end
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._held

    def offer(self, signed: SignedEntry, now: float, keep: Container[str] = ()) -> Outcome:
        """Verify and merge one entry; an entry of a new peer may evict others, never
        those in `keep` (see the module's rules). Raises LedgerReject with the reason."""
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
        grows = len(signed.body) - (len(held.signed.body) if held else 0)
        victims = self._room(entry.peer_id, held is None, grows, keep)
        if victims is None:
            raise LedgerReject(f"the book is full ({len(self)} entries, {self._bytes} bytes) "
                               f"of peers we keep; {entry.peer_id} left out", reason="book_full")
        evicted = tuple(self._drop(pid).entry for pid in victims)
        if held is not None:
            self._drop(entry.peer_id)
        self._held[entry.peer_id] = _Held(entry, signed, now)
        self._bytes += len(signed.body)
        return Accepted(entry, signed, held.entry if held else None, evicted)

    def has_room(self, peer_id: str, size: int, keep: Container[str] = ()) -> bool:
        """Whether an entry of `size` bytes by `peer_id` would fit (evicting what `offer`
        would evict)."""
        held = self._held.get(peer_id)
        grows = size - (len(held.signed.body) if held else 0)
        return self._room(peer_id, held is None, grows, keep) is not None

    def _room(self, peer_id: str, new: bool, grows: int, keep: Container[str]
              ) -> list[str] | None:
        """The peers to evict, least recently heard from first, so that an entry of
        `peer_id` (`new` to the book, `grows` bytes more than its old one) fits; None
        when it cannot fit without evicting a kept one."""
        count, size = len(self._held) + new, self._bytes + grows
        victims: list[str] = []
        for pid in self._held:
            if count <= self.max_entries and size <= self.max_bytes:
                break
            if pid == peer_id or pid in keep:
                continue
            victims.append(pid)
            count -= 1
            size -= len(self._held[pid].signed.body)
        return victims if count <= self.max_entries and size <= self.max_bytes else None

    def _drop(self, peer_id: str) -> _Held:
        held = self._held.pop(peer_id)
        self._bytes -= len(held.signed.body)
        return held

    def expire(self, now: float) -> list[LedgerEntry]:
        gone = [h.entry for h in self._held.values() if h.entry.expires_at <= now]
        for e in gone:
            self._drop(e.peer_id)
        return gone

    def remove(self, peer_id: str) -> None:
        if peer_id in self._held:
            self._drop(peer_id)

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
