"""Link-latency proxy: a forwarding TCP proxy that delays each direction by T ms.

Linux netem is not available on the machines this project runs on, so the testnet
injects link latency in user space. One listener per peer forwards to that peer's
real libp2p port; peers announce the proxy port, so every peer-to-peer connection
crosses exactly one proxy and sees RTT ≈ 2T.

Why this shape: the delay must not serialise the stream or cut its bandwidth.
Per direction a reader task stamps each chunk with its arrival time into a bounded
memory channel and a writer task sleeps until `stamp + T` before writing it, so
chunks stay pipelined (in flight up to the bandwidth-delay product) and only the
latency changes. EOF (half-close) and resets travel through the same channel, so
they too arrive T later and in order. Each connection is handled on its own and
every error in it is caught there: one broken link never takes the proxy down.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import trio
from trio_typing import TaskStatus  # trio-stubs (installed with libp2p) lack trio.TaskStatus

log = logging.getLogger("testnet.proxy")

CHUNK_BYTES = 65536
# Chunks in flight per direction. A loopback libp2p link moves ~65 MB/s, so at
# 50 ms one way about 3 MB are in flight; 512 x 64 KiB leaves ample room while a
# stalled receiver still pushes back on the sender instead of growing our memory.
MAX_CHUNKS_IN_FLIGHT = 512
CONNECT_TIMEOUT_S = 5.0

# Stands for "the source reset the connection" in a direction's channel.
_RESET = None


@dataclass(frozen=True, slots=True)
class Link:
    """Connections accepted on `listen_port` are forwarded to `backend_port`."""

    listen_port: int
    backend_port: int

    @classmethod
    def parse(cls, spec: str) -> Link:
        """Parse `LISTEN:BACKEND`, e.g. `16100:15100`."""
        listen, sep, backend = spec.partition(":")
        if not sep or not listen.isdigit() or not backend.isdigit():
            raise ValueError(f"bad link {spec!r}: expected LISTEN_PORT:BACKEND_PORT")
        return cls(int(listen), int(backend))


async def serve(
    links: Sequence[Link],
    latency_s: float,
    *,
    host: str = "127.0.0.1",
    task_status: TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward every link until cancelled, delaying each direction by `latency_s`.

    All listeners are bound before any is served, so a taken port fails the whole
    proxy at once. `task_status.started` reports the bound ports, in `links` order
    (useful with listen port 0).
    """
    bound: list[tuple[Link, Sequence[trio.SocketListener]]] = []
    try:
        for link in links:
            bound.append((link, await trio.open_tcp_listeners(link.listen_port, host=host)))
        async with trio.open_nursery() as nursery:
            ports: list[int] = []
            for link, listeners in bound:
                ports.append(listeners[0].socket.getsockname()[1])
                handler = partial(_relay, host, link.backend_port, latency_s)
                nursery.start_soon(trio.serve_listeners, handler, listeners)
                log.info(
                    "proxy %s:%d -> %d, +%.1f ms each way",
                    host,
                    ports[-1],
                    link.backend_port,
                    latency_s * 1000,
                )
            task_status.started(ports)
    finally:
        for _, listeners in bound:
            for listener in listeners:
                await trio.aclose_forcefully(listener)


def run(links: Sequence[Link], latency_ms: float) -> None:
    """Entry point of the proxy process: serve until killed or interrupted."""
    trio.run(partial(serve, links, latency_ms / 1000.0))


async def _relay(host: str, backend_port: int, delay_s: float, client: trio.SocketStream) -> None:
    """Own one client connection: dial the backend and pump both directions."""
    try:
        backend: trio.SocketStream | None = None
        with trio.move_on_after(CONNECT_TIMEOUT_S):
            try:
                backend = await trio.open_tcp_stream(host, backend_port)
            except OSError as exc:
                log.debug("backend %d unreachable: %s", backend_port, exc)
        if backend is None:
            # The dialer should see what it would without the proxy: a refusal.
            _abort(client)
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, backend, delay_s, nursery.cancel_scope)
                nursery.start_soon(_pipe, backend, client, delay_s, nursery.cancel_scope)
        finally:
            await trio.aclose_forcefully(backend)
    except Exception:  # any bug or surprise stays within this one connection
        log.exception("connection to backend %d failed", backend_port)
        _abort(client)
    finally:
        await trio.aclose_forcefully(client)


async def _pipe(
    src: trio.SocketStream,
    dst: trio.SocketStream,
    delay_s: float,
    connection: trio.CancelScope,
) -> None:
    """One direction: read from `src`, write each chunk to `dst` `delay_s` later."""
    send, receive = trio.open_memory_channel[tuple[float, bytes | None]](MAX_CHUNKS_IN_FLIGHT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_side, src, send)
        nursery.start_soon(_write_side, receive, src, dst, delay_s, connection)


async def _read_side(
    src: trio.SocketStream, send: trio.MemorySendChannel[tuple[float, bytes | None]]
) -> None:
    async with send:
        while True:
            try:
                data: bytes | None = await src.receive_some(CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = _RESET
            await send.send((trio.current_time(), data))
            if not data:  # EOF or reset: nothing more comes this way
                return


async def _write_side(
    receive: trio.MemoryReceiveChannel[tuple[float, bytes | None]],
    src: trio.SocketStream,
    dst: trio.SocketStream,
    delay_s: float,
    connection: trio.CancelScope,
) -> None:
    async with receive:
        async for stamp, data in receive:
            await trio.sleep_until(stamp + delay_s)
            if data is _RESET:
                break
            try:
                if not data:
                    await dst.send_eof()
                    return
                await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
    # A reset on either end resets both: the same thing a direct link would show.
    _abort(dst)
    _abort(src)
    connection.cancel()


def _abort(stream: trio.SocketStream) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER with timeout 0)."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, trio.ClosedResourceError):
        pass  # already closed: there is nothing left to reset
