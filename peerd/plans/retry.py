"""The dispatcher's rules, without I/O: which failures are retried, how long to wait
before the next attempt, which peer it goes to, and the caller's own count of its calls
in flight at each peer (so a peer's declared capacity is never exceeded from here).

- Retried: what says nothing about the call itself, only about the peer or the moment:
  `busy`, `deadline` (the callee's word), `unreachable`, `timeout`, `refused`,
  `malformed`, `forged` (what we saw). Everything else is a verdict on the call (unknown
  tool, schema mismatch, invalid arguments, a tool's error, an invalid or oversized
  result): it is the observation, and another peer would say the same.
- Backoff: exponential with full jitter, before attempt n >= 2:
  delay = uniform(0, min(cap_s, base_s * 2 ** (n - 2))) (AWS's "full jitter": retries of
  many calls spread out instead of arriving together).
- The next peer: among the offers of the tool, those not tried for this call and not
  suspected in this batch (a peer that was unreachable, silent, or lied), else those not
  suspected, else all of them; of these, the ones with a free slot here, ranked by
  `choice.rank`. None free: the attempt waits for a slot (a call is queued here, never
  sent beyond capacity).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from peerd.plans.caller import FORGED, MALFORMED, REFUSED, TIMEOUT, UNREACHABLE
from peerd.plans.choice import Offer, rank
from protocols import tool as wire

RETRIED = frozenset({wire.BUSY, wire.DEADLINE, UNREACHABLE, TIMEOUT, REFUSED, MALFORMED,
                     FORGED})
SUSPECT = frozenset({UNREACHABLE, TIMEOUT, REFUSED, MALFORMED, FORGED})  # the peer, not the moment
NO_OFFER = "no_offer"  # nobody offers the tool: the call is never sent


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3  # attempts of one call, the first included
    attempt_deadline_s: float = 30.0  # the tool's time on each attempt
    base_s: float = 0.1  # the first backoff's upper bound
    cap_s: float = 2.0  # no backoff waits longer

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 10:
            raise ValueError(f"max_attempts {self.max_attempts} outside 1..10")
        if not (math.isfinite(self.attempt_deadline_s)
                and 0 < self.attempt_deadline_s <= wire.MAX_DEADLINE_S):
            raise ValueError(f"deadline {self.attempt_deadline_s} s outside "
                             f"(0, {wire.MAX_DEADLINE_S:g}]")
        if not 0 <= self.base_s <= self.cap_s:
            raise ValueError("backoff must have 0 <= base_s <= cap_s")


DEFAULT_POLICY = RetryPolicy()


def retried(code: str) -> bool:
    return code in RETRIED


def backoff_s(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """The wait before attempt `attempt` (1-based): none before the first."""
    if attempt <= 1:
        return 0.0
    return rng.uniform(0.0, min(policy.cap_s, policy.base_s * 2 ** (attempt - 2)))


class Slots:
    """Our calls in flight, by (peer, tool). `try_take` never exceeds the capacity it
    is given; `take` (a call that named its peer) counts without a limit. `peak` keeps
    the most ever held at each (peer, tool), for the tests."""

    def __init__(self) -> None:
        self.load: Counter[tuple[str, str]] = Counter()
        self.peak: Counter[tuple[str, str]] = Counter()

    def try_take(self, peer: str, tool: str, capacity: int) -> bool:
        if self.load[(peer, tool)] >= capacity:
            return False
        self.take(peer, tool)
        return True

    def take(self, peer: str, tool: str) -> None:
        key = (peer, tool)
        self.load[key] += 1
        self.peak[key] = max(self.peak[key], self.load[key])

    def give(self, peer: str, tool: str) -> None:
        key = (peer, tool)
        assert self.load[key] > 0, "gave back a slot never taken"
        self.load[key] -= 1
        if self.load[key] <= 0:
            del self.load[key]

    def held(self, peer: str, tool: str) -> int:
        return self.load.get((peer, tool), 0)

    def __iter__(self) -> Iterator[tuple[tuple[str, str], int]]:
        return iter(sorted(self.load.items()))


def candidates(offers: Iterable[Offer], tried: set[str], suspects: set[str],
               schema: str = "") -> list[Offer]:
    """The offers the next attempt may go to (before capacity): peers not tried yet and
    not suspect, else not suspect, else any. Within each, those offering the tool under
    `schema` (the hash the call's arguments were written for: the schema the planner or
    an MCP client was shown) come first: another version may refuse the arguments."""
    offers = list(offers)
    fresh = [o for o in offers if o.peer not in tried and o.peer not in suspects]
    trusted = [o for o in offers if o.peer not in suspects]
    for level in (fresh, trusted, offers):
        same = [o for o in level if o.schema == schema]
        if same or level:
            return same or level
    return []


def pick(offers: Iterable[Offer], tool: str, slots: Slots) -> Offer | None:
    """The best of `offers` with a free slot here (load as we count it), or None."""
    loaded = [replace(o, load=slots.held(o.peer, tool)) for o in offers]
    free = [o for o in rank(loaded) if o.free > 0]
    return free[0] if free else None
