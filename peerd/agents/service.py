"""Symphony on a running node: beacons, bids, elected workers, votes, reputation.

As a requester (`run_task`): publish a `Beacon` on gossip, collect signed bids over
`/peerd/bid/1.0.0` until every peer expected to bid has (or the bid window closes),
elect the best bidders (election.py), send each the question over
`/peerd/task/1.0.0` with its own temperature and seed, replace any worker that fails
or misses its deadline with the next bidder, verify each signed answer, vote
(voting.py), update reputation (reputation.py) and publish it in our ledger entry.

As a worker: for each beacon of another peer, if our model can answer and our skills
match, bid; answer the tasks we bid on (and only those, and only to the peer whose
beacon it was) with a chain of thought (solver.py), signed.

Everything a peer sends is checked before it is used: beacons in the gossip validator
(publisher = requester, sane counts and deadlines), bids and answers by signature,
task and requester. Refused input is counted against the sender (`Node.offence`).
Progress goes to the node's event bus (`task.*` events on /events).

Test-only knob: PEERD_TEST_TASK_DELAY_S makes a worker wait that many seconds after
announcing `task.solving` and before solving, so a test can kill it mid-task.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from peerd.agents.answers import normalise
from peerd.agents.election import (
    Candidate,
    Election,
    Fallback,
    SeatResult,
    WorkFailed,
    fill_seats,
    run_election,
)
from peerd.agents.reputation import ReputationBook, view
from peerd.agents.sealing import seal, unseal
from peerd.agents.skills import LexicalMatcher, SkillMatcher
from peerd.agents.solver import Solver
from peerd.agents.voting import Ballot, tally
from peerd.node import Node
from peerd.rpc import Busy, call, stream_handler
from protocols.beacon import (
    BID,
    MAX_BEACON_BYTES,
    MAX_REQUIREMENT_CHARS,
    TOPIC,
    Beacon,
    Bid,
    BidReply,
    SignedBid,
    StaleBeacon,
)
from protocols.codec import decode, encode
from protocols.errors import PeerError, RemoteError
from protocols.task import (
    MAX_ANSWER_CHARS,
    MAX_COT_CHARS,
    TASK,
    Answer,
    SignedAnswer,
    TaskRequest,
)

log = logging.getLogger(__name__)

REPUTATION_FILE = "reputation.json"
TEST_DELAY_ENV = "PEERD_TEST_TASK_DELAY_S"
TEMPERATURES = (0.0, 0.7, 0.9, 0.5, 1.0, 0.8, 0.6, 0.4)  # seat i: TEMPERATURES[i % 8]
MAX_LOAD_TO_BID = 4  # tasks in hand: a busier peer does not bid
MAX_SOLVING = 2  # tasks solved at once; the rest queue
MAX_PROMISES = 4096  # tasks we bid on and may still be asked to solve
MAX_RECORDS = 256  # finished tasks kept for GET /v1/tasks/{id}
MAX_CLOSED = 4096  # recently closed task ids: a late bid is not an offence
MAX_RUNNING = 16  # tasks this peer requests at once
MAX_CONSIDERING = 32  # beacons being considered for a bid at once
PROMISE_ROUNDS = 4  # a promise lasts the bid window plus this many worker deadlines
LATENCY_EWMA = 0.3


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a user asks for (validated by the API)."""

    question: str
    workers: int = 3
    requirement: str = ""  # "" -> the question
    deadline_s: float = 120.0  # each worker's time to answer
    answer_format: str = "text"
    max_tokens: int = 256
    bid_window_s: float = 2.0
    min_match: float = 0.0

    @property
    def effective_requirement(self) -> str:
        return (self.requirement or self.question)[:MAX_REQUIREMENT_CHARS]


@dataclass(slots=True)
class Vote:
    seat: int
    peer_id: str
    answer: str | None  # normalised
    raw: str
    confidence: float
    match: float
    reputation: float
    cot: str
    elapsed_s: float
    weight: float = 0.0


