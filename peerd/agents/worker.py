"""Symphony's worker side: follow beacons, bid, solve what we bid on.

For each beacon of another peer (checked by the gossip validator first: publisher =
requester, sane counts and deadlines), if our model can answer and our skills match
the requirement, send the requester a signed bid over `/peerd/bid/1.0.0`; answer the
tasks we bid on over `/peerd/task/1.0.0` (and only those, and only to the peer whose
beacon it was) with a chain of thought (solver.py), signed.

Each bid takes one of our task seats (seats.py), lent to requesters in fair shares: a
beacon that finds every seat taken waits for one until its bid window closes (one
beacon per requester waits; the others are skipped), and when a seat frees, a requester
holding its share while another waits is refused it, and that is counted against it
(`over_share`). So a requester that beacons many tasks cannot keep another's from
getting our bid.

Test-only knob: PEERD_TEST_TASK_DELAY_S makes a worker wait that many seconds after
announcing `task.solving` and before solving, so a test can kill it mid-task.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.peer.id import ID

from peerd import compute
from peerd.agents.election import Candidate
from peerd.agents.sealing import seal
from peerd.agents.seats import SEAT_GRACE_S, WANTING_GRACE_S, OverShare, Seats
from peerd.agents.skills import LexicalMatcher, SkillMatcher
from peerd.agents.solver import Solution, Solver
from peerd.node import Node
from peerd.rpc import Busy, call, stream_handler
from peerd.shares import Grant
from protocols.beacon import (
    BID,
    MAX_BEACON_BYTES,
    TOPIC,
    Beacon,
    Bid,
    BidReply,
    SignedBid,
    StaleBeacon,
)
from protocols.codec import decode
from protocols.errors import PeerError
from protocols.task import MAX_ANSWER_CHARS, MAX_COT_CHARS, TASK, Answer, SignedAnswer, TaskRequest

log = logging.getLogger(__name__)

TEST_DELAY_ENV = "PEERD_TEST_TASK_DELAY_S"
MAX_LOAD_TO_BID = 4  # task seats lent to other peers: bids out and tasks in hand
MAX_SOLVING = 2  # tasks solved at once; the rest queue
MAX_PROMISES = 4096  # tasks we bid on and may still be asked to solve
MAX_CONSIDERING = 32  # beacons being considered for a bid at once
PROMISE_ROUNDS = 4  # a promise lasts the bid window plus this many worker deadlines
LATENCY_EWMA = 0.3


@dataclass(slots=True)
class _Promise:
    """A task we bid on: only its requester may ask us to solve it, once."""

    requester: str
    expires_at: float  # unix seconds
    started: bool = False


class Unavailable(Busy):
    """We cannot solve this task after all (no model, our deadline, a generation that
    failed): the requester is told, nothing is counted against it."""

    reason = "unavailable"


class TaskWorker:
    def __init__(self, node: Node, solver: Solver | None, matcher: SkillMatcher,
                 skills: Callable[[], tuple[str, ...]] = tuple) -> None:
        self.node = node
        self.solver = solver
        self.matcher = matcher
        self.skills = skills  # what we advertise, as the match scores it
        self._promises: OrderedDict[str, _Promise] = OrderedDict()
        self.seats = Seats(MAX_LOAD_TO_BID)  # by requester, from our bid to our answer
        self._seats_changed = trio.Event()  # set (and replaced) whenever a seat is taken or freed
        self._waiting: set[str] = set()  # requesters with a beacon waiting for a seat
        self._labelled: set[str] = set()  # holders with a peerd_lent gauge
        self._solving = trio.CapacityLimiter(MAX_SOLVING)
        self._in_hand = 0  # tasks accepted to solve, queued or running (our own too)
        self._latency_s = 0.0  # EWMA of our solve times: the latency we bid with
        self._considering = 0  # beacons being considered for a bid now
        self._test_delay_s = float(os.environ.get(TEST_DELAY_ENV) or 0.0)

    def register(self) -> None:
        """The beacon validator and the task protocol's handler."""
        self._publish_seats()
        self.node.pubsub.set_topic_validator(TOPIC, self._validate_beacon, False)
        self.node.set_stream_handler(TASK.id, stream_handler(TASK, self._serve_task,
                                                             self.node.offence))

    def capable(self) -> bool:
        return self.solver is not None and self.solver.capable()

    async def warm_up(self) -> None:
        """Load the skill matcher's model before the first beacon needs it, once our own
        model is up: loading both at once races inside transformers' lazy imports."""
        warm = getattr(self.matcher, "warm_up", None)
        if warm is None or self.solver is None:
            return
        while not (self.solver.capable() and self.skills()):  # noqa: ASYNC110
            await trio.sleep(0.5)  # (neither the model slot nor the ledger has an event)
        try:
            # a shutdown need not wait for it (mypy: see inference.runtime._loading)
            await trio.to_thread.run_sync(warm, abandon_on_cancel=True)  # type: ignore[call-arg]
        except Exception:
            log.warning("loading the skill matcher failed; bids will score 0", exc_info=True)

    async def own_bid(self, task_id: str, requirement: str, min_match: float,
                      bid_window_s: float, deadline_s: float) -> Candidate | None:
        """Our bid on a task of our own (the requester's reserve), promised; None when we
        cannot answer it or our skills fall short of `min_match`."""
        if not self.capable():
            return None
        match, _ = await self.match(requirement)
        if match < min_match:
            return None
        self.promise(task_id, self.node.peer_id, bid_window_s, deadline_s)
        return Candidate(self.node.peer_id, match, self._in_hand, self._latency_s)

    # ---- beacons and bids ----------------------------------------------------------------

    def _validate_beacon(self, forwarder: Any, msg: Any) -> bool:
        """Gossip validator: must never raise (LIBP2P_NOTES.md trap 2)."""
        try:
            publisher = str(ID(msg.from_id)) if msg.from_id else str(forwarder)
            if len(msg.data) > MAX_BEACON_BYTES:
                self.node.offence(publisher, "oversized", f"{len(msg.data)} byte beacon")
                return False
            beacon = decode(msg.data, Beacon)
            if beacon.requester != publisher:
                raise PeerError(f"beacon of {beacon.requester} published by {publisher}",
                                reason="impersonation")
            beacon.check(time.time())
            return True
        except StaleBeacon:  # honest but late (only the requester may publish it)
            self.node.metrics.rejections.labels("stale_beacon").inc()
            return False
        except PeerError as exc:
            self.node.offence(publisher, exc.reason, f"beacon: {exc}")
            return False
        except Exception:
            log.exception("beacon validator failed")
            return False

    async def follow(self, subscription: Any) -> None:
        """Consider every beacon of another peer for a bid, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._lapse_seats)
            while True:
                msg = await subscription.get()
                self.node.metrics.messages.labels("in", "beacon").inc()
                try:
                    beacon = decode(msg.data, Beacon)  # the validator passed it
                except PeerError:
                    continue
                if beacon.requester == self.node.peer_id:
                    continue
                if self._considering >= MAX_CONSIDERING:
                    continue  # a flood of beacons: skip rather than queue
                self._considering += 1
                nursery.start_soon(self._consider, beacon)

    async def _consider(self, beacon: Beacon) -> None:
        try:
            await self._maybe_bid(beacon)
        except Exception:
            log.exception("bidding on task %s failed", beacon.task_id)
        finally:
            self._considering -= 1

    async def _maybe_bid(self, beacon: Beacon) -> None:
        if not self.capable() or beacon.task_id in self._promises:
            return
        match, scorer = await self.match(beacon.requirement)
        if match < beacon.min_match:
            return
        closes = beacon.issued_at + beacon.bid_window_s
        if closes <= time.time() or not await self._seat_for(beacon):
            return
        left = closes - time.time()
        if left <= 0 or beacon.task_id in self._promises:  # it waited too long, or a twin bid
            self._free_seat(beacon.requester, beacon.task_id)
            return
        try:
            await self._bid(beacon, match, scorer, left)
        finally:
            promise = self._promises.get(beacon.task_id)
            if promise is None or promise.requester != beacon.requester:
                self._free_seat(beacon.requester, beacon.task_id)  # the bid went nowhere

    async def _bid(self, beacon: Beacon, match: float, scorer: str, left: float) -> None:
        bid = Bid(task_id=beacon.task_id, requester=beacon.requester,
                  bidder=self.node.peer_id, match=match, load=self._in_hand,
                  expected_latency_s=round(self._latency_s, 3), scorer=scorer)
        body, sig = seal(bid, self.node.key_pair.private_key)
        self.promise(beacon.task_id, beacon.requester, beacon.bid_window_s, beacon.deadline_s)
        try:
            reply: BidReply = await call(self.node.host, beacon.requester, BID,
                                         SignedBid(body=body, sig=sig),
                                         timeout_s=min(BID.timeout_s, left + 1.0))
        except PeerError as exc:
            self.node.offence(beacon.requester, exc.reason, f"bid reply: {exc}")
            self._promises.pop(beacon.task_id, None)
            return
        except Exception as exc:
            log.debug("bid on %s to %s failed: %r", beacon.task_id, beacon.requester, exc)
            self._promises.pop(beacon.task_id, None)
            return
        if not reply.accepted:
            self._promises.pop(beacon.task_id, None)
        self.node.metrics.messages.labels("out", "bid").inc()
        self.node.events.publish("task.bid_sent", task_id=beacon.task_id,
                            requester=beacon.requester, match=round(match, 4),
                            accepted=reply.accepted, reason=reply.reason)

    async def match(self, requirement: str) -> tuple[float, str]:
        """How well our skills match `requirement`, in [0, 1], and which scorer said so."""
        skills = self.skills()
        if not skills:
            return 0.0, "none"
        if isinstance(self.matcher, LexicalMatcher):
            score = self.matcher.match(requirement, skills)
        else:
            try:
                score = await compute.run(self.matcher.match, requirement, skills)
            except Exception:
                log.warning("skill matching failed; scoring lexically", exc_info=True)
                return LexicalMatcher().match(requirement, skills), "lexical"
        return (score if math.isfinite(score) else 0.0), self.matcher.name

    def promise(self, task_id: str, requester: str, bid_window_s: float,
                deadline_s: float) -> None:
        """Remember that we bid on `task_id`: only `requester` may have us solve it."""
        now = time.time()
        while self._promises:  # drop expired promises, oldest first
            oldest = next(iter(self._promises.values()))
            if oldest.expires_at > now and len(self._promises) < MAX_PROMISES:
                break
            self._promises.popitem(last=False)
        self._promises[task_id] = _Promise(
            requester, now + bid_window_s + PROMISE_ROUNDS * deadline_s + 30.0)

    # ---- seats ---------------------------------------------------------------------------

    async def _seat_for(self, beacon: Beacon) -> bool:
        """Take a seat for the beacon's task, waiting for one until its bid window closes;
        False when none came, another beacon of its requester waits already, or the
        requester holds its share while others wait (an offence)."""
        peer, task_id = beacon.requester, beacon.task_id
        closes = trio.current_time() + max(0.0, beacon.issued_at + beacon.bid_window_s
                                           - time.time())
        lapses_at = closes + SEAT_GRACE_S  # not asked by then: the requester elected others
        wants_until = closes + min(beacon.deadline_s, WANTING_GRACE_S)
        waiting = False
        try:
            while True:
                changed = self._seats_changed
                seating = self.seats.take(peer, task_id, trio.current_time(),
                                          lapses_at=lapses_at, wants_until=wants_until)
                if isinstance(seating, Grant):
                    self._seats_moved()
                    return True
                if isinstance(seating, OverShare):
                    self.node.metrics.share_refusals.labels("seats").inc()
                    self.node.offence(peer, "over_share", (
                        f"beacon {task_id!r:.70}: it holds {seating.held} task seats, its "
                        f"fair share is {seating.fair_share:.2f}, and "
                        f"{', '.join(seating.waiting[:3])} wait with fewer"))
                    return False
                if not waiting:
                    if peer in self._waiting:
                        return False
                    self._waiting.add(peer)
                    waiting = True
                    self.node.events.publish("task.seat_wait", task_id=task_id,
                                             requester=peer, held=seating.held)
                with trio.move_on_at(closes) as scope:
                    await changed.wait()
                if scope.cancelled_caught:
                    return False
        finally:
            if waiting:
                self._waiting.discard(peer)

    def _hold_seat(self, peer: str, task_id: str) -> bool:
        """The seat of a task we are asked to solve, kept until the answer is out; False
        for our own task (the reserve takes no seat). A seat that lapsed (we are a
        replacement, asked after the election) is taken again if one is free, else
        Unavailable: the requester tries its next bidder."""
        if peer == self.node.peer_id:
            return False
        if self.seats.hold(peer, task_id):
            return True
        seating = self.seats.take(peer, task_id, trio.current_time(), lapses_at=None)
        if not isinstance(seating, Grant):
            raise Unavailable(f"no free task seat for {peer} now")
        self._seats_moved()
        return True

    def _free_seat(self, peer: str, task_id: str) -> None:
        if self.seats.release(peer, task_id):
            self._seats_moved()

    def _seats_moved(self) -> None:
        """Wake whoever waits on the seats; the holders on /metrics."""
        self._seats_changed.set()
        self._seats_changed = trio.Event()
        self._publish_seats()

    async def _lapse_seats(self) -> None:
        """Give back the seats of bids their requesters never took up."""
        while True:
            changed = self._seats_changed
            if self.seats.lapse(trio.current_time()):
                self._seats_moved()
                continue
            lapse = self.seats.next_lapse()
            with trio.move_on_at(math.inf if lapse is None else lapse):
                await changed.wait()

    def _publish_seats(self) -> None:
        """`peerd_lent{resource="seats", peer}` for the requesters holding seats now (a
        requester that no longer holds loses its gauge) and the seats' capacity."""
        metrics = self.node.metrics
        held = self.seats.shares.held
        metrics.lent_capacity.labels("seats").set(self.seats.shares.capacity)
        for gone in self._labelled - held.keys():
            metrics.lent.remove("seats", gone)
        for peer, n in held.items():
            metrics.lent.labels("seats", peer).set(n)
        self._labelled = set(held)

    # ---- solving -------------------------------------------------------------------------

    async def _serve_task(self, peer: str, request: TaskRequest) -> SignedAnswer:
        request.check()
        promise = self._promises.get(request.task_id)
        if promise is None or promise.requester != peer or promise.expires_at < time.time():
            raise PeerError(f"task {request.task_id!r:.70}: we made {peer} no bid on it",
                            reason="unknown_task")
        if promise.started:
            raise PeerError(f"task {request.task_id} asked for twice", reason="duplicate_task")
        promise.started = True
        seated = self._hold_seat(peer, request.task_id)
        try:
            solution, elapsed = await self._solve(peer, request)
        finally:
            if seated:
                self._free_seat(peer, request.task_id)
        answer = Answer(task_id=request.task_id, requester=peer, worker=self.node.peer_id,
                        answer=solution.answer[:MAX_ANSWER_CHARS],
                        cot=solution.cot[:MAX_COT_CHARS],
                        confidence=min(1.0, max(0.0, solution.confidence)),
                        tokens=solution.tokens, elapsed_s=round(elapsed, 3))
        body, sig = seal(answer, self.node.key_pair.private_key)
        self.node.events.publish("task.solved", task_id=request.task_id, requester=peer,
                            answer=answer.answer[:200], elapsed_s=answer.elapsed_s)
        return SignedAnswer(body=body, sig=sig)

    async def _solve(self, peer: str, request: TaskRequest) -> tuple[Solution, float]:
        """Our solver's solution and the seconds it took; Unavailable if it failed us."""
        solver = self.solver
        if solver is None or not solver.capable():
            raise Unavailable("this peer cannot solve tasks right now")
        self._in_hand += 1
        t0 = time.perf_counter()
        try:
            self.node.events.publish("task.solving", task_id=request.task_id, requester=peer)
            with trio.move_on_after(request.deadline_s) as scope:
                if self._test_delay_s > 0:
                    await trio.sleep(self._test_delay_s)
                async with self._solving:
                    solution = await solver.solve(request)
            if scope.cancelled_caught:
                raise Unavailable(f"task {request.task_id} not solved within "
                                  f"{request.deadline_s} s")
        except Unavailable:
            raise
        except Exception as exc:  # the model or the swarm failed us: not the requester's doing
            log.warning("solving task %s failed: %r", request.task_id, exc, exc_info=True)
            raise Unavailable(f"solving failed: {type(exc).__name__}: {exc}") from None
        finally:
            self._in_hand -= 1
        elapsed = time.perf_counter() - t0
        self._latency_s = (elapsed if self._latency_s == 0.0
                           else (1 - LATENCY_EWMA) * self._latency_s + LATENCY_EWMA * elapsed)
        return solution, elapsed

