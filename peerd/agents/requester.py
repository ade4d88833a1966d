"""Symphony's requester side: this peer's tasks, from beacon to vote.

`Requester.run_task`: publish a `Beacon` on gossip, collect signed bids
over `/peerd/bid/1.0.0` until every peer expected to bid has (or the bid window
closes), elect the best bidders (election.py), send each the question over
`/peerd/task/1.0.0` with its own temperature, seed and prompt set, replace any worker
that fails or misses its deadline with the next bidder, verify each signed answer,
measure each chain with our own model when we have one (solver.py), vote (voting.py),
update reputation (reputation.py), which Symphony (symphony.py) publishes in our
ledger entry. The worker side (worker.py) bids on other peers' beacons and answers.

Everything a peer sends is checked before it is used: bids and answers by signature,
task and requester. Refused input is counted against the sender (`Node.offence`).
Progress goes to the node's event bus (`task.*` events on /events). The reputation
book (JSON) and the task archive (SQLite) are written off the event loop.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from peerd.agents.answers import normalise
from peerd.agents.archive import TaskArchive
from peerd.agents.election import (
    Candidate,
    Election,
    Fallback,
    SeatResult,
    WorkFailed,
    fill_seats,
    run_election,
)
from peerd.agents.record import TaskRecord, TaskSpec, Vote
from peerd.agents.reputation import NoShows, ReputationBook, view
from peerd.agents.scored import keep
from peerd.agents.sealing import unseal
from peerd.agents.solver import Solver, prompt_sets
from peerd.agents.voting import Ballot, tally
from peerd.agents.worker import TaskWorker
from peerd.api.recall import ScoredRuns
from peerd.datadir import REPUTATION_FILE, TASKS_DB, keep_json, read_json
from peerd.ledger.book import Ledger
from peerd.node import Node
from peerd.rpc import call, stream_handler
from protocols.beacon import (
    BID,
    TOPIC,
    Beacon,
    Bid,
    BidReply,
    SignedBid,
)
from protocols.codec import encode
from protocols.errors import PeerError, RemoteError
from protocols.task import FEATURE_PROMPT_SETS, TASK, Answer, SignedAnswer, TaskRequest

log = logging.getLogger(__name__)

TEMPERATURES = (0.0, 0.7, 0.9, 0.5, 1.0, 0.8, 0.6, 0.4)  # seat_sampling
MAX_RECORDS = 256  # tasks kept in memory (finished ones are archived on disk too)
MAX_CLOSED = 4096  # recently closed task ids: a late bid is not an offence
MAX_RUNNING = 16  # tasks this peer requests at once
MEASURE_TIMEOUT_S = 120.0  # measuring a chain (local work); past it, the task votes on claims
NO_SHOWS = frozenset({"deadline", "unreachable"})  # a seat left without answer or refusal
# the seats are filled within this many worker deadlines, replacements included: bidders
# that take a seat and never answer cannot hold the task (and a MAX_RUNNING slot) longer
FILL_ROUNDS = 2


@dataclass(slots=True)
class _Open:
    """A task of ours still taking bids."""

    record: TaskRecord
    bids: trio.MemorySendChannel[Candidate]


class NoWorkers(Exception):
    """Nobody bid, or nobody answered; the message says which."""


class Requester:
    """The tasks this peer requests: elections, seats, votes and the reputation they
    earn the workers."""

    def __init__(self, node: Node, ledger: Ledger, solver: Solver | None,
                 worker: TaskWorker) -> None:
        self.node = node
        self.ledger = ledger
        self.solver = solver  # also measures the chains of our own tasks (voting.py)
        self.worker = worker  # bids on our own tasks too, as a reserve
        self.book_path = Path(node.config.data_dir) / REPUTATION_FILE
        self.book = ReputationBook.from_json(node.peer_id, read_json(self.book_path))
        self.no_shows = NoShows()  # ranked last by our elections for a while (reputation.py)
        self.records: OrderedDict[str, TaskRecord] = OrderedDict()  # recent, live
        self.archive = TaskArchive(Path(node.config.data_dir) / TASKS_DB)
        self._open: dict[str, _Open] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._running = trio.CapacityLimiter(MAX_RUNNING)

    def register(self) -> None:
        """The bid protocol's handler."""
        self.node.set_stream_handler(BID.id, stream_handler(BID, self._serve_bid,
                                                            self.node.offence))

    def close(self) -> None:
        self.archive.close()

    # ---- requester: one task, end to end -------------------------------------------------

    async def run_task(self, spec: TaskSpec, scored: ScoredRuns | None = None
                       ) -> TaskRecord:
        """Announce, elect, solve, vote; score a task with a reference, its run kept by
        `scored` (scored.py). NoWorkers when nobody bid or answered (the record stays)."""
        async with self._running:
            record = TaskRecord(secrets.token_hex(8), spec)
            self._remember(record)
            try:
                await self._run(record)
                if spec.reference is not None:
                    await keep(record, self.ledger, self.node.peer_id, scored)
            except BaseException as exc:
                record.status = "failed"
                record.error = record.error or f"{type(exc).__name__}: {exc}"
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.archive.put, record.id,
                                                  record.to_json())
                self._publish_event("task.done", task_id=record.id, status=record.status,
                                    answer=record.answer, total_ms=round(record.total_ms, 1))
            return record

    async def task(self, task_id: str) -> dict[str, Any] | None:
        """What GET /v1/tasks/{id} shows: a task of ours, live or finished (also before
        this daemon last restarted); None if it is not ours or long gone."""
        record = self.records.get(task_id)
        if record is not None:
            return record.to_json()
        return await trio.to_thread.run_sync(self.archive.get, task_id)

    async def _run(self, record: TaskRecord) -> None:
        spec = record.spec
        t0 = time.perf_counter()
        own = self.book.own()
        reports = {e.peer_id: e.reputation for e in self.ledger.entries()}

        def reputation(peer: str) -> float:
            return view(peer, self.node.peer_id, own, reports)

        election = Election(record.id, self.node.peer_id, spec.workers,
                            expected_bidders=self._expected_bidders(),
                            closes_at=trio.current_time() + spec.bid_window_s,
                            deadline_s=spec.deadline_s, reputation=reputation,
                            demoted=lambda p: self.no_shows.recent(p, time.monotonic()),
                            on_drop=lambda p: record.bids.pop(p, None))
        send, recv = trio.open_memory_channel[Candidate](64)
        self._open[record.id] = _Open(record, send)
        results: list[SeatResult[Vote]] = []
        try:
            # our own model measures each chain as it arrives, while other seats work
            async with trio.open_nursery() as measuring:
                async with trio.open_nursery() as nursery:
                    await self._announce(record)
                    await self._bid_on_own(record, send)
                    seats = await run_election(election, recv, nursery)
                    record.beacon_ms = (time.perf_counter() - t0) * 1e3
                    record.elected = [c.peer_id for c in seats]
                    self._publish_event("task.elected", task_id=record.id,
                                        elected=record.elected, bids=len(record.bids),
                                        beacon_ms=round(record.beacon_ms, 3))
                    if not seats:
                        nursery.cancel_scope.cancel()
                        return_early = True
                    else:
                        return_early = False
                    t1 = time.perf_counter()

                    async def work(seat: int, c: Candidate) -> Vote:
                        vote = await self._assign(record, seat, c, reputation(c.peer_id))
                        measuring.start_soon(self._measure, vote)  # not on the worker's clock
                        return vote

                    def on_fallback(f: Fallback) -> None:
                        record.fallbacks.append(f)
                        if f.reason in NO_SHOWS:
                            self.no_shows.missed(f.peer_id, time.monotonic())
                        self._publish_event("task.fallback", task_id=record.id, seat=f.seat,
                                            peer_id=f.peer_id, reason=f.reason,
                                            replacement=f.replacement)

                    if not return_early:
                        results, _ = await fill_seats(
                            election, seats, work, spec.deadline_s, on_fallback,
                            within_s=FILL_ROUNDS * spec.deadline_s)
                        record.solve_ms = (time.perf_counter() - t1) * 1e3
                    nursery.cancel_scope.cancel()  # the bid collector
                answered = time.perf_counter()
            record.measure_ms = (time.perf_counter() - answered) * 1e3  # after the last answer
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
        await trio.to_thread.run_sync(keep_json, self.book_path, self.book.to_json())
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
        spec = record.spec
        mine = await self.worker.own_bid(record.id, spec.effective_requirement,
                                         spec.min_match, spec.bid_window_s, spec.deadline_s)
        if mine is not None:
            record.bids[mine.peer_id] = mine
            send.send_nowait(mine)

    def _expected_bidders(self) -> int:
        """Peers in our ledger that could bid: they advertise a model or skills."""
        return sum(1 for e in self.ledger.entries()
                   if e.peer_id != self.node.peer_id and (e.models or e.skills))

    async def _assign(self, record: TaskRecord, seat: int, worker: Candidate,
                      reputation: float) -> Vote:
        """Have `worker` solve the task in `seat`; its verified vote, or WorkFailed."""
        spec = record.spec
        entry = self.ledger.get(worker.peer_id)
        temperature, prompt = seat_sampling(
            seat, spec.answer_format,
            takes_prompt=entry is not None and FEATURE_PROMPT_SETS in entry.features)
        request = TaskRequest(task_id=record.id, question=spec.question,
                              answer_format=spec.answer_format, temperature=temperature,
                              seed=seat_seed(record.id, seat), max_tokens=spec.max_tokens,
                              deadline_s=spec.deadline_s, prompt=prompt)
        self._publish_event("task.assigned", task_id=record.id, seat=seat,
                            peer_id=worker.peer_id, temperature=request.temperature,
                            prompt=request.prompt)
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
                    time.perf_counter() - t0, request)
        record.votes.append(vote)
        self.node.metrics.messages.labels("in", "task.answer").inc()
        self._publish_event("task.answer", task_id=record.id, seat=seat,
                            peer_id=worker.peer_id, answer=vote.answer,
                            confidence=vote.confidence, elapsed_s=round(vote.elapsed_s, 3))
        return vote

    async def _measure(self, vote: Vote) -> None:
        """Our own model's confidence in a chain that reached an answer (the vote weighs
        chains by it, voting.py), when we have a model that can measure it."""
        if vote.answer is None or self.solver is None:
            return  # (a solver that cannot measure now says so: None)
        with trio.move_on_after(MEASURE_TIMEOUT_S):
            vote.measured = await self.solver.measure(vote.request, vote.cot)

    def _settle(self, record: TaskRecord, results: list[SeatResult[Vote]]) -> None:
        """Vote, then score every worker that held a seat."""
        result = tally(Ballot(v.peer_id, v.answer, v.confidence, v.match, v.reputation,
                              v.measured) for v in record.votes)
        for v in record.votes:
            v.weight = result.weights.get(v.peer_id, 0.0)
        record.answer = result.answer
        now = time.time()
        for seat in results:
            delivered = seat.worker.peer_id if seat.worker else None
            for peer in seat.tried:
                answered = peer == delivered and seat.result is not None
                if answered:
                    self.no_shows.delivered(peer)
                agreed = (answered and result.answer is not None
                          and seat.result is not None and seat.result.answer == result.answer)
                self.book.observe(peer, agreed=agreed, punctual=answered, now=now)

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

    # ---- bookkeeping -----------------------------------------------------------------

    def _remember(self, record: TaskRecord) -> None:
        self.records[record.id] = record
        while len(self.records) > MAX_RECORDS:
            self.records.popitem(last=False)

    def _publish_event(self, type_: str, **data: Any) -> None:
        self.node.events.publish(type_, **data)


def seat_sampling(seat: int, answer_format: str, *, takes_prompt: bool = True
                  ) -> tuple[float, int]:
    """(temperature, prompt set) for a seat. While the format has example sets to go
    round, each seat decodes greedily from its own set (chains that differ, each as
    good as a greedy chain); the seats after them sample at TEMPERATURES[1:] in turn.
    A worker that takes no prompt sets (`takes_prompt` False: its software predates
    TaskRequest.prompt) gets set 0, greedy in seat 0 and sampled in the others."""
    if not takes_prompt:
        return TEMPERATURES[seat % len(TEMPERATURES)], 0
    sets = prompt_sets(answer_format)
    if seat < sets:
        return 0.0, seat
    return TEMPERATURES[1 + (seat - sets) % (len(TEMPERATURES) - 1)], seat % sets


def seat_seed(task_id: str, seat: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{task_id}:{seat}".encode()).digest()[:7], "big")


