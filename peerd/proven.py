"""Peers proven to lie, kept across restarts: a proof bans the peer for `first_s`, a
second proof for `again_s`, and a restart within that time must not let it back.

- the inference entry's audits (`proven.json` in the data dir): a peer whose hidden
  states were proven wrong is routed around for the longest a failure's ban lasts (5
  minutes), proven wrong again for a day (swarm/audit.py);
- an RL trainer's checks (`rl/liars.json`): a sampler caught lying about its behaviour
  log-probs is asked by no run of this trainer for a day (rl/session.py).

`ProvenBook` is sans-I/O; the caller passes wall-clock time (a ban's end must mean the
same after a restart, which a monotonic clock does not). `ProofFile` keeps one in a
file. A proof is forgotten FORGET_S after the last one: a peer proven wrong once,
months ago (a faulty card since replaced, say), starts again from its first ban. At
most MAX_PROVEN peers are kept, those proven longest ago going first.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from peerd.datadir import keep_json, read_json

log = logging.getLogger(__name__)

PROVEN_FILE = "proven.json"
FIRST_BAN_S = 300.0  # proven wrong: the longest a pipeline failure's ban lasts (BanList)
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
    def __init__(self, proven: dict[str, Proof] | None = None, limit: int = MAX_PROVEN,
                 first_s: float = FIRST_BAN_S, again_s: float = AGAIN_BAN_S) -> None:
        self.proven: dict[str, Proof] = dict(proven or {})
        self.limit = limit
        self.first_s, self.again_s = first_s, again_s

    def prove(self, peer: str, now: float, why: str) -> float:
        """`peer` was proven wrong now: the seconds it is banned for."""
        self._forget(now)
        before = self.proven.pop(peer, None)  # (re-inserted last: the newest)
        proofs = (before.proofs if before else 0) + 1
        seconds = self.again_s if proofs > 1 else self.first_s
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
    def from_json(cls, data: Any, now: float, **kw: Any) -> ProvenBook:
        """The book `to_json` wrote (`kw`: the book's settings); rows that are not a
        proof (a hand-edited or damaged file) are left out and logged, the others kept;
        proofs forgotten by `now` too."""
        rows = data.get("proven") if isinstance(data, dict) else None
        book = cls(**kw)
        if not isinstance(rows, dict):
            if data is not None:
                log.warning("not a record of proofs; starting a new one")
            return book
        for peer, row in rows.items():
            proof = _proof(row, now, max(book.first_s, book.again_s))
            if proof is None or not peer:
                log.warning("a record of proofs: left out %r (not a proof)", peer)
                continue
            book.proven[peer] = proof
        book._forget(now)
        while len(book.proven) > book.limit:
            del book.proven[min(book.proven, key=lambda p: book.proven[p].last)]
        return book


def _finite(x: Any) -> float | None:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def _proof(row: Any, now: float, longest_s: float) -> Proof | None:
    """A row of the file as a Proof; None when it is not one. Its times are taken no
    later than now (a proof cannot be from the future) and its ban no longer than
    `longest_s` from then, whatever the file says."""
    if not isinstance(row, dict):
        return None
    proofs, why = row.get("proofs"), row.get("why")
    last, until = _finite(row.get("last")), _finite(row.get("until"))
    if (type(proofs) is not int or proofs < 1 or not isinstance(why, str)
            or last is None or until is None):
        return None
    last = min(last, now)
    return Proof(proofs, last, min(until, last + longest_s), why[:300])


def load(path: Path, now: float, **kw: Any) -> ProvenBook:
    """The book kept at `path` (`kw`: its settings); empty when there is none, or it
    cannot be read."""
    data = read_json(path)
    if data is None and path.exists():
        log.warning("could not read %s; starting a new record of proofs", path)
    return ProvenBook.from_json(data, now, **kw)


def save(path: Path, data: dict[str, Any]) -> None:
    """A book's `to_json` written whole or not at all (one writer at a time: the file's
    temporary copy has one name); a disk error is logged, never raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)
        return
    keep_json(path, data)


class ProofFile:
    """A book and the file it is kept in: read at once, written whole after a change,
    one writer at a time, of the book as it is then."""

    def __init__(self, path: Path, **kw: Any) -> None:
        self.path = path
        self.book = load(path, time.time(), **kw)
        self._saving = trio.Lock()

    async def save(self) -> None:
        async with self._saving:
            await trio.to_thread.run_sync(save, self.path, self.book.to_json())
