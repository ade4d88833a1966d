"""Fair turns at the compute: the deficit round robin rule on its own (shares, order,
no starvation, the choice in O(peers), cancellation), then `Turns` handing one turn at a
time to trio tasks (order of service, cancelled waiters and holders, counters) on
trio's mock clock."""

from __future__ import annotations

import contextlib
import random
from collections import deque

import pytest
import trio
import trio.testing

from peerd.turns import DeficitRoundRobin, Job, Turns


def drain(drr: DeficitRoundRobin) -> list[Job]:
    out = []
    while (job := drr.pop()) is not None:
        out.append(job)
    return out


def classic_drr(jobs: list[tuple[str, int]], quanta: dict[str, int]) -> list[tuple[str, int]]:
    """Shreedhar and Varghese's loop, visit by visit: the reference for a backlog."""
    queues: dict[str, deque[int]] = {}
    for peer, cost in jobs:
        queues.setdefault(peer, deque()).append(cost)
    active = deque(queues)  # in order of first arrival
    deficit = dict.fromkeys(queues, 0)
    served = []
    while active:
        peer = active.popleft()
        deficit[peer] += quanta[peer]
        queue = queues[peer]
        while queue and queue[0] <= deficit[peer]:
            cost = queue.popleft()
            deficit[peer] -= cost
            served.append((peer, cost))
        if queue:
            active.append(peer)
        else:
            deficit[peer] = 0
    return served


# --- the rule ------------------------------------------------------------------------


def test_a_peer_alone_runs_at_once_in_fifo_order() -> None:
    drr = DeficitRoundRobin(quantum=1)
    jobs = [drr.push("a", cost) for cost in (10**15, 3, 10**12)]
    assert len(drr) == 3 and drr.queued("a") == 3
    assert drain(drr) == jobs  # work-conserving: no empty rounds are waited for
    assert drr.pop() is None and len(drr) == 0


def test_shares_under_backlog_follow_the_quanta() -> None:
    drr = DeficitRoundRobin(quantum=100, quanta={"b": 200, "c": 300})
    for _ in range(100):
        for peer in "abc":
            drr.push(peer, 100)
    served = [drr.pop() for _ in range(60)]  # ten rounds: 1 + 2 + 3 jobs each
    cost = {peer: sum(j.cost for j in served if j and j.peer_id == peer) for peer in "abc"}
    assert cost == {"a": 1000, "b": 2000, "c": 3000}
    assert [j.peer_id for j in served[:6] if j] == ["a", "b", "b", "c", "c", "c"]


def test_uneven_costs_get_shares_within_one_job_and_one_quantum() -> None:
    rng = random.Random(24)
    quanta = {"a": 50, "b": 100, "c": 150}
    drr = DeficitRoundRobin(quantum=50, quanta={"b": 100, "c": 150})
    for _ in range(400):
        for peer in quanta:
            drr.push(peer, rng.randint(1, 120))
    served = [drr.pop() for _ in range(300)]
    cost = {peer: sum(j.cost for j in served if j and j.peer_id == peer) for peer in quanta}
    rounds = {peer: cost[peer] / q for peer, q in quanta.items()}
    # each has had the same number of visits (give or take the one in progress), and a
    # peer's cost served trails its quanta by less than one job
    assert max(rounds.values()) - min(rounds.values()) < 1 + 120 / 50


def test_a_small_job_runs_after_the_big_one_running_not_after_the_backlog() -> None:
    drr = DeficitRoundRobin(quantum=64)
    flood = [drr.push("greedy", 2048) for _ in range(5)]
    assert drr.pop() is flood[0]  # running
    small = drr.push("honest", 1)
    assert drr.pop() is small
    assert drain(drr) == flood[1:]


def test_each_peer_is_served_in_its_own_order() -> None:
    rng = random.Random(7)
    drr = DeficitRoundRobin(quantum=10)
    pushed = [drr.push(rng.choice("abcd"), rng.randint(0, 40)) for _ in range(200)]
    served = drain(drr)
    assert sorted(map(id, served)) == sorted(map(id, pushed))
    for peer in "abcd":
        assert [j for j in served if j.peer_id == peer] == \
            [j for j in pushed if j.peer_id == peer]


def test_a_job_bigger_than_the_quantum_is_not_starved() -> None:
    drr = DeficitRoundRobin(quantum=10)
    big = drr.push("big", 1000)
    drr.push("small", 10)
    smalls = 0
    while drr.pop() is not big:
        smalls += 1
        assert smalls < 1000, "the big job never ran"
        drr.push("small", 10)  # the other peer never stops asking
    # each round runs one small job and adds 10 to the big one's deficit: in the
    # hundredth, the big one's visit comes first and its deficit covers it
    assert smalls == 99


