"""The event bus behind GET /events: a subscriber's stream survives a wait cut short
(the SSE keep-alive does that every 15 s of quiet), replays recent history, and is
told how many events it lost when it fell behind."""

from __future__ import annotations

import trio

from peerd import events as events_module
from peerd.events import EventBus


async def test_a_wait_cut_short_loses_nothing_and_the_stream_goes_on() -> None:
    bus = EventBus()
    async with bus.subscribe() as stream:
        it = stream.__aiter__()
        for _ in range(3):  # three quiet keep-alive periods
            with trio.move_on_after(0.01):
                await it.__anext__()
                raise AssertionError("nothing was published")
        bus.publish("peer.connected", peer="a")
        got = await it.__anext__()
        assert (got.type, got.data) == ("peer.connected", {"peer": "a"})
        bus.publish("peer.disconnected", peer="a")
        assert (await it.__anext__()).type == "peer.disconnected"


async def test_replay_and_a_subscriber_that_fell_behind() -> None:
    bus = EventBus()
    bus.publish("ledger.accepted", seq=1)
    bus.publish("ledger.accepted", seq=2)
    async with bus.subscribe(replay=1) as stream:
        it = stream.__aiter__()
        assert (await it.__anext__()).data == {"seq": 2}
        sub = next(iter(bus._subscribers))
        for i in range(events_module.SUBSCRIBER_QUEUE + 5):
            bus.publish("ledger.accepted", seq=100 + i)
        lost = await it.__anext__()
        assert (lost.type, lost.data) == ("events.dropped", {"count": 5})
        assert (await it.__anext__()).data == {"seq": 105}  # the oldest kept
        assert sub.dropped == 0
    assert not bus._subscribers  # leaving the block unsubscribes
