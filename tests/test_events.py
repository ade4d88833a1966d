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


async def test_every_event_reaches_the_stream_as_strict_json() -> None:
    """An event whose data came from a peer (a NaN, bytes, a tuple key, a lone
    surrogate): json.dumps refused it inside every subscriber's stream at once, and in
    every replay while it was in the history; a NaN went out as the bare word NaN,
    which is not JSON."""
    import json
    from types import SimpleNamespace

    from peerd.api.app import _sse

    def strict(text: str) -> object:
        def refuse(word: str) -> None:
            raise ValueError(word)
        return json.loads(text, parse_constant=refuse)

    bus = EventBus()
    bus.publish("odd", nan=float("nan"), inf=[float("-inf")], raw=b"\x00\xff",
                keyed={(1, 2): "x", 3: "y"}, text="a\ud800b", items=("a", 1))
    bus.publish("plain", n=1)
    stream = _sse(SimpleNamespace(events=bus), replay=2, types=set())  # type: ignore[arg-type]
    assert (await stream.__anext__()).startswith(":")
    got = []
    for _ in range(2):
        chunk = await stream.__anext__()
        got.append(strict(chunk.split("data: ", 1)[1]))
    await stream.aclose()
    odd, plain = got
    assert isinstance(odd, dict) and isinstance(plain, dict)
    assert odd["nan"] is None and odd["inf"] == [None] and odd["raw"] == "00ff"
    assert odd["keyed"] == {"(1, 2)": "x", "3": "y"} and odd["items"] == ["a", 1]
    assert odd["text"] == "a\\ud800b" and plain["n"] == 1
