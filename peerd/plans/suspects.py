"""Peers that failed as unreachable or silent, remembered across batches for a while:
a pure rule, the clock handed in.

A batch passes over the peers it suspects (retry.candidates); a peer that died in one
batch would be tried again by the next as if nothing had happened. So a peer whose
attempt ended `unreachable` (no stream, or its connection closed mid-call) or `timeout`
(silent past the deadline and its margin) is suspected for `hold_s`: its offers rank
after every other peer's with a free slot (choice.rank), never excluded, since it may be
the only one offering a tool. The suspicion ends early when the peer shows it is back:
it connects again after it failed (Tools hears the node's connection; the hook of an
older connection, run late, says nothing), or we hold a ledger entry of it signed after
it failed (only the peer itself can sign one; an entry it signed before it died, heard
late, says nothing). Signed "after" is by the peer's clock against ours: a clock behind
ours delays the news until the next connection or the hold's end, one ahead (the book
takes at most a minute) may let an old entry clear it; either costs at most `hold_s`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.plans.caller import TIMEOUT, UNREACHABLE

# How long a peer that failed as unreachable or silent ranks last (s). 30 s: about a
# ledger entry's lifetime (3 heartbeats of 10 s), so a dead peer is ranked last until
# its entry expires; a live one clears it with its next entry (every heartbeat).
SUSPECT_S = 30.0
SUSPECTED_ON = frozenset({UNREACHABLE, TIMEOUT})  # what says the peer is not there
MAX_SUSPECTS = 4096  # remembered at once; the oldest forgotten first


@dataclass(frozen=True, slots=True)
class _Mark:
    at: float  # the clock's time the peer failed
    until: float  # the clock's time the suspicion ends
    wall: float  # unix time it failed: an entry signed later says it is back


class Suspects:
    def __init__(self, hold_s: float = SUSPECT_S) -> None:
        if not hold_s >= 0:
            raise ValueError(f"a suspicion of {hold_s} s")
        self.hold_s = hold_s
        self._marks: dict[str, _Mark] = {}

    def failed(self, peer: str, code: str, now: float, wall: float) -> bool:
        """An attempt at `peer` ended `code` at `now` (the clock's time; `wall`: unix
        time); suspect it if that says it is not there. True when it is suspected."""
        if code not in SUSPECTED_ON or self.hold_s == 0:
            return False
        self._marks.pop(peer, None)  # re-inserted: the newest last
        if len(self._marks) >= MAX_SUSPECTS:
            del self._marks[next(iter(self._marks))]
        self._marks[peer] = _Mark(now, now + self.hold_s, wall)
        return True

    def clear(self, peer: str, connected_at: float) -> None:
        """`peer` connected at `connected_at` (the clock's time): back, if that was after
        it failed."""
        mark = self._marks.get(peer)
        if mark is not None and connected_at > mark.at:
            del self._marks[peer]

    def suspected(self, peer: str, signed_at: float, now: float) -> bool:
        """Whether `peer`, whose ledger entry we hold was signed at `signed_at` (its
        timestamp, unix time), is still suspected."""
        mark = self._marks.get(peer)
        if mark is None:
            return False
        if now >= mark.until or signed_at > mark.wall:
            del self._marks[peer]
            return False
        return True
