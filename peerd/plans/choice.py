"""Which peer runs a call, when the caller names none: a pure rule.

An offer is a peer's tool as its ledger entry lists it, with what the caller knows of
the peer now: how many of its own calls to that tool are in flight there (`load`), and
the measured round trip. Peers with a free slot (capacity minus load) come first; among
them the nearest (ourselves at 0 ms; a peer never measured after every measured one),
then the freest; the peer id breaks ties, so the rule is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Offer:
    peer: str
    schema: str  # the tool's schema hash at that peer
    capacity: int
    load: int = 0  # our calls in flight to it
    rtt_ms: float | None = None  # None: not measured

    @property
    def free(self) -> int:
        return self.capacity - self.load


def rank(offers: Iterable[Offer]) -> list[Offer]:
    """Best first."""
    def key(o: Offer) -> tuple[bool, float, int, str]:
        return (o.free <= 0, math.inf if o.rtt_ms is None else o.rtt_ms, -o.free, o.peer)

    return sorted(offers, key=key)