def test_the_choice_does_not_loop_over_rounds() -> None:
    # With quantum 1, a visit-by-visit loop would need ~1e18 rounds here.
    drr = DeficitRoundRobin(quantum=1)
    for i in range(50):
        drr.push(f"p{i}", 10**18 + (i * 7919) % 50)
    served = drain(drr)
    assert [j.cost for j in served] == sorted(j.cost for j in served)
    assert served[0].peer_id == "p0"  # cost 1e18 + 0: the fewest rounds


def test_the_order_is_classic_deficit_round_robin() -> None:
    rng = random.Random(2024)
    for _ in range(200):
        peers = [f"p{i}" for i in range(rng.randint(1, 6))]
        quanta = {p: rng.randint(1, 60) for p in peers}
        jobs = [(rng.choice(peers), rng.randint(0, 200)) for _ in range(rng.randint(1, 40))]
        drr = DeficitRoundRobin(quantum=1, quanta=quanta)
        for peer, cost in jobs:
            drr.push(peer, cost)
        assert [(j.peer_id, j.cost) for j in drain(drr)] == classic_drr(jobs, quanta)


def test_a_cancelled_job_never_runs() -> None:
    drr = DeficitRoundRobin(quantum=10)
    a1, a2, a3 = (drr.push("a", 5) for _ in range(3))
    assert drr.cancel(a2) and len(drr) == 2 and drr.queued("a") == 2
    assert not drr.cancel(a2)
    assert drr.pop() is a1
    assert not drr.cancel(a1)  # running: no longer queued
    assert drain(drr) == [a3]


def test_an_emptied_queue_leaves_the_round_and_loses_its_deficit() -> None:
    drr = DeficitRoundRobin(quantum=100)
    a = drr.push("a", 30)
    b = drr.push("b", 300)
    assert drr.pop() is a and drr.deficit("a") == 0  # 70 left, but idle credit is dropped
    assert drr.pop() is b
    c = drr.push("c", 300)
    big = drr.push("a", 300)
    drr.cancel(big)  # a's only job: a leaves the round at once
    assert drr.queued("a") == 0 and drr.deficit("a") == 0
    again = drr.push("a", 300)  # and comes back last, from nothing
    assert drain(drr) == [c, again]


def test_cancelling_the_visited_peers_last_job_moves_the_round_on() -> None:
    drr = DeficitRoundRobin(quantum=10)
    a1, a2 = drr.push("a", 10), drr.push("a", 10)
    b = drr.push("b", 10)
    assert drr.pop() is a1  # a's visit: its deficit is spent
    drr.cancel(a2)
    assert drain(drr) == [b]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        DeficitRoundRobin(quantum=0)
    with pytest.raises(ValueError):
        DeficitRoundRobin(quantum=1, quanta={"a": 0})
    with pytest.raises(ValueError):
        DeficitRoundRobin(quantum=1).push("a", -1)


# --- turns for trio tasks ----------------------------------------------------------


