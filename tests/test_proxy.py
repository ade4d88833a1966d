"""The link-latency proxy alone, against trio echo servers on loopback.

It must add T per direction without serialising the stream (a delayed stream that
waited T per chunk would take seconds for 5 MB), pass EOF and resets through, and
survive a dead backend.
"""

from __future__ import annotations

import os
import socket
import statistics
from collections.abc import Awaitable, Callable

import pytest
import trio

from testnet.proxy import Link, serve

LATENCY_S = 0.020
Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then say goodbye: shows half-close crosses the proxy."""
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_all(b"bye")
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def start_server(nursery: trio.Nursery, handler: Handler, port: int = 0) -> int:
    listeners = await nursery.start(trio.serve_tcp, handler, port)
    bound: int = listeners[0].socket.getsockname()[1]
    return bound


async def start_proxy(nursery: trio.Nursery, backend_port: int) -> int:
    ports: list[int] = await nursery.start(serve, [Link(0, backend_port)], LATENCY_S)
    return ports[0]


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


async def transfer(port: int, payload: bytes) -> float:
    """Send `payload` to the echo server at `port` and read it back; seconds taken."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    echoed = bytearray()

    async def read_all() -> None:
        while len(echoed) < len(payload):
            echoed.extend(await stream.receive_some(65536))

    start = trio.current_time()
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await stream.send_all(payload)
    elapsed = trio.current_time() - start
    assert bytes(echoed) == payload
    return elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_link_parse() -> None:
    assert Link.parse("16100:15100") == Link(16100, 15100)
    for bad in ("16100", "a:1", "1:", ":2", "1:2:3"):
        with pytest.raises(ValueError, match="LISTEN_PORT:BACKEND_PORT"):
            Link.parse(bad)


async def test_round_trip_is_twice_the_latency(nursery: trio.Nursery) -> None:
    proxy_port = await start_proxy(nursery, await start_server(nursery, echo))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        async with stream:
            rtts = []
            for _ in range(5):
                start = trio.current_time()
                await stream.send_all(b"x")
                assert await receive_exactly(stream, 1) == b"x"
                rtts.append(trio.current_time() - start)
    assert min(rtts) >= 2 * LATENCY_S
    assert statistics.median(rtts) < 4 * LATENCY_S


async def test_bulk_transfer_is_intact_and_pipelined(nursery: trio.Nursery) -> None:
    echo_port = await start_server(nursery, echo)
    proxy_port = await start_proxy(nursery, echo_port)
    payload = os.urandom(5 * 1024 * 1024)
    with trio.fail_after(30):
        direct_s = await transfer(echo_port, payload)
        proxied_s = await transfer(proxy_port, payload)
    # Serialised delays would cost T per 64 KiB chunk: 80 chunks x 20 ms = 1.6 s one way.
    assert proxied_s < direct_s + 2 * LATENCY_S + 0.5, (direct_s, proxied_s)


async def test_eof_propagates_both_ways(nursery: trio.Nursery) -> None:
    proxy_port = await start_proxy(nursery, await start_server(nursery, echo))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        async with stream:
            await stream.send_all(b"hello")
            await stream.send_eof()
            received = b""
            while chunk := await stream.receive_some(1024):
                received += chunk
    # The echo server saw our EOF (it said bye), and we saw its close as EOF.
    assert received == b"hellobye"


async def test_reset_propagates(nursery: trio.Nursery) -> None:
    outcome: list[str] = []
    done = trio.Event()

    async def record(stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some(1024):
                pass
            outcome.append("eof")
        except trio.BrokenResourceError:
            outcome.append("reset")
        finally:
            done.set()
            await stream.aclose()

    proxy_port = await start_proxy(nursery, await start_server(nursery, record))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        await stream.send_all(b"data")
        await trio.sleep(3 * LATENCY_S)  # the proxy has dialled the backend
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await stream.aclose()  # RST, not FIN
        await done.wait()
    assert outcome == ["reset"]


async def test_dead_backend_closes_client_and_proxy_keeps_serving(
    nursery: trio.Nursery,
) -> None:
    backend_port = free_port()
    proxy_port = await start_proxy(nursery, backend_port)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        async with stream:
            try:
                assert await stream.receive_some(1024) == b""
            except trio.BrokenResourceError:
                pass  # a reset is the closest thing to "connection refused"
        await start_server(nursery, echo, backend_port)
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        async with stream:
            await stream.send_all(b"again")
            assert await receive_exactly(stream, 5) == b"again"