@dataclass(slots=True)
class TaskRecord:
    """A task this peer requested: what GET /v1/tasks/{id} shows, live."""

    id: str
    spec: TaskSpec
    status: str = "running"  # running | done | failed
    answer: str | None = None
    error: str = ""
    votes: list[Vote] = field(default_factory=list)
    elected: list[str] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    bids: dict[str, Candidate] = field(default_factory=dict)
    beacon_ms: float = 0.0
    solve_ms: float = 0.0
    total_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "answer": self.answer,
            "votes": [{"peer_id": v.peer_id, "answer": v.answer,
                       "confidence": round(v.confidence, 4), "weight": round(v.weight, 6),
                       "cot": v.cot} for v in sorted(self.votes, key=lambda v: v.seat)],
            "elected": list(self.elected),
            "fallbacks": [{"seat": f.seat, "peer_id": f.peer_id, "reason": f.reason,
                           "replacement": f.replacement} for f in self.fallbacks],
            "timings": {"beacon_ms": round(self.beacon_ms, 3),
                        "solve_ms": round(self.solve_ms, 3),
                        "total_ms": round(self.total_ms, 3)},
        }


@dataclass(slots=True)
class _Promise:
    """A task we bid on: only its requester may ask us to solve it, once."""

    requester: str
    expires_at: float  # unix seconds
    started: bool = False


@dataclass(slots=True)
class _Open:
    """A task of ours still taking bids."""

    record: TaskRecord
    bids: trio.MemorySendChannel[Candidate]


class Unavailable(Busy):
    """We cannot solve this task after all (no model, our deadline, a generation that
    failed): the requester is told, nothing is counted against it."""

    reason = "unavailable"


class NoWorkers(Exception):
    """Nobody bid, or nobody answered; the message says which."""


