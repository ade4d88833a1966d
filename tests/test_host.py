"""The libp2p host's guards around py-libp2p (peerd/host.py): writes that a deadline
cuts short leave the connection whole, on real hosts; a packet goes out whole whatever
cancels its task; a peer that stops reading ends the connection instead of holding a
shielded write forever."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.peer.id import ID

from peerd import host
from peerd.node import Node
from tests.harness import swarm

SINK = "/peerd-test/sink/1.0.0"
ECHO = "/peerd-test/echo/1.0.0"
WRITERS = 8
SIZES = (10, 1_000, 30_000, 100_000)  # the last spans two Noise packets


def connection(a: Node, b: Node) -> Any:
    conns = a.host.get_network().connections.get(ID.from_base58(b.peer_id), [])
    assert len(conns) == 1, conns
    return conns[0]


async def test_writes_cut_short_by_deadlines_leave_the_connection_whole(
        tmp_path: Path) -> None:
    async with swarm(2, tmp_path, target_peers=1) as (a, b):
        received = 0

        async def sink(stream: Any) -> None:
            nonlocal received
            while chunk := await stream.read(1 << 16):
                received += len(chunk)

        async def echo(stream: Any) -> None:
            await stream.write(await stream.read(64))
            await stream.close()

        b.set_stream_handler(SINK, sink)
        b.set_stream_handler(ECHO, echo)
        before = connection(a, b)
        streams = [await a.new_stream(b.peer_id, SINK) for _ in range(WRITERS)]
        done = cut = 0

        async def write(stream: Any, rng: random.Random) -> None:
            nonlocal done, cut
            for _ in range(300):
                # Deadlines of 0-20 ms land in every part of a write: before it, while
                # it waits for the connection's lock, between encrypting and sending.
                with trio.move_on_after(rng.random() * 0.02) as scope:
                    await stream.write(rng.randbytes(rng.choice(SIZES)))
                    done += 1
                cut += scope.cancelled_caught

        async with trio.open_nursery() as nursery:
            for i, stream in enumerate(streams):
                nursery.start_soon(write, stream, random.Random(i))
        assert cut > 50 and done > 50, (cut, done)  # both kinds happened
        after = connection(a, b)
        assert after is before and not host.closing(after)
        with trio.fail_after(10):
            stream = await a.new_stream(b.peer_id, ECHO)
            await stream.write(b"still one connection")
            assert await stream.read(64) == b"still one connection"
        assert received > 0


class _Packets:
    """A Noise packet writer whose peer never reads: every send waits."""

    def __init__(self) -> None:
        self.closed = False

    async def write_msg(self, packet: bytes) -> None:
        await trio.sleep_forever()

    async def close(self) -> None:
        self.closed = True


class _Session:
    def __init__(self) -> None:
        self.conn = type("Noise", (), {})()
        self.conn.read_writer = _Packets()

    async def write(self, data: bytes) -> None:
        await self.conn.read_writer.write_msg(data)


async def test_a_peer_that_stops_reading_ends_the_connection(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    monkeypatch.setattr(host, "WRITE_STALL_S", 5.0)
    session = _Session()
    host._make_writes_whole(session)
    start = trio.current_time()
    with trio.move_on_after(1.0):  # the caller's deadline waits for the whole write
        with pytest.raises(ConnectionClosedError, match="took in nothing for 5 s"):
            await session.write(b"x")
    assert trio.current_time() - start == pytest.approx(5.0)
    assert session.conn.read_writer.closed


async def test_a_packet_goes_out_whole_though_its_task_is_cancelled() -> None:
    sent: list[bytes] = []

    class Packets(_Packets):
        async def write_msg(self, packet: bytes) -> None:
            for half in (packet[:1], packet[1:]):  # a send that yields part-way
                await trio.lowlevel.checkpoint()
                sent.append(half)

    session = _Session()
    session.conn.read_writer = Packets()
    host._make_writes_whole(session)
    with trio.CancelScope() as scope:
        scope.cancel()
        await session.write(b"xy")
    assert sent == [b"x", b"y"]
