"""A worker's task seats, lent to requesters in max-min fair shares.

A seat is one task of another peer this worker may be asked to solve (`MAX_LOAD_TO_BID`
of them, worker.py). It is taken when we bid (the promise) and given back when the
answer is out, or, for a bid the requester never took up (it elected others), once its
election is surely over: the bid window closed, plus `SEAT_GRACE_S`. Our own tasks (the
requester's reserve bid) take no seat: a seat is what we lend.

The seats are a `Shares` (peerd/shares.py) held by requester peer id. They cannot be
taken back (a task in hand is not dropped), so max-min fairness needs to know who
*wants* a seat and did not get one: a requester whose beacon found every seat taken is
remembered as wanting one (its demand: what it holds plus one) until its bid window
closes and a while after (its deadline, at most `WANTING_GRACE_S`: a retry comes soon).
Then, when a seat frees, a requester holding its share or more is refused it in favour
of the one waiting (`OverShare`), and the worker counts that against it.

Sans-I/O: time is passed in (trio's clock in the worker, plain numbers in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peerd.shares import Grant, Refuse, Shares

SEAT_GRACE_S = 5.0  # after the bid window: the election and the request on its way
WANTING_GRACE_S = 30.0  # a refused requester still wants a seat this long after its window
MAX_WANTING = 256  # requesters remembered as waiting; the first to stop waiting go first

Key = tuple[str, str]  # (requester, task id): task ids are only unique per requester


@dataclass(frozen=True, slots=True)
class NoSeat:
    """No seat for the requester now, within its share: it waits."""

    held: int


@dataclass(frozen=True, slots=True)
class OverShare:
    """The requester holds its fair share or more while others holding fewer wait."""

    held: int
    fair_share: float
    waiting: tuple[str, ...]  # who waits, holding fewer


Seating = Grant | NoSeat | OverShare


@dataclass(slots=True)
class _Seat:
    lapses_at: float | None  # None once the requester asked for the task


class Seats:
    """The seats of one worker; the worker calls it on the event loop."""

    def __init__(self, capacity: int) -> None:
        self.shares = Shares("seats", capacity)
        self._seats: dict[Key, _Seat] = {}
        self._wanting: dict[str, float] = {}  # requester -> until when it waits

    def take(self, requester: str, task_id: str, now: float, *,
             lapses_at: float | None, wants_until: float | None = None) -> Seating:
        """A seat for `requester`'s task, lapsing at `lapses_at` unless it is asked for
        (`hold`) first; or why not. Refused within its share, the requester is
        remembered as waiting until `wants_until` (not at all when None)."""
        waiting = self.wanting(now, besides=requester)
        decision = self.shares.ask(requester, 1, waiting)
        held = self.shares.held.get(requester, 0)
        # shares are fractions, seats whole: a free seat the share arithmetic refuses
        # still goes to a requester that no waiting one holds fewer than, nor as few
        # and waited first
        fewer = tuple(sorted(p for p in waiting if self.shares.held.get(p, 0) < held))
        ahead = fewer or (requester not in self._wanting and any(
            self.shares.held.get(p, 0) == held for p in waiting))
        if isinstance(decision, Grant) or (self.shares.free > 0 and not ahead):
            self.shares.grant(requester, 1)
            self._seats[(requester, task_id)] = _Seat(lapses_at)
            self._wanting.pop(requester, None)
            return Grant()
        if isinstance(decision, Refuse) and fewer and held >= decision.fair_share - 1e-9:
            return OverShare(held, decision.fair_share, fewer)
        # within its share, every seat taken (seats are not taken back), or a waiting
        # requester goes first
        if wants_until is not None:
            self._want(requester, max(wants_until, self._wanting.get(requester, now)))
        return NoSeat(held)

    def hold(self, requester: str, task_id: str) -> bool:
        """The requester asked for the task: its seat no longer lapses. False when it has
        none (it lapsed, or we never bid)."""
        seat = self._seats.get((requester, task_id))
        if seat is None:
            return False
        seat.lapses_at = None
        return True

    def release(self, requester: str, task_id: str) -> bool:
        """Give the seat back (answered, failed, or the bid went nowhere)."""
        if self._seats.pop((requester, task_id), None) is None:
            return False
        self.shares.release(requester, 1)
        return True

    def lapse(self, now: float) -> list[Key]:
        """Give back the seats of bids never taken up by `now`."""
        gone = [k for k, s in self._seats.items()
                if s.lapses_at is not None and s.lapses_at <= now]
        for requester, task_id in gone:
            self.release(requester, task_id)
        return gone

    def next_lapse(self) -> float | None:
        return min((s.lapses_at for s in self._seats.values() if s.lapses_at is not None),
                   default=None)

    def wanting(self, now: float, besides: str = "") -> dict[str, int]:
        """The requesters waiting for a seat now (one each), `besides` left out."""
        for peer in [p for p, until in self._wanting.items() if until <= now]:
            del self._wanting[peer]
        return {p: 1 for p in self._wanting if p != besides}

    def held(self) -> dict[str, Any]:
        """For status and metrics: capacity, used, and who holds how many."""
        return {"capacity": self.shares.capacity, "used": self.shares.used,
                "held": dict(self.shares.held)}

    def _want(self, requester: str, until: float) -> None:
        self._wanting[requester] = until
        while len(self._wanting) > MAX_WANTING:
            del self._wanting[min(self._wanting, key=self._wanting.__getitem__)]
