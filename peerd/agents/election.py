"""Electing a task's workers from their bids, and replacing those that fail.

`Election` is a sans-I/O state machine: bids are offered to it, it says when it may
be held (every peer we expect to bid has bid, or the bid window closed), ranks the
bidders and seats the best, and hands out the next bidder when a seated worker fails.
Time is passed in (trio's clock in the daemon, a fake one in tests). The two async
drivers below (`run_election`, `fill_seats`) get their bids over a memory channel
and their work as a function, so they too run without a network in tests.

Ranking (higher first):

    rank = reputation * (0.5 + 0.5 * match) / (1 + 0.25 * load)
           / (1 + expected_latency_s / deadline_s)

Match and load are the bidder's claims; reputation is the requester's view. Ties are
broken by sha256(task id + peer id): deterministic, but not always the same peer.

A bidder the requester holds a recent no-show against (`demoted`: it left a seat of
ours unanswered, reputation.NoShows) ranks after every other bidder, whatever it
claims: it takes a seat only when the others cannot fill them.

An election holds at most MAX_BIDS bids (any peer may bid, and each bid costs the
ranking): past it a bid takes the place of the lowest-ranked bid not seated yet, or
is turned away if it ranks no higher (`on_drop` hears whose bid left, so the caller
can forget it too). Each bidder's reputation is looked up once an election, however
often it is ranked.

The requester's own bid is a reserve: it never displaces another bidder, and takes a
seat only when the other bidders cannot fill them (with no other capable peer, that
is every seat) — a peer never works on its own beacon while others can.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

LOAD_PENALTY = 0.25
MAX_BIDS = 256  # an election's bids, at most: far more than any task seats
MIN_TURN = 0.5  # fill_seats: the least share of a deadline a replacement is seated for

T = TypeVar("T")
Reputation = Callable[[str], float]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A verified bid, as the election sees it."""

    peer_id: str
    match: float
    load: int = 0
    expected_latency_s: float = 0.0


def rank_score(c: Candidate, reputation: float, deadline_s: float) -> float:
    latency = max(0.0, c.expected_latency_s) / max(deadline_s, 1e-9)
    return (reputation * (0.5 + 0.5 * min(1.0, max(0.0, c.match)))
            / (1.0 + LOAD_PENALTY * max(0, c.load)) / (1.0 + latency))


def rank_key(c: Candidate, reputation: Reputation, deadline_s: float, salt: str
             ) -> tuple[float, str]:
    """Lower ranks first: the rank, negated, then the tie-break hash."""
    tie = hashlib.sha256(f"{salt}\0{c.peer_id}".encode()).hexdigest()
    return (-rank_score(c, reputation(c.peer_id), deadline_s), tie)


def rank(candidates: Iterable[Candidate], reputation: Reputation, deadline_s: float,
         salt: str) -> list[Candidate]:
    return sorted(candidates, key=lambda c: rank_key(c, reputation, deadline_s, salt))


class Election:
    """One task's bids and seats."""

    def __init__(self, task_id: str, requester: str, wanted: int, *, expected_bidders: int,
                 closes_at: float, deadline_s: float, reputation: Reputation,
                 demoted: Callable[[str], bool] = lambda peer: False,
                 on_drop: Callable[[str], object] = lambda peer: None) -> None:
        self.task_id = task_id
        self.requester = requester
        self.wanted = wanted
        self.expected_bidders = expected_bidders
        self.closes_at = closes_at
        self.deadline_s = deadline_s
        self._reputation = reputation
        self._known: dict[str, float] = {}  # reputation, looked up once a bidder
        self.demoted = demoted
        self.on_drop = on_drop
        self.bids: dict[str, Candidate] = {}  # other peers' bids, by peer id
        self.reserve: Candidate | None = None  # the requester's own bid
        self.used: set[str] = set()  # seated now or before
        self.held = False

    def reputation(self, peer: str) -> float:
        got = self._known.get(peer)
        if got is None:
            got = self._known[peer] = self._reputation(peer)
        return got

    def _key(self, c: Candidate) -> tuple[bool, tuple[float, str]]:
        return (self.demoted(c.peer_id),
                rank_key(c, self.reputation, self.deadline_s, self.task_id))

    def offer(self, c: Candidate) -> str:
        """Take a bid: "accepted", "reserve" (our own), "duplicate", or "full" (MAX_BIDS
        bids, each ranked at least as high; `on_drop` hears it). An accepted bid past
        MAX_BIDS takes the place of the lowest-ranked one not seated (`on_drop`)."""
        if c.peer_id == self.requester:
            self.reserve = c
            return "reserve"
        if c.peer_id in self.bids:
            return "duplicate"
        if len(self.bids) >= MAX_BIDS:
            free = [b for b in self.bids.values() if b.peer_id not in self.used]
            worst = max(free, key=self._key, default=None)
            if worst is None or self._key(c) >= self._key(worst):
                self._known.pop(c.peer_id, None)
                self.on_drop(c.peer_id)
                return "full"
            del self.bids[worst.peer_id]
            self._known.pop(worst.peer_id, None)
            self.on_drop(worst.peer_id)
        self.bids[c.peer_id] = c
        return "accepted"

    def ready(self, now: float) -> bool:
        """The election may be held: the window closed, or every expected peer bid (a
        demoted bidder's bid is not waited for, and does not close the window early:
        it would take a seat that a bid still on its way could fill)."""
        if now >= self.closes_at:
            return True
        counted = sum(1 for p in self.bids if not self.demoted(p))
        return self.expected_bidders > 0 and counted >= self.expected_bidders

    def ranking(self) -> list[Candidate]:
        """Every bidder not used yet, best first, the demoted after the others; the
        reserve last."""
        free = [c for c in self.bids.values() if c.peer_id not in self.used]
        order = sorted(free, key=self._key)  # the demoted after the others, each by rank
        if self.reserve is not None and self.reserve.peer_id not in self.used:
            order.append(self.reserve)
        return order

    def elect(self) -> list[Candidate]:
        """Seat the best `wanted` bidders (fewer if fewer bid)."""
        seats = self.ranking()[: self.wanted]
        self.used.update(c.peer_id for c in seats)
        self.held = True
        return seats

    def replacement(self) -> Candidate | None:
        """The next bidder for a seat whose worker failed; None when none is left.
        Bids that arrived after the election count: they are there for this."""
        order = self.ranking()
        if not order:
            return None
        self.used.add(order[0].peer_id)
        return order[0]


