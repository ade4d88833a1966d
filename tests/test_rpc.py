"""A request/response exchange that a deadline cuts ends for both sides at once: the
caller's stream is reset (not left open, nor closed on a frame cut part-way), on real
hosts; `close_stream` picks close or reset by whether its caller was cancelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from libp2p.peer.id import ID

from peerd.node import Node
from peerd.rpc import call, stream_handler
from peerd.streams import close_stream
from protocols.ledger import SyncRequest, SyncResponse
from protocols.spec import RequestResponse
from tests.harness import swarm, wait_for

SLOW = RequestResponse(id="/peerd/test-slow/1.0.0", request=SyncRequest,
                       response=SyncResponse, max_request_bytes=1024,
                       max_response_bytes=1024, timeout_s=30.0)


def open_streams(a: Node, b: Node) -> int:
    """`a`'s streams of SLOW to `b`, open on its side."""
    conns = a.host.get_network().connections.get(ID.from_base58(b.peer_id), [])
    return sum(1 for c in conns for s in c.get_streams() if s.get_protocol() == SLOW.id)


async def test_a_call_cut_by_its_deadline_resets_its_stream(tmp_path: Path) -> None:
    async with swarm(2, tmp_path, target_peers=1) as (a, b):
        ended: list[str] = []

        async def slow(peer: str, request: SyncRequest) -> SyncResponse:
            try:
                await trio.sleep(2.0)
            finally:
                ended.append("handler")
            return SyncResponse(entries=())

        b.set_stream_handler(SLOW.id, stream_handler(SLOW, slow, b.offence))
        for _ in range(3):
            with pytest.raises(trio.TooSlowError):
                await call(a.host, b.peer_id, SLOW, SyncRequest(), timeout_s=0.3)
        # None of the three streams is left open on our side, nor on b's once its
        # handlers find the stream gone.
        assert open_streams(a, b) == 0
        await wait_for(lambda: len(ended) == 3 and open_streams(b, a) == 0, 10,
                       "b's handlers to end and their streams to go")
        assert not b.offences.get(a.peer_id), b.offences


class Stream:
    """Records how it was ended."""

    def __init__(self, close_fails: bool = False) -> None:
        self.close_fails = close_fails
        self.ended: list[str] = []

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.close_fails:
            raise RuntimeError("closing failed")
        self.ended.append("close")

    async def reset(self) -> None:
        await trio.lowlevel.checkpoint()
        self.ended.append("reset")


async def test_a_stream_is_closed_when_its_exchange_ended_well() -> None:
    stream = Stream()
    await close_stream(stream)
    assert stream.ended == ["close"]


async def test_a_stream_is_reset_when_its_caller_was_cancelled() -> None:
    stream = Stream()
    with trio.move_on_after(0):
        await trio.sleep(1)  # (cancelled here: the deadline has passed)
    with trio.CancelScope() as scope:
        scope.cancel()
        await close_stream(stream)  # runs, though every await here is cancelled
    assert stream.ended == ["reset"]


@pytest.mark.parametrize("stream, abort", [(Stream(), True), (Stream(close_fails=True), False)])
async def test_a_stream_is_reset_when_asked_or_when_closing_fails(stream: Any,
                                                                 abort: bool) -> None:
    await close_stream(stream, abort=abort)
    assert stream.ended == ["reset"]


async def test_streams_that_send_no_request_give_their_slots_back_soon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that opened streams and sent nothing held their slots for the exchange's
    whole deadline: for a rollout, a sampler's for 15 minutes, with two peer ids."""
    import peerd.rpc as rpc
    from protocols.errors import RemoteError

    monkeypatch.setattr(rpc, "REQUEST_READ_S", 0.5, raising=False)
    spec = RequestResponse(id="/peerd/test-quiet/1.0.0", request=SyncRequest,
                           response=SyncResponse, max_request_bytes=64,
                           max_response_bytes=1024, timeout_s=60.0, max_concurrent_per_peer=2)
    async with swarm(2, tmp_path, target_peers=1) as (a, b):
        async def answer(peer: str, request: SyncRequest) -> SyncResponse:
            return SyncResponse(entries=())

        b.set_stream_handler(spec.id, stream_handler(spec, answer, b.offence))
        quiet = [await a.host.new_stream(ID.from_base58(b.peer_id), [spec.id])
                 for _ in range(2)]
        await trio.sleep(0.1)
        with pytest.raises(RemoteError, match="busy"):
            await call(a.host, b.peer_id, spec, SyncRequest())
        await wait_for(lambda: b.offences.get(a.peer_id, {}).get("timeout", 0) == 2, 10,
                       "b to give up on the two quiet streams")
        assert await call(a.host, b.peer_id, spec, SyncRequest()) == SyncResponse(entries=())
        for s in quiet:
            await close_stream(s, abort=True)
