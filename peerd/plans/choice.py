"""Which peer runs a call, when the caller names none: a pure rule.

An offer is a peer's tool as its ledger entry lists it, with what the caller knows of
the peer now: how many of its own calls to that tool are in flight there (`load`), and
the measured round trip, and its reputation (Symphony's view, agents/reputation.py:
PRIOR when nobody has scored it). Peers with a free slot (capacity minus load) come
first; among them a peer not suspected before a suspected one (it failed as
unreachable or silent lately: suspects.py), then a peer in good standing before a
distrusted one (reputation below DISTRUSTED), then the nearest (ourselves at 0 ms; a
peer never measured after every measured one), then the freest, then the better
reputed; the peer id breaks ties, so the rule is deterministic. Reputation is a band,
not a weight: RTT is measured to the millisecond and would drown any weight, and a tool
call is judged by its schema, not by a vote, so only a peer the swarm has caught
failing is passed over.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from peerd.agents.reputation import PRIOR

DISTRUSTED = 0.3  # below it a peer ranks after every peer in good standing


@dataclass(frozen=True, slots=True)
class Offer:
    peer: str
    schema: str  # the tool's schema hash at that peer
    capacity: int
    load: int = 0  # our calls in flight to it
    rtt_ms: float | None = None  # None: not measured
    reputation: float = PRIOR  # our view of the peer, in [0, 1]
    suspect: bool = False  # failed as unreachable or silent lately (suspects.py)

    @property
    def free(self) -> int:
        return self.capacity - self.load


def rank(offers: Iterable[Offer]) -> list[Offer]:
    """Best first."""
    def key(o: Offer) -> tuple[bool, bool, bool, float, int, float, str]:
        return (o.free <= 0, o.suspect, o.reputation < DISTRUSTED,
                math.inf if o.rtt_ms is None else o.rtt_ms, -o.free, -o.reputation, o.peer)

    return sorted(offers, key=key)