async def run_election(election: Election, bids: trio.MemoryReceiveChannel[Candidate],
                       nursery: trio.Nursery) -> list[Candidate]:
    """Offer bids from `bids` to the election until it is ready (or its window
    closes, on trio's clock), then hold it. Bids keep flowing into the election in
    `nursery` afterwards, for `replacement`, until the channel closes."""
    ready = trio.Event()

    async def collect() -> None:
        async with bids:
            async for c in bids:
                election.offer(c)
                if election.ready(trio.current_time()):
                    ready.set()

    if election.ready(trio.current_time()):
        ready.set()
    nursery.start_soon(collect)
    with trio.move_on_at(election.closes_at):
        await ready.wait()
    while True:  # bids already sent but not yet collected take part too
        try:
            election.offer(bids.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
    return election.elect()


class WorkFailed(Exception):
    """A worker did not deliver; `reason` is a short label ("error", "bad_signature"...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Fallback:
    seat: int
    peer_id: str  # the worker dropped
    reason: str  # "deadline", or WorkFailed.reason
    replacement: str | None  # the next bidder seated, if any was left


@dataclass(slots=True)
class SeatResult(Generic[T]):
    seat: int
    worker: Candidate | None = None  # who delivered; None: the seat stayed empty
    result: T | None = None
    tried: list[str] = field(default_factory=list)  # every worker seated here, in order


Work = Callable[[int, Candidate], Awaitable[T]]


async def fill_seats(election: Election, seats: list[Candidate], work: Work[T],
                     deadline_s: float,
                     on_fallback: Callable[[Fallback], None] = lambda f: None,
                     *, within_s: float = math.inf,
                     ) -> tuple[list[SeatResult[T]], list[Fallback]]:
    """Run `work(seat, worker)` for every seat at once, each worker within
    `deadline_s`. A worker that misses it or raises WorkFailed is dropped and the
    next bidder takes its seat (with a fresh deadline), until one delivers, no bidder
    is left, or `within_s` from the start has passed: past it no worker is waited for,
    so bidders that take a seat and never answer cannot hold the caller one deadline
    after another. A replacement is seated only while at least MIN_TURN of a deadline
    is left (less would judge it on time it never had)."""
    results = [SeatResult[T](seat=i) for i in range(len(seats))]
    fallbacks: list[Fallback] = []
    ends_at = trio.current_time() + within_s

    async def staff(i: int, worker: Candidate | None) -> None:
        while worker is not None:
            results[i].tried.append(worker.peer_id)
            reason = "deadline"
            with trio.move_on_at(min(trio.current_time() + deadline_s, ends_at)):
                try:
                    results[i].result = await work(i, worker)
                    results[i].worker = worker
                    return
                except WorkFailed as exc:
                    reason = exc.reason
            left = ends_at - trio.current_time()
            nxt = election.replacement() if left >= MIN_TURN * deadline_s else None
            fallback = Fallback(i, worker.peer_id, reason, nxt.peer_id if nxt else None)
            fallbacks.append(fallback)
            on_fallback(fallback)
            worker = nxt

    async with trio.open_nursery() as nursery:
        for i, c in enumerate(seats):
            nursery.start_soon(staff, i, c)
    return results, fallbacks