async def test_a_free_turn_is_taken_at_once(autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns(quantum=1)
    assert not turns.busy and turns.waiting == 0
    async with turns.take("a", 10**9):
        assert turns.busy and turns.waiting == 0
        await trio.sleep(2)
    assert not turns.busy
    a = turns.stats()["a"]
    assert (a.turns, a.cost, a.waited_s, a.held_s, a.queued) == (1, 10**9, 0.0, 2.0, 0)


async def test_waiters_are_served_in_deficit_round_robin_order(
        autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns(quantum=64)
    order: list[str] = []
    release = trio.Event()

    async def hold() -> None:
        async with turns.take("first", 1):
            await release.wait()

    async def job(peer: str, cost: int, name: str) -> None:
        async with turns.take(peer, cost):
            order.append(name)
            await trio.sleep(cost / 1000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):  # queued in this order
            nursery.start_soon(job, "greedy", 2048, f"g{i}")
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(job, "honest", 1, "h0")
        await trio.testing.wait_all_tasks_blocked()
        assert turns.waiting == 4 and turns.busy
        assert turns.stats()["greedy"].queued == 3
        release.set()
    # the honest job passes the greedy backlog; greedy keeps its own order
    assert order == ["h0", "g0", "g1", "g2"]


async def test_a_cancelled_waiter_leaves_and_never_holds(
        autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns(quantum=1)
    entered: list[str] = []
    gone = trio.CancelScope()

    async def job(peer: str) -> None:
        async with turns.take(peer, 1):
            entered.append(peer)
            await trio.sleep(1)

    async def quitter() -> None:
        with gone:
            await job("quitter")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(job, "holder")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(quitter)  # queued first: next in line
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(job, "next")
        await trio.testing.wait_all_tasks_blocked()
        assert turns.waiting == 2
        gone.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert turns.waiting == 1 and turns.stats()["quitter"].queued == 0
    assert entered == ["holder", "next"]
    stats = turns.stats()
    assert (stats["quitter"].turns, stats["quitter"].cancelled) == (0, 1)
    assert stats["next"].waited_s == 1.0
    assert turns.waiting == 0 and not turns.busy


@pytest.mark.parametrize("how", ["raises", "is cancelled"])
async def test_a_holder_that_fails_gives_the_turn_on(
        how: str, autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns(quantum=1)
    served: list[str] = []

    async def waiter() -> None:
        async with turns.take("waiter", 1):
            served.append("waiter")

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(5), pytest.raises(ValueError) if how == "raises" \
                else contextlib.nullcontext():
            async with turns.take("holder", 1):
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert turns.waiting == 1
                if how == "raises":
                    await trio.sleep(1)
                    raise ValueError("the forward failed")
                await trio.sleep_forever()
    assert served == ["waiter"]
    assert not turns.busy and turns.waiting == 0
    assert turns.stats()["holder"].held_s == (1.0 if how == "raises" else 5.0)
    assert turns.stats()["waiter"].waited_s == turns.stats()["holder"].held_s


async def test_a_turn_granted_to_a_task_cancelled_in_the_same_tick_is_passed_on(
        autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns(quantum=1)
    served: list[str] = []
    unlucky = trio.CancelScope()

    async def holder() -> None:
        async with turns.take("holder", 1):
            await trio.sleep(1)
            # the unlucky waiter is cancelled, but has not run yet when the turn it is
            # next for is handed to it
            unlucky.cancel()

    async def job(peer: str) -> None:
        async with turns.take(peer, 1):
            served.append(peer)

    async def unlucky_job() -> None:
        with unlucky:
            await job("unlucky")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(unlucky_job)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(job, "patient")
    assert served == ["patient"]
    stats = turns.stats()
    assert (stats["unlucky"].turns, stats["unlucky"].cancelled) == (0, 1)
    assert not turns.busy and turns.waiting == 0


async def test_counters_under_a_flood(autojump_clock: trio.testing.MockClock) -> None:
    """One peer floods 2048-position forwards from four sessions; another asks for one
    position at a time. Each honest turn waits for at most the one flood job running."""
    turns = Turns(quantum=64)
    per_position_s = 0.001
    flooding = True

    async def forward(peer: str, positions: int) -> None:
        async with turns.take(peer, positions):
            await trio.sleep(positions * per_position_s)

    async def flood() -> None:
        while flooding:
            await forward("greedy", 2048)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(32):
            await forward("honest", 1)
        flooding = False
    honest, greedy = turns.stats()["honest"], turns.stats()["greedy"]
    assert (honest.turns, honest.cost, honest.cancelled) == (32, 32, 0)
    assert honest.waited_s <= honest.turns * 2048 * per_position_s + 1e-9
    assert greedy.turns >= 32  # the flood is served too, between honest turns
    assert greedy.held_s == pytest.approx(greedy.turns * 2048 * per_position_s)
    total = turns.totals()
    assert total.turns == honest.turns + greedy.turns
    assert total.cost == honest.cost + greedy.cost
    assert total.held_s == pytest.approx(honest.held_s + greedy.held_s)
    assert total.waited_s == pytest.approx(honest.waited_s + greedy.waited_s)


async def test_stats_keep_the_costliest_peers_and_the_newest_and_add_up_the_rest(
        autojump_clock: trio.testing.MockClock) -> None:
    """Past `max_peers`, a peer new to the compute takes the place of the one that took
    the least, idle now, whose figures go to `other()`: the map stays bounded however
    many peers come and go, and the totals still count every turn."""
    turns = Turns(quantum=1, max_peers=2)
    costs = [5, 1, 7, 3, 9, 2]
    for i, cost in enumerate(costs):
        async with turns.take(f"p{i}", cost):
            await trio.sleep(1)
        assert len(turns.stats()) <= 2
    assert set(turns.stats()) == {"p4", "p5"}  # the costliest, and the newest
    other = turns.other()
    assert (other.turns, other.cost, other.held_s) == (4, 5 + 1 + 7 + 3, 4.0)
    total = turns.totals()
    assert (total.turns, total.cost, total.held_s) == (6, sum(costs), 6.0)


async def test_a_peer_waiting_or_holding_keeps_its_stats_until_it_is_done(
        autojump_clock: trio.testing.MockClock) -> None:
    """A peer with a turn held or queued is never folded away (its figures would be
    lost): the map may pass `max_peers` by the peers busy at once, and comes back
    under it as they finish."""
    turns = Turns(quantum=1, max_peers=2)

    async def job(peer: str, cost: int) -> None:
        async with turns.take(peer, cost):
            await trio.sleep(cost)

    async with trio.open_nursery() as nursery:
        for i in range(5):  # one holds, four wait: all busy
            nursery.start_soon(job, f"p{i}", i + 1)
            await trio.testing.wait_all_tasks_blocked()
        assert len(turns.stats()) == 5 and turns.waiting == 4
    assert len(turns.stats()) <= 2
    total = turns.totals()
    assert (total.turns, total.cost, total.held_s) == (5, 15, 15.0)
    assert total.waited_s == 1 + 3 + 6 + 10  # each waited for those before it
