"""What a peer's input earns it in the memory's diffusion: pure rules, no I/O, each
taking the time as an argument (tested with a fake clock).

`TokenBucket` bounds the announcements taken from one publisher (and paces our own).
`AuthorRecord` keeps, per author, the verdicts of our own replays on their items: an
author whose items keep failing is not fetched from for a back-off period.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


class TokenBucket:
    """`burst` tokens, refilled at `rate` a second; one taken per message."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def wait_s(self, now: float) -> float:
        """Seconds until a token is there (0 when one is)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


@dataclass
class Standing:
    admitted: float = 0.0  # this author's items our replay admitted, decayed
    refused: float = 0.0  # ... and refused
    since: float = 0.0  # start of the current half-life period
    blocked_until: float = -math.inf


class AuthorRecord:
    """Per author, what our own replays made of their items. An author with at least
    `min_refusals` refusals making at least `refusal_share` of their record is not
    fetched from for `backoff_s` after each further refusal. Counts halve at each
    whole `half_life_s` since the author was first recorded (in steps, so refusals
    close together count whole), so an author's old failures fade."""

    def __init__(self, *, min_refusals: float = 3, refusal_share: float = 2 / 3,
                 half_life_s: float = 6 * 3600.0, backoff_s: float = 3600.0,
                 max_authors: int = 4096) -> None:
        self.min_refusals = min_refusals
        self.refusal_share = refusal_share
        self.half_life_s = half_life_s
        self.backoff_s = backoff_s
        self.max_authors = max_authors
        self._authors: OrderedDict[str, Standing] = OrderedDict()

    def standing(self, author: str, now: float) -> Standing | None:
        s = self._authors.get(author)
        if s is not None and now - s.since >= self.half_life_s:
            periods = math.floor((now - s.since) / self.half_life_s)
            s.admitted *= 0.5 ** periods
            s.refused *= 0.5 ** periods
            s.since += periods * self.half_life_s
        return s

    def report(self, author: str, admitted: bool, now: float) -> bool:
        """Record one replay verdict; True when it puts the author in back-off."""
        s = self.standing(author, now)
        if s is None:
            s = self._authors[author] = Standing(since=now)
            while len(self._authors) > self.max_authors:
                self._authors.popitem(last=False)  # the least recently reported
        self._authors.move_to_end(author)
        if admitted:
            s.admitted += 1
            return False
        s.refused += 1
        if s.refused >= self.min_refusals and \
                s.refused / (s.admitted + s.refused) >= self.refusal_share:
            was_blocked = s.blocked_until > now
            s.blocked_until = now + self.backoff_s
            return not was_blocked
        return False

    def blocked(self, author: str, now: float) -> bool:
        s = self._authors.get(author)
        return s is not None and s.blocked_until > now

    def blocked_authors(self, now: float) -> list[str]:
        return [a for a, s in self._authors.items() if s.blocked_until > now]
