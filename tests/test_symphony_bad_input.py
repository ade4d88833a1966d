"""A misbehaving peer in Symphony's protocols: forged or relayed bids, bids for tasks
nobody announced, absurd beacons, forged, misdirected and oversized answers, tasks
nobody bid on. Each is refused, counted against that peer, and the node keeps
serving: an honest worker still gets elected and answers."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from peerd.agents.record import TaskRecord, TaskSpec
from peerd.agents.sealing import seal
from peerd.agents.symphony import Symphony
from peerd.node import Node
from peerd.rpc import call
from protocols.beacon import BID, TOPIC, Beacon, Bid, BidReply, SignedBid
from protocols.codec import decode, encode
from protocols.errors import RemoteError
from protocols.framing import frame, read_frame
from protocols.task import MAX_COT_CHARS, TASK, Answer, SignedAnswer, TaskRequest
from tests.harness import Rogue, dial, events, rejections, rogue_host, swarm, wait_for
from tests.symphony import FakeSolver, FixedMatcher, SlowMatcher, ready_to_elect, symphonies

SKILL = "arithmetic word problems"
QUESTION = "What is 40 + 2?"


@contextlib.asynccontextmanager
async def requester_worker_rogue(
        tmp_path: Path, *, pubsub: bool = False, worker_matcher: Any = None,
) -> AsyncIterator[tuple[Symphony, Node, Node, Rogue]]:
    """Requester A (no model), honest worker B, and a rogue host connected to A."""
    async with swarm(2, tmp_path, connect="line") as (a, b), \
            rogue_host(tmp_path, pubsub=pubsub) as rogue, \
            symphonies([a, b], [None, FakeSolver()], [None, worker_matcher],
                       [[], [SKILL]]) as (service, _):
        await ready_to_elect(a, [b])
        await dial(rogue.host, a)
        yield service, a, b, rogue


def assert_counted(node: Node, peer: str, reason: str) -> None:
    assert node.offences[peer][reason] >= 1, dict(node.offences[peer])
    assert rejections(node).get(reason, 0) >= 1, rejections(node)
    assert events(node, "peer.offence", peer_id=peer, reason=reason)


async def start_task(service: Symphony, nursery: trio.Nursery, **spec: Any) -> trio.Event:
    """Run a task in the background; returns when its beacon is out. The event is set
    when the task is over (its record is the newest in service.requester.records)."""
    done = trio.Event()
    settings: dict[str, Any] = {"workers": 1, "requirement": SKILL, "answer_format": "number",
                                "deadline_s": 10.0, "bid_window_s": 3.0} | spec

    async def run() -> None:
        try:
            await service.run_task(TaskSpec(QUESTION, **settings))
        finally:
            done.set()

    before = len(service.requester.records)
    nursery.start_soon(run)
    await wait_for(lambda: len(service.requester.records) > before, 5, "the task to start")
    return done


def newest(service: Symphony) -> TaskRecord:
    return next(reversed(service.requester.records.values()))


async def still_serves(service: Symphony, worker: Node) -> None:
    record = await service.run_task(TaskSpec(QUESTION, workers=1, requirement=SKILL,
                                             answer_format="number", deadline_s=10.0,
                                             bid_window_s=3.0))
    assert record.answer == "42"
    assert record.elected == [worker.peer_id]


def bid_of(rogue: Rogue, task_id: str, requester: str, **fields: Any) -> Bid:
    return Bid(**{"task_id": task_id, "requester": requester, "bidder": rogue.peer_id,
                  "match": 1.0, "load": 0, "expected_latency_s": 0.0} | fields)


# ---- bids -----------------------------------------------------------------------------


async def test_forged_and_relayed_bids_are_refused_and_counted(tmp_path: Path) -> None:
    async with requester_worker_rogue(tmp_path) as (service, a, b, rogue), \
            trio.open_nursery() as nursery:
        done = await start_task(service, nursery, bid_window_s=5.0)
        task_id = newest(service).id
        # Signed with garbage.
        body = encode(bid_of(rogue, task_id, a.peer_id))
        with pytest.raises(RemoteError) as err:
            await call(rogue.host, a.peer_id, BID, SignedBid(body=body, sig=b"\1" * 64))
        assert err.value.code == "bad_signature"
        assert_counted(a, rogue.peer_id, "bad_signature")
        # Claiming to be b, signed by the rogue's own key.
        body, sig = seal(bid_of(rogue, task_id, a.peer_id, bidder=b.peer_id),
                         rogue.key_pair.private_key)
        with pytest.raises(RemoteError) as err:
            await call(rogue.host, a.peer_id, BID, SignedBid(body=body, sig=sig))
        assert err.value.code == "bad_signature"
        # b's genuine bid, relayed by the rogue.
        body, sig = seal(bid_of(rogue, task_id, a.peer_id, bidder=b.peer_id),
                         b.key_pair.private_key)
        with pytest.raises(RemoteError) as err:
            await call(rogue.host, a.peer_id, BID, SignedBid(body=body, sig=sig))
        assert err.value.code == "impersonation"
        # A lie about its match that no honest peer sends.
        body, sig = seal(bid_of(rogue, task_id, a.peer_id, match=7.0),
                         rogue.key_pair.private_key)
        with pytest.raises(RemoteError) as err:
            await call(rogue.host, a.peer_id, BID, SignedBid(body=body, sig=sig))
        assert err.value.code == "malformed"
        with trio.fail_after(15):
            await done.wait()
        record = newest(service)
        assert record.elected == [b.peer_id] and record.answer == "42"
        assert rogue.peer_id not in record.bids
        assert not a.offences.get(b.peer_id)


async def test_bid_for_an_unknown_task_is_refused_and_counted(tmp_path: Path) -> None:
    async with requester_worker_rogue(tmp_path) as (service, a, b, rogue):
        body, sig = seal(bid_of(rogue, "never-announced", a.peer_id),
                         rogue.key_pair.private_key)
        with pytest.raises(RemoteError) as err:
            await call(rogue.host, a.peer_id, BID, SignedBid(body=body, sig=sig))
        assert err.value.code == "unknown_task"
        assert_counted(a, rogue.peer_id, "unknown_task")
        # A bid on a task that is over is merely late: refused, not an offence.
        await still_serves(service, b)
        body, sig = seal(bid_of(rogue, newest(service).id, a.peer_id),
                         rogue.key_pair.private_key)
        reply = await call(rogue.host, a.peer_id, BID, SignedBid(body=body, sig=sig))
        assert reply == BidReply(accepted=False, reason="closed")
        assert a.offences[rogue.peer_id]["unknown_task"] == 1


# ---- beacons ----------------------------------------------------------------------------


def beacon(publisher: str, **fields: Any) -> Beacon:
    settings: dict[str, Any] = {
        "task_id": "t-" + str(time.monotonic_ns()), "requester": publisher,
        "requirement": SKILL, "workers": 1, "answer_format": "number",
        "issued_at": time.time(), "bid_window_s": 2.0, "deadline_s": 30.0}
    return Beacon(**(settings | fields))


@pytest.mark.parametrize(("fields", "reason"), [
    ({"workers": 10_000}, "bad_beacon"),
    ({"workers": 0}, "bad_beacon"),
    ({"deadline_s": 1e9}, "bad_beacon"),
    ({"deadline_s": float("nan")}, "bad_beacon"),
    ({"bid_window_s": 3600.0}, "bad_beacon"),
    ({"issued_at": time.time() + 86400}, "bad_beacon"),
    ({"answer_format": "poem"}, "bad_beacon"),
    ({"requester": "12D3KooWSomebodyElse"}, "impersonation"),
], ids=["workers-huge", "workers-zero", "deadline-huge", "deadline-nan", "window-huge",
        "future", "format", "not-the-publisher"])
async def test_absurd_beacons_are_refused_counted_and_not_bid_on(
        tmp_path: Path, fields: dict[str, Any], reason: str) -> None:
    async with requester_worker_rogue(tmp_path, pubsub=True) as (service, a, b, rogue):
        assert rogue.pubsub is not None
        await wait_for(lambda: ID.from_base58(a.peer_id) in
                       rogue.pubsub.peer_topics.get(TOPIC, set()),  # type: ignore[union-attr]
                       10, "the rogue learns a follows beacons")
        await rogue.publish(encode(beacon(rogue.peer_id, **fields)), topic=TOPIC)
        await wait_for(lambda: a.offences[rogue.peer_id][reason] >= 1, 10,
                       f"a counts {reason} against the rogue")
        assert_counted(a, rogue.peer_id, reason)
        assert not events(b, "task.bid_sent")  # b never saw it: a did not forward it
        await still_serves(service, b)


# ---- answers ------------------------------------------------------------------------------


def serve_task(rogue: Rogue, reply: Any, delay_s: float) -> None:
    """The rogue answers /peerd/task with `reply(request)` (raw bytes) after `delay_s`."""

    async def handler(stream: Any) -> None:
        try:
            with trio.move_on_after(10):
                raw = await read_frame(stream, TASK.max_request_bytes)
                from protocols.codec import decode
                request = decode(raw, TaskRequest)
                await trio.sleep(delay_s)
                await stream.write(reply(request))
        except Exception:
            pass
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    rogue.host.set_stream_handler(TProtocol(TASK.id), handler)


def answer_from(rogue: Rogue, request: TaskRequest, requester: str, **fields: Any) -> Answer:
    return Answer(**{"task_id": request.task_id, "requester": requester,
                     "worker": rogue.peer_id, "answer": "666", "cot": "trust me",
                     "confidence": 1.0} | fields)


BAD_ANSWERS = {
    "forged": ("bad_signature", lambda r, q, a: frame(encode(SignedAnswer(
        body=encode(answer_from(r, q, a)), sig=b"\2" * 64)))),
    "oversized-cot": ("oversized", lambda r, q, a: _signed(r, answer_from(
        r, q, a, cot="x" * (MAX_COT_CHARS + 1)))),
    "oversized-frame": ("oversized", lambda r, q, a: _signed(r, answer_from(
        r, q, a, cot="y" * (TASK.max_response_bytes + 10)))),
    "other-task": ("wrong_task", lambda r, q, a: _signed(r, answer_from(
        r, q, a, task_id="another-task"))),
    "confidence": ("malformed", lambda r, q, a: _signed(r, answer_from(r, q, a,
                                                                        confidence=1e9))),
}


def _signed(rogue: Rogue, answer: Answer) -> bytes:
    body, sig = seal(answer, rogue.key_pair.private_key)
    return frame(encode(SignedAnswer(body=body, sig=sig)))


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
async def test_bad_answers_are_refused_counted_and_the_seat_falls_back(
        tmp_path: Path, case: str) -> None:
    reason, make = BAD_ANSWERS[case]
    # b's bid comes half a second late, after the rogue's, so the rogue gets the seat and
    # b is the next bidder when the rogue's answer is refused.
    async with requester_worker_rogue(tmp_path, worker_matcher=SlowMatcher(0.5)) \
            as (service, a, b, rogue), trio.open_nursery() as nursery:
        serve_task(rogue, lambda request: make(rogue, request, a.peer_id), delay_s=1.2)
        done = await start_task(service, nursery, bid_window_s=5.0)
        task_id = newest(service).id
        body, sig = seal(bid_of(rogue, task_id, a.peer_id), rogue.key_pair.private_key)
        reply = await call(rogue.host, a.peer_id, BID, SignedBid(body=body, sig=sig))
        assert reply.accepted
        with trio.fail_after(20):
            await done.wait()
        record = newest(service)
        assert record.elected == [rogue.peer_id]
        assert [(f.peer_id, f.reason, f.replacement) for f in record.fallbacks] == [
            (rogue.peer_id, reason, b.peer_id)]
        assert record.answer == "42" and [v.peer_id for v in record.votes] == [b.peer_id]
        assert_counted(a, rogue.peer_id, reason)
        assert service.requester.book.own()[rogue.peer_id] < 0.5


async def test_a_task_nobody_bid_on_is_refused_by_the_worker(tmp_path: Path) -> None:
    async with requester_worker_rogue(tmp_path) as (service, _a, b, rogue):
        await dial(rogue.host, b)
        request = TaskRequest(task_id="free-compute", question=QUESTION,
                              answer_format="number", temperature=0.0, seed=1,
                              max_tokens=16, deadline_s=5.0)
        with pytest.raises(RemoteError) as err:
            await call(rogue.host, b.peer_id, TASK, request)
        assert err.value.code == "unknown_task"
        assert_counted(b, rogue.peer_id, "unknown_task")
        await still_serves(service, b)


# ---- a no-show: bids on every beacon, never answers --------------------------------------


def never_answer(rogue: Rogue, asked: list[TaskRequest]) -> None:
    """The rogue takes every task it is given and then says nothing, holding the stream."""

    async def handler(stream: Any) -> None:
        try:
            with trio.move_on_after(60):
                asked.append(decode(await read_frame(stream, TASK.max_request_bytes),
                                    TaskRequest))
                await trio.sleep_forever()
        except Exception:
            pass
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    rogue.host.set_stream_handler(TProtocol(TASK.id), handler)


async def bid_on_every_beacon(rogue: Rogue) -> None:
    """Bid match 1.0, load 0, no latency on every beacon heard, at once."""
    assert rogue.pubsub is not None
    subscription = await rogue.pubsub.subscribe(TOPIC)
    while True:
        beacon = decode((await subscription.get()).data, Beacon)
        body, sig = seal(bid_of(rogue, beacon.task_id, beacon.requester),
                         rogue.key_pair.private_key)
        with contextlib.suppress(Exception):
            await call(rogue.host, beacon.requester, BID, SignedBid(body=body, sig=sig))


async def test_a_peer_that_bids_on_everything_and_never_answers_loses_its_seats(
        tmp_path: Path) -> None:
    """Its seat is refilled at the deadline by the next bidder, the honest workers
    answer, its reputation falls, and in the next task its bid, however well it claims
    to match, is passed over while honest bidders can fill the seats."""
    # honest workers claim a fair match, and bid half a second after the rogue
    honest = [FixedMatcher(0.5, delay_s=0.5), FixedMatcher(0.5, delay_s=0.5)]
    async with swarm(3, tmp_path, connect="star") as (a, b, c), \
            rogue_host(tmp_path, pubsub=True) as rogue, \
            symphonies([a, b, c], [None, FakeSolver(), FakeSolver()], [None, *honest],
                       [[], [SKILL], [SKILL]]) as (service, _, _), \
            trio.open_nursery() as nursery:
        asked: list[TaskRequest] = []
        never_answer(rogue, asked)
        nursery.start_soon(bid_on_every_beacon, rogue)
        await ready_to_elect(a, [b, c])
        await dial(rogue.host, a)
        await wait_for(lambda: ID.from_base58(rogue.peer_id) in
                       a.pubsub.router.mesh.get(TOPIC, set()), 15,
                       "the rogue in the requester's beacon mesh")
        spec = TaskSpec(QUESTION, workers=1, requirement=SKILL, answer_format="number",
                        deadline_s=1.0, bid_window_s=5.0)
        record = await service.run_task(spec)
        assert record.elected == [rogue.peer_id]  # its claim of a perfect match won
        assert [t.task_id for t in asked] == [record.id]
        ((seat, peer, reason, replacement),) = [
            (f.seat, f.peer_id, f.reason, f.replacement) for f in record.fallbacks]
        assert (seat, peer, reason) == (0, rogue.peer_id, "deadline")
        assert replacement in (b.peer_id, c.peer_id)
        assert record.answer == "42" and [v.peer_id for v in record.votes] == [replacement]
        scores = service.requester.book.own()
        assert scores[rogue.peer_id] < 0.5 < scores[replacement]
        # the next task: it bids again, first and claiming 1.0, and is passed over
        record = await service.run_task(dataclasses.replace(spec, workers=2))
        assert rogue.peer_id in record.bids
        assert sorted(record.elected) == sorted([b.peer_id, c.peer_id])
        assert record.fallbacks == [] and record.answer == "42"
        assert len(asked) == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("window", [0.0, -1.0, 10.5, float("inf"), float("nan")])
def test_a_task_spec_refuses_a_bid_window_no_worker_would_bid_in(window: float) -> None:
    """Workers refuse a beacon whose window is past the protocol's limit (in silence:
    the requester would see only "no peer bid"), so the spec refuses it first."""
    with pytest.raises(ValueError, match="bid_window_s"):
        TaskSpec("What is 2 + 2?", bid_window_s=window)
    assert TaskSpec("What is 2 + 2?", bid_window_s=10.0).bid_window_s == 10.0
