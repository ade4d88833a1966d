"""A peer that dies mid-call, between real in-process peers: its calls in flight move to
the others at once (the attempt there ends `unreachable`, not at its deadline, and no
offence is counted against a peer that only left); the next batch ranks it last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from pydantic import BaseModel

from peerd.node import Node
from peerd.plans.caller import UNREACHABLE
from peerd.plans.choice import rank
from peerd.plans.dispatch import Call, Dispatched
from peerd.plans.retry import RetryPolicy
from peerd.plans.service import Tools
from peerd.plans.tool import typed_tool
from tests.harness import connect_nodes, gossip, open_test_node, swarm, wait_for

# No heartbeat within the test: entries go out when refreshed and live 3 minutes, so the
# dead peer's is still in the ledger after it died, and no entry of it that it signed
# before it died is heard after its calls failed (a newer entry ends a suspicion, as the
# sign of a peer that is back)
HEARTBEAT_S = 60.0


class Wait(BaseModel):
    i: int


class Text(BaseModel):
    text: str


async def slow(args: Wait) -> Text:
    await trio.sleep(0.2)
    return Text(text=str(args.i))


def offering(node: Node, peers: list[Node]) -> bool:
    book = gossip(node).book
    return all((e := book.get(p.peer_id)) is not None and [t.name for t in e.tools]
               == ["slow"] for p in peers)


async def test_a_peer_that_dies_mid_call_is_routed_around_at_once(tmp_path: Path) -> None:
    """A, B and C offer `slow` (capacity 2 each); C's executions never end by
    themselves. A dispatches 6 calls under a 30 s per-attempt deadline; C's node is
    closed while it runs 2 of them. Both end there `unreachable` and complete on A or B
    well before the deadline could have passed (trio's clock, an order check); then a
    second batch ranks C last and runs on A and B alone."""
    running: list[int] = []

    async def stuck(args: Wait) -> Text:
        running.append(args.i)
        await trio.sleep_forever()
        raise AssertionError

    policy = RetryPolicy(attempt_deadline_s=30.0)
    stop, stopped = trio.Event(), trio.Event()
    async with swarm(2, tmp_path, connect="star", heartbeat_s=HEARTBEAT_S) as (a, b):
        ta = Tools(a, gossip(a), extra=[typed_tool("slow", "", slow, capacity=2)])
        await a.start(ta)
        await b.start(Tools(b, gossip(b), extra=[typed_tool("slow", "", slow, capacity=2)]))
        victim: list[Node] = []

        async def third(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with open_test_node(tmp_path / "n2", heartbeat_s=HEARTBEAT_S) as c:
                await connect_nodes(c, a)
                await c.start(Tools(c, gossip(c), extra=[typed_tool("slow", "", stuck,
                                                                   capacity=2)]))
                gossip(c).refresh()
                victim.append(c)
                task_status.started()
                await stop.wait()
            stopped.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(third)
            c = victim[0]
            gossip(a).refresh()
            gossip(b).refresh()
            await wait_for(lambda: offering(a, [a, b, c]), what="every `slow` in A's ledger")
            for peer in (b, c):  # the schema cached, as a planner has it
                assert isinstance(await ta.tools_of(peer.peer_id), list)
            first: list[Dispatched] = []
            began = trio.current_time()

            async def batch() -> None:
                first.extend(await ta.dispatch([Call("slow", {"i": i}) for i in range(6)],
                                               policy))

            nursery.start_soon(batch)
            await wait_for(lambda: len(running) == 2, what="two calls running on C")
            stop.set()
            await stopped.wait()
        makespan = trio.current_time() - began
        assert [d.outcome.value["text"] for d in first] == [str(i) for i in range(6)]  # type: ignore[union-attr]
        assert all(d.ok and d.peer != c.peer_id for d in first)
        moved = [d for d in first if d.attempts[0].peer == c.peer_id]
        assert len(moved) == 2
        for d in moved:
            dead, retry = d.attempts[0], d.attempts[1]
            assert (dead.code, dead.by) == (UNREACHABLE, "caller"), dead
            assert retry.code == "ok" and retry.peer in (a.peer_id, b.peer_id)
            # the retry began long before the dead attempt's deadline would have ended it
            assert dead.elapsed_s < policy.attempt_deadline_s
            assert d.elapsed_s < policy.attempt_deadline_s
        assert makespan < policy.attempt_deadline_s
        assert not a.offences.get(c.peer_id)  # it left; it did not misbehave

        # the next batch: C is still in A's ledger, suspected, ranked after A and B
        offers = {o.peer: o for _, o, _ in ta.offers("slow")}
        assert offers[c.peer_id].suspect and not offers[b.peer_id].suspect
        assert rank(offers.values())[-1].peer == c.peer_id
        second = await ta.dispatch([Call("slow", {"i": i}) for i in range(4)], policy)
        assert all(d.ok and len(d.attempts) == 1 for d in second)
        assert {d.peer for d in second} <= {a.peer_id, b.peer_id}