class Symphony:
    def __init__(self, node: Node, solver: Solver | None = None,
                 matcher: SkillMatcher | None = None, *, warm_up: bool = False) -> None:
        self.node = node
        self.solver = solver
        self.matcher = matcher or LexicalMatcher()
        self.warm_up = warm_up
        self.book = _load_book(node)
        self.records: OrderedDict[str, TaskRecord] = OrderedDict()
        self._open: dict[str, _Open] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._promises: OrderedDict[str, _Promise] = OrderedDict()
        self._solving = trio.CapacityLimiter(MAX_SOLVING)
        self._in_hand = 0  # tasks accepted to solve, queued or running
        self._latency_s = 0.0  # EWMA of our solve times: the latency we bid with
        self._running = trio.CapacityLimiter(MAX_RUNNING)
        self._considering = 0  # beacons being considered for a bid now
        self._test_delay_s = float(os.environ.get(TEST_DELAY_ENV) or 0.0)
        self._nursery: trio.Nursery | None = None
        node.set_reputation(self.book.published())

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the protocols and follow beacons until cancelled."""
        self.node.pubsub.set_topic_validator(TOPIC, self._validate_beacon, False)
        self.node.set_stream_handler(BID.id, stream_handler(BID, self._serve_bid,
                                                            self.node.offence))
        self.node.set_stream_handler(TASK.id, stream_handler(TASK, self._serve_task,
                                                             self.node.offence))
        subscription = await self.node.pubsub.subscribe(TOPIC)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._beacon_intake, subscription)
            if self.warm_up and self.solver is not None:
                nursery.start_soon(self._warm_up)
            task_status.started()
            await trio.sleep_forever()

    async def _warm_up(self) -> None:
        """Load the skill matcher's model before the first beacon needs it, once our own
        model is up: loading both at once races inside transformers' lazy imports."""
        warm = getattr(self.matcher, "warm_up", None)
        if warm is None or self.solver is None:
            return
        while not (self.solver.capable() and self._skills()):  # noqa: ASYNC110
            await trio.sleep(0.5)  # (neither the model slot nor the ledger has an event)
        try:
            await trio.to_thread.run_sync(warm)
        except Exception:
            log.warning("loading the skill matcher failed; bids will score 0", exc_info=True)

    def _skills(self) -> tuple[str, ...]:
        entry = self.node.ledger.get(self.node.peer_id)
        return entry.skills if entry is not None else ()

    # ---- requester: one task, end to end -------------------------------------------------

    async def run_task(self, spec: TaskSpec) -> TaskRecord:
        """Announce, elect, solve, vote. Raises NoWorkers when nobody bid or answered
        (the record, failed, stays readable)."""
        async with self._running:
            record = TaskRecord(secrets.token_hex(8), spec)
            self._remember(record)
            try:
                await self._run(record)
            except BaseException as exc:
                record.status = "failed"
                record.error = record.error or f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self._publish_event("task.done", task_id=record.id, status=record.status,
                                    answer=record.answer, total_ms=round(record.total_ms, 1))
            return record

    async def _run(self, record: TaskRecord) -> None:
        spec = record.spec
        t0 = time.perf_counter()
        own = self.book.own()
        reports = {e.peer_id: e.reputation for e in self.node.ledger.entries()}

        def reputation(peer: str) -> float:
            return view(peer, self.node.peer_id, own, reports)

        election = Election(record.id, self.node.peer_id, spec.workers,
                            expected_bidders=self._expected_bidders(),
                            closes_at=trio.current_time() + spec.bid_window_s,
                            deadline_s=spec.deadline_s, reputation=reputation)
        send, recv = trio.open_memory_channel[Candidate](64)
        self._open[record.id] = _Open(record, send)
        results: list[SeatResult[Vote]] = []
        try:
            async with trio.open_nursery() as nursery:
                await self._announce(record)
                await self._bid_on_own(record, send)
                seats = await run_election(election, recv, nursery)
                record.beacon_ms = (time.perf_counter() - t0) * 1e3
                record.elected = [c.peer_id for c in seats]
                self._publish_event("task.elected", task_id=record.id, elected=record.elected,
                                    bids=len(record.bids), beacon_ms=round(record.beacon_ms, 3))
                if not seats:
                    nursery.cancel_scope.cancel()
                    return_early = True
                else:
                    return_early = False
                t1 = time.perf_counter()

                async def work(seat: int, c: Candidate) -> Vote:
                    return await self._assign(record, seat, c, reputation(c.peer_id))

                def on_fallback(f: Fallback) -> None:
                    record.fallbacks.append(f)
                    self._publish_event("task.fallback", task_id=record.id, seat=f.seat,
                                        peer_id=f.peer_id, reason=f.reason,
                                        replacement=f.replacement)

                if not return_early:
                    results, _ = await fill_seats(election, seats, work, spec.deadline_s,
                                                  on_fallback)
                    record.solve_ms = (time.perf_counter() - t1) * 1e3
                nursery.cancel_scope.cancel()  # the bid collector
        finally:
            self._open.pop(record.id, None)
            self._closed[record.id] = None
            while len(self._closed) > MAX_CLOSED:
                self._closed.popitem(last=False)
            send.close()
            record.total_ms = (time.perf_counter() - t0) * 1e3
        if not record.elected:
            record.status = "failed"
            record.error = f"no peer bid on the task within {spec.bid_window_s} s"
            raise NoWorkers(record.error)
        self._settle(record, results)
        record.total_ms = (time.perf_counter() - t0) * 1e3
        if not record.votes:
            record.status = "failed"
            record.error = f"none of the {len(record.bids)} bidders answered"
            raise NoWorkers(record.error)
        record.status = "done"

    async def _announce(self, record: TaskRecord) -> None:
        spec = record.spec
        beacon = Beacon(task_id=record.id, requester=self.node.peer_id,
                        requirement=spec.effective_requirement, workers=spec.workers,
                        answer_format=spec.answer_format, issued_at=time.time(),
                        bid_window_s=spec.bid_window_s, deadline_s=spec.deadline_s,
                        min_match=spec.min_match)
        try:
            await self.node.pubsub.publish(TOPIC, encode(beacon))
            self.node.metrics.messages.labels("out", "beacon").inc()
        except Exception:
            log.warning("publishing the beacon of task %s failed", record.id, exc_info=True)
        self._publish_event("task.beacon", task_id=record.id, workers=spec.workers,
                            requirement=spec.effective_requirement[:200],
                            answer_format=spec.answer_format)

    async def _bid_on_own(self, record: TaskRecord, send: trio.MemorySendChannel[Candidate]
                          ) -> None:
        """Our own bid, a reserve for seats nobody else fills (election.py)."""
        if self.solver is None or not self.solver.capable():
            return
        match, _ = await self._match(record.spec.effective_requirement)
        if match < record.spec.min_match:
            return
        self._promise(record.id, self.node.peer_id, record.spec.bid_window_s,
                      record.spec.deadline_s)
        mine = Candidate(self.node.peer_id, match, self._in_hand, self._latency_s)
        record.bids[mine.peer_id] = mine
        send.send_nowait(mine)

    def _expected_bidders(self) -> int:
        """Peers in our ledger that could bid: they advertise a model or skills."""
        return sum(1 for e in self.node.ledger.entries()
                   if e.peer_id != self.node.peer_id and (e.models or e.skills))

    async def _assign(self, record: TaskRecord, seat: int, worker: Candidate,
                      reputation: float) -> Vote:
        """Have `worker` solve the task in `seat`; its verified vote, or WorkFailed."""
        spec = record.spec
        request = TaskRequest(task_id=record.id, question=spec.question,
                              answer_format=spec.answer_format,
                              temperature=TEMPERATURES[seat % len(TEMPERATURES)],
                              seed=seat_seed(record.id, seat), max_tokens=spec.max_tokens,
                              deadline_s=spec.deadline_s)
        self._publish_event("task.assigned", task_id=record.id, seat=seat,
                            peer_id=worker.peer_id, temperature=request.temperature)
        t0 = time.perf_counter()
        try:
            signed: SignedAnswer = await call(self.node.host, worker.peer_id, TASK, request,
                                              timeout_s=spec.deadline_s + 5.0,
                                              dial=self.node.new_stream)
            answer = unseal(signed.body, signed.sig, Answer, lambda a: a.worker)
            if answer.worker != worker.peer_id:
                raise PeerError(f"answer signed by {answer.worker}, not the worker",
                                reason="impersonation")
            if answer.task_id != record.id or answer.requester != self.node.peer_id:
                raise PeerError("answer for another task or requester", reason="wrong_task")
            answer.check()
        except PeerError as exc:
            self.node.offence(worker.peer_id, exc.reason, f"task {record.id}: {exc}")
            raise WorkFailed(exc.reason, str(exc)) from None
        except RemoteError as exc:
            raise WorkFailed(exc.code, exc.message) from None
        except trio.TooSlowError:
            raise WorkFailed("deadline") from None
        except Exception as exc:  # the transport: a worker that crashed, a closed stream
            log.debug("task %s: worker %s failed: %r", record.id, worker.peer_id, exc)
            raise WorkFailed("unreachable", type(exc).__name__) from None
        vote = Vote(seat, worker.peer_id, normalise(answer.answer, spec.answer_format),
                    answer.answer, answer.confidence, worker.match, reputation, answer.cot,
                    time.perf_counter() - t0)
        record.votes.append(vote)
        self.node.metrics.messages.labels("in", "task.answer").inc()
        self._publish_event("task.answer", task_id=record.id, seat=seat,
                            peer_id=worker.peer_id, answer=vote.answer,
                            confidence=vote.confidence, elapsed_s=round(vote.elapsed_s, 3))
        return vote

    def _settle(self, record: TaskRecord, results: list[SeatResult[Vote]]) -> None:
        """Vote, then score every worker that held a seat."""
        result = tally(Ballot(v.peer_id, v.answer, v.confidence, v.match, v.reputation)
                       for v in record.votes)
        for v in record.votes:
            v.weight = result.weights.get(v.peer_id, 0.0)
        record.answer = result.answer
        now = time.time()
        for seat in results:
            delivered = seat.worker.peer_id if seat.worker else None
            for peer in seat.tried:
                answered = peer == delivered and seat.result is not None
                agreed = (answered and result.answer is not None
                          and seat.result is not None and seat.result.answer == result.answer)
                self.book.observe(peer, agreed=agreed, punctual=answered, now=now)
        self.node.set_reputation(self.book.published())
        _save_book(self.node, self.book)

    # ---- requester: bids ---------------------------------------------------------------

    async def _serve_bid(self, peer: str, signed: SignedBid) -> BidReply:
        bid = unseal(signed.body, signed.sig, Bid, lambda b: b.bidder)
        if bid.bidder != peer:
            raise PeerError(f"{peer} relayed a bid of {bid.bidder}", reason="impersonation")
        bid.check()
        if bid.requester != self.node.peer_id:
            raise PeerError(f"bid for a task of {bid.requester}", reason="unknown_task")
        task = self._open.get(bid.task_id)
        if task is None:
            if bid.task_id in self._closed:
                return BidReply(accepted=False, reason="closed")
            raise PeerError(f"bid for task {bid.task_id!r:.70} we never announced",
                            reason="unknown_task")
        if peer in task.record.bids:
            return BidReply(accepted=False, reason="duplicate")
        candidate = Candidate(peer, bid.match, bid.load, bid.expected_latency_s)
        try:
            task.bids.send_nowait(candidate)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return BidReply(accepted=False, reason="closed")
        task.record.bids[peer] = candidate
        self.node.metrics.messages.labels("in", "bid").inc()
        self._publish_event("task.bid", task_id=bid.task_id, peer_id=peer,
                            match=round(bid.match, 4), load=bid.load, scorer=bid.scorer)
        return BidReply(accepted=True)

    # ---- worker: beacons and bids --------------------------------------------------------

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

    async def _beacon_intake(self, subscription: Any) -> None:
        async with trio.open_nursery() as nursery:
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
        if self.solver is None or not self.solver.capable():
            return
        if beacon.task_id in self._promises or self._in_hand >= MAX_LOAD_TO_BID:
            return
        match, scorer = await self._match(beacon.requirement)
        if match < beacon.min_match:
            return
        left = beacon.issued_at + beacon.bid_window_s - time.time()
        if left <= 0:
            return
        bid = Bid(task_id=beacon.task_id, requester=beacon.requester,
                  bidder=self.node.peer_id, match=match, load=self._in_hand,
                  expected_latency_s=round(self._latency_s, 3), scorer=scorer)
        body, sig = seal(bid, self.node.key_pair.private_key)
        self._promise(beacon.task_id, beacon.requester, beacon.bid_window_s, beacon.deadline_s)
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
        self._publish_event("task.bid_sent", task_id=beacon.task_id,
                            requester=beacon.requester, match=round(match, 4),
                            accepted=reply.accepted, reason=reply.reason)

    async def _match(self, requirement: str) -> tuple[float, str]:
        skills = self._skills()
        if not skills:
            return 0.0, "none"
        if isinstance(self.matcher, LexicalMatcher):
            score = self.matcher.match(requirement, skills)
        else:
            try:
                score = await trio.to_thread.run_sync(self.matcher.match, requirement, skills)
            except Exception:
                log.warning("skill matching failed; scoring lexically", exc_info=True)
                return LexicalMatcher().match(requirement, skills), "lexical"
        return (score if math.isfinite(score) else 0.0), self.matcher.name

    def _promise(self, task_id: str, requester: str, bid_window_s: float,
                 deadline_s: float) -> None:
        now = time.time()
        while self._promises:  # drop expired promises, oldest first
            oldest = next(iter(self._promises.values()))
            if oldest.expires_at > now and len(self._promises) < MAX_PROMISES:
                break
            self._promises.popitem(last=False)
        self._promises[task_id] = _Promise(
            requester, now + bid_window_s + PROMISE_ROUNDS * deadline_s + 30.0)

    # ---- worker: solving -------------------------------------------------------------------

    async def _serve_task(self, peer: str, request: TaskRequest) -> SignedAnswer:
        request.check()
        promise = self._promises.get(request.task_id)
        if promise is None or promise.requester != peer or promise.expires_at < time.time():
            raise PeerError(f"task {request.task_id!r:.70}: we made {peer} no bid on it",
                            reason="unknown_task")
        if promise.started:
            raise PeerError(f"task {request.task_id} asked for twice", reason="duplicate_task")
        promise.started = True
        if self.solver is None or not self.solver.capable():
            raise Unavailable("this peer cannot solve tasks right now")
        self._in_hand += 1
        t0 = time.perf_counter()
        try:
            self._publish_event("task.solving", task_id=request.task_id, requester=peer)
            with trio.move_on_after(request.deadline_s) as scope:
                if self._test_delay_s > 0:
                    await trio.sleep(self._test_delay_s)
                async with self._solving:
                    solution = await self.solver.solve(request)
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
        answer = Answer(task_id=request.task_id, requester=peer, worker=self.node.peer_id,
                        answer=solution.answer[:MAX_ANSWER_CHARS],
                        cot=solution.cot[:MAX_COT_CHARS],
                        confidence=min(1.0, max(0.0, solution.confidence)),
                        tokens=solution.tokens, elapsed_s=round(elapsed, 3))
        body, sig = seal(answer, self.node.key_pair.private_key)
        self._publish_event("task.solved", task_id=request.task_id, requester=peer,
                            answer=answer.answer[:200], elapsed_s=answer.elapsed_s)
        return SignedAnswer(body=body, sig=sig)

    # ---- bookkeeping -----------------------------------------------------------------

    def _remember(self, record: TaskRecord) -> None:
        self.records[record.id] = record
        while len(self.records) > MAX_RECORDS:
            self.records.popitem(last=False)

    def _publish_event(self, type_: str, **data: Any) -> None:
        self.node.events.publish(type_, **data)


def seat_seed(task_id: str, seat: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{task_id}:{seat}".encode()).digest()[:7], "big")


def _load_book(node: Node) -> ReputationBook:
    path = Path(node.config.data_dir) / REPUTATION_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    return ReputationBook.from_json(node.peer_id, data)


def _save_book(node: Node, book: ReputationBook) -> None:
    """Small and rare (once a task): written in place, atomically."""
    path = Path(node.config.data_dir) / REPUTATION_FILE
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(book.to_json()))
        os.replace(tmp, path)
