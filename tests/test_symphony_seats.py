"""A worker's task seats in fair shares: the pure rules (seats.py, on plain numbers for
time), then over real in-process hosts a greedy requester that beacons many tasks at
once, and an honest requester whose task still gets the worker's bid once a seat frees."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from peerd.agents.record import TaskRecord, TaskSpec
from peerd.agents.requester import NoWorkers
from peerd.agents.seats import MAX_WANTING, NoSeat, OverShare, Seats
from peerd.agents.symphony import Symphony
from peerd.agents.worker import MAX_LOAD_TO_BID, MAX_SOLVING
from peerd.shares import Grant
from tests.harness import events, rejections, swarm, wait_for
from tests.symphony import FakeSolver, ready_to_elect, symphonies

SKILL = "arithmetic word problems"

# ---- the rules ----------------------------------------------------------------------------


def fill(seats: Seats, requester: str, n: int, now: float = 0.0) -> None:
    for i in range(n):
        assert seats.take(requester, f"{requester}-{i}", now, lapses_at=None) == Grant()


def test_a_requester_alone_may_take_every_seat_and_waits_without_offence() -> None:
    seats = Seats(4)
    fill(seats, "greedy", 4)
    assert seats.take("greedy", "g-5", 0.0, lapses_at=None, wants_until=10.0) == NoSeat(4)
    assert seats.held() == {"capacity": 4, "used": 4, "held": {"greedy": 4}}


def test_a_freed_seat_goes_to_the_requester_waiting_not_to_the_one_over_its_share() -> None:
    seats = Seats(4)
    fill(seats, "greedy", 4)
    assert seats.take("honest", "h-1", 1.0, lapses_at=None, wants_until=10.0) == NoSeat(0)
    assert seats.wanting(1.0) == {"honest": 1}
    # honest waits: greedy holds 4, its share is 3
    assert seats.take("greedy", "g-5", 2.0, lapses_at=None) == OverShare(4, 3.0, ("honest",))
    assert seats.release("greedy", "greedy-0")
    assert seats.take("greedy", "g-5", 3.0, lapses_at=None) == OverShare(3, 3.0, ("honest",))
    assert seats.take("honest", "h-1", 3.0, lapses_at=None) == Grant()
    assert seats.held()["held"] == {"greedy": 3, "honest": 1}
    assert seats.wanting(3.0) == {}  # it holds what it waited for
    # nobody waits now: the next seat freed may go back to greedy
    assert seats.release("greedy", "greedy-1")
    assert seats.take("greedy", "g-5", 4.0, lapses_at=None) == Grant()


def test_a_requester_within_its_share_waits_for_one_holding_fewer_without_offence() -> None:
    seats = Seats(4)
    fill(seats, "a", 2)
    fill(seats, "b", 2)
    assert seats.take("c", "c-0", 0.0, lapses_at=None, wants_until=5.0) == NoSeat(0)
    assert seats.release("b", "b-0")
    # b holds 1 (within its share of 4/3) but c waits holding none: c goes first
    assert seats.take("b", "b-9", 1.0, lapses_at=None, wants_until=5.0) == NoSeat(1)
    assert seats.take("c", "c-0", 1.0, lapses_at=None) == Grant()
    # a seat frees: a, holding its share (2 of 4 while b wants 2), is refused it
    assert seats.release("c", "c-0")
    assert seats.take("a", "a-9", 2.0, lapses_at=None) == OverShare(2, 2.0, ("b",))
    assert seats.take("b", "b-9", 2.0, lapses_at=None) == Grant()


def test_whole_seats_are_handed_out_when_the_fair_shares_are_fractions() -> None:
    """Six requesters and four seats: each share is 2/3 of a seat; the free seats still
    go to those holding none, first come, and nobody holding none is an offender."""
    seats = Seats(4)
    for i in range(6):
        assert seats.take(f"p{i}", "t", 0.0, lapses_at=None, wants_until=9.0) == (
            Grant() if i < 4 else NoSeat(0))
    assert seats.release("p0", "t")
    assert seats.take("p0", "u", 1.0, lapses_at=None, wants_until=9.0) == NoSeat(0)
    assert seats.take("p5", "t", 1.0, lapses_at=None) == Grant()
    assert seats.take("p1", "u", 1.0, lapses_at=None) == OverShare(
        1, pytest.approx(4 / 6), ("p0", "p4"))


def test_a_bid_never_taken_up_lapses_a_task_asked_for_does_not() -> None:
    seats = Seats(4)
    assert seats.take("r", "elected", 0.0, lapses_at=7.0) == Grant()
    assert seats.take("r", "passed-over", 0.0, lapses_at=8.0) == Grant()
    assert seats.hold("r", "elected")
    assert not seats.hold("other", "elected")  # task ids are per requester
    assert seats.next_lapse() == 8.0
    assert seats.lapse(7.9) == []
    assert seats.lapse(8.0) == [("r", "passed-over")]
    assert not seats.hold("r", "passed-over")  # a replacement asked later takes a new seat
    assert seats.held()["held"] == {"r": 1} and seats.next_lapse() is None
    assert seats.release("r", "elected") and not seats.release("r", "elected")
    assert seats.held() == {"capacity": 4, "used": 0, "held": {}}


def test_a_requester_waits_until_its_window_and_grace_are_over() -> None:
    seats = Seats(1)
    fill(seats, "g", 1)
    assert seats.take("h", "h-0", 0.0, lapses_at=None, wants_until=4.0) == NoSeat(0)
    assert seats.take("h", "h-1", 1.0, lapses_at=None, wants_until=2.0) == NoSeat(0)
    assert seats.wanting(3.9) == {"h": 1}  # a later beacon never shortens the wait
    assert seats.wanting(4.0) == {}
    assert seats.release("g", "g-0")
    assert seats.take("g", "g-1", 4.0, lapses_at=None) == Grant()
    # no more than MAX_WANTING are remembered; those that stop waiting first go first
    many = Seats(1)
    fill(many, "g", 1)
    for i in range(MAX_WANTING + 5):
        many.take(f"w{i}", "t", 0.0, lapses_at=None, wants_until=100.0 + i)
    waiting = many.wanting(0.0)
    assert len(waiting) == MAX_WANTING and "w0" not in waiting and f"w{MAX_WANTING + 4}" in waiting


# ---- over real hosts --------------------------------------------------------------------


def question(i: int) -> str:
    return f"What is {i} + {i}?"


async def test_a_greedy_requester_cannot_keep_an_honest_one_from_the_workers_bid(
        tmp_path: Path) -> None:
    """G beacons MAX_LOAD_TO_BID tasks; the only worker, W, bids on each and is elected:
    G holds every seat. H's beacon waits for a seat; G's next beacon, while H waits, is
    refused and counted. When one of G's tasks is answered, the seat goes to H: W bids,
    H elects W, W answers. The worker's solver takes its turn only when the test says,
    so what happens is decided by order, not by timing."""
    async with swarm(3, tmp_path, connect="star") as nodes:
        worker, greedy, honest = nodes
        gate = trio.Semaphore(0, max_value=64)  # each solve takes one token
        solver = FakeSolver(gate=gate)
        async with symphonies(nodes, [solver, None, None], skills=[[SKILL], [], []]) \
                as (w_service, g_service, h_service):
            await ready_to_elect(greedy, [worker])
            await ready_to_elect(honest, [worker])
            seats = w_service.worker.seats
            spec = {"workers": 1, "requirement": SKILL, "answer_format": "number",
                    "deadline_s": 60.0, "bid_window_s": 8.0}
            records: dict[str, TaskRecord] = {}
            failed: list[str] = []

            async def run(name: str, service: Symphony, q: str) -> None:
                try:
                    records[name] = await service.run_task(TaskSpec(q, **spec))
                except NoWorkers:
                    failed.append(name)

            async with trio.open_nursery() as nursery:
                for i in range(MAX_LOAD_TO_BID):
                    nursery.start_soon(run, f"g{i}", g_service, question(i))
                await wait_for(lambda: seats.held()["held"] == {greedy.peer_id: 4}, 15,
                               "the greedy requester holding every seat")
                await wait_for(lambda: len(solver.requests) == MAX_SOLVING, 15,
                               "the worker solving two of them")
                nursery.start_soon(run, "h", h_service, question(100))
                await wait_for(lambda: events(worker, "task.seat_wait",
                                              requester=honest.peer_id), 15,
                               "the honest beacon waiting for a seat")
                assert seats.wanting(trio.current_time()) == {honest.peer_id: 1}
                nursery.start_soon(run, "g-more", g_service, question(7))
                await wait_for(lambda: worker.offences[greedy.peer_id]["over_share"] >= 1,
                               15, "the greedy requester refused over its share")
                assert rejections(worker).get("over_share") == 1
                (offence,) = events(worker, "peer.offence", reason="over_share")
                assert offence.data["peer_id"] == greedy.peer_id
                assert honest.peer_id in offence.data["detail"]
                gate.release()  # one of G's tasks is answered: its seat frees
                await wait_for(lambda: seats.held()["held"] == {greedy.peer_id: 3,
                                                                 honest.peer_id: 1}, 15,
                               "the freed seat lent to the honest requester")
                metrics = worker.metrics.render().decode()
                assert f'peerd_lent{{peer="{honest.peer_id}",resource="seats"}} 1.0' in metrics
                assert 'peerd_lent_capacity{resource="seats"} 4.0' in metrics
                assert w_service.status()["lent"] == {"seats": seats.held()}
                for _ in range(64):
                    gate.release()
            h = records["h"]
            assert h.elected == [worker.peer_id] and h.answer == "200"
            assert list(h.bids) == [worker.peer_id]
            assert all(records[f"g{i}"].answer == str(2 * i) for i in range(4))
            assert failed == ["g-more"]  # no bid: it was over its share while H waited
            assert worker.offences[greedy.peer_id]["over_share"] == 1
            assert not worker.offences.get(honest.peer_id)
            await wait_for(lambda: seats.held()["used"] == 0, 15, "every seat given back")
            metrics = worker.metrics.render().decode()
            assert f'peerd_lent{{peer="{greedy.peer_id}",resource="seats"}}' not in metrics
