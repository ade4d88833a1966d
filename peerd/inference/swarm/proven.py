"""The peers an entry's audits proved wrong, kept across restarts (`proven.json` in the
data dir): a peer proven wrong is routed around at once for the longest a failure's ban
lasts, and a peer proven wrong again for a day; a restart of the entry within that day
must not let it back. Sans-I/O but for `load` and `save`; the caller passes wall-clock
time (a ban's end must mean the same after a restart, which a monotonic clock does not).

A proof is forgotten FORGET_S after the last one: a peer proven wrong once, months ago
(a faulty card since replaced, say), starts again from its first ban. At most
MAX_PROVEN peers are kept, those proven longest ago going first.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerd.datadir import keep_json, read_json
from peerd.inference.swarm.routing import BanList

log = logging.getLogger(__name__)

PROVEN_FILE = "proven.json"
FIRST_BAN_S = BanList.max_s  # proven wrong: the longest a failure's ban lasts
AGAIN_BAN_S = 24 * 3600.0  # proven wrong again: a day
FORGET_S = 30 * 24 * 3600.0
MAX_PROVEN = 1024


@dataclass(frozen=True, slots=True)
class Proof:
    proofs: int  # times proven wrong, FORGET_S apart at most
    last: float  # wall-clock time of the last proof
    until: float  # wall-clock time its ban ends
    why: str


class ProvenBook:
    def __init__(self, proven: dict[str, Proof] | None = None, limit: int = MAX_PROVEN) -> None:
        self.proven: dict[str, Proof] = dict(proven or {})
        self.limit = limit

    def prove(self, peer: str, now: float, why: str) -> float:
        """`peer` was proven wrong now: the seconds it is banned for."""
        self._forget(now)
        before = self.proven.pop(peer, None)  # (re-inserted last: the newest)
        proofs = (before.proofs if before else 0) + 1
        seconds = AGAIN_BAN_S if proofs > 1 else FIRST_BAN_S
        self.proven[peer] = Proof(proofs, now, now + seconds, why[:300])
        while len(self.proven) > self.limit:
            del self.proven[min(self.proven, key=lambda p: self.proven[p].last)]
        return seconds

    def forget(self, peer: str) -> int:
        """An operator forgave `peer`: its proofs forgotten; how many there were."""
        proof = self.proven.pop(peer, None)
        return proof.proofs if proof else 0

    def proofs(self, peer: str) -> int:
        proof = self.proven.get(peer)
        return proof.proofs if proof else 0

    def banned(self, now: float) -> dict[str, tuple[float, str]]:
        """The peers whose ban has not ended: the seconds left, and why."""
        return {p: (b.until - now, b.why) for p, b in self.proven.items() if b.until > now}

    def _forget(self, now: float) -> None:
        for peer in [p for p, b in self.proven.items() if b.last + FORGET_S <= now]:
            del self.proven[peer]

    def to_json(self) -> dict[str, Any]:
        return {"proven": {p: {"proofs": b.proofs, "last": b.last, "until": b.until,
                               "why": b.why} for p, b in self.proven.items()}}

    @classmethod
    def from_json(cls, data: Any, now: float) -> ProvenBook:
        """The book `to_json` wrote; rows that are not a proof (a hand-edited or damaged
        file) are left out and logged, the others kept; proofs forgotten by `now` too."""
        rows = data.get("proven") if isinstance(data, dict) else None
        book = cls()
        if not isinstance(rows, dict):
            if data is not None:
                log.warning("%s is not a record of proofs; starting a new one", PROVEN_FILE)
            return book
        for peer, row in rows.items():
            proof = _proof(row, now)
            if proof is None or not peer:
                log.warning("%s: left out %r (not a proof)", PROVEN_FILE, peer)
                continue
            book.proven[peer] = proof
        book._forget(now)
        while len(book.proven) > book.limit:
            del book.proven[min(book.proven, key=lambda p: book.proven[p].last)]
        return book


def _finite(x: Any) -> float | None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def _proof(row: Any, now: float) -> Proof | None:
    """A row of the file as a Proof; None when it is not one. Its times are taken no
    later than now (a proof cannot be from the future) and its ban no longer than a day
    from then, whatever the file says."""
    if not isinstance(row, dict):
        return None
    proofs, why = row.get("proofs"), row.get("why")
    last, until = _finite(row.get("last")), _finite(row.get("until"))
    if (type(proofs) is not int or proofs < 1 or not isinstance(why, str)
            or last is None or until is None):
        return None
    last = min(last, now)
    return Proof(proofs, last, min(until, last + AGAIN_BAN_S), why[:300])


def load(data_dir: Path, now: float) -> ProvenBook:
    """The data dir's book (empty when there is none, or it cannot be read)."""
    path = data_dir / PROVEN_FILE
    data = read_json(path)
    if data is None and path.exists():
        log.warning("could not read %s; starting a new record of proofs", path)
    return ProvenBook.from_json(data, now)


def save(data_dir: Path, data: dict[str, Any]) -> None:
    """A book's `to_json` written whole or not at all (one writer at a time: the file's
    temporary copy has one name); a disk error is logged, never raised."""
    keep_json(data_dir / PROVEN_FILE, data)
