"""Fetching chunks over the HTTP side channel (CHUNKS_HTTP in protocols/weights.py): the
puller's half of peerd/rl/chunk_http.py.

A holder is asked over HTTP when its ledger entry advertises a port and our libp2p
connection to it is direct (its remote IP is where the port listens; a relayed
connection has none to offer). Any failure of the channel itself (no answer, refused,
a status other than 200 and 404, a broken response) raises `HttpUnavailable`: the
caller asks the same holder over libp2p, and HTTP is not tried with it again for
`down_s`. A body of the wrong length is the holder's lie (BadChunk), as on libp2p; the
caller checks every hash.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
import multiaddr
import trio
from libp2p.peer.id import ID

from peerd.rpc import call
from protocols.errors import PeerError
from protocols.weights import (
    CHUNKS,
    CHUNKS_HTTP,
    BadChunk,
    ChunkReply,
    ChunkRequest,
    HttpChunks,
)

if TYPE_CHECKING:
    from peerd.ledger.gossip import LedgerGossip
    from peerd.node import Node

log = logging.getLogger(__name__)


class HttpUnavailable(Exception):
    """The side channel failed with this holder (not an offence): ask over libp2p."""


def direct_ip(host: Any, peer: str) -> str | None:
    """The IP of our direct (not relayed) libp2p connection to `peer`, if any."""
    try:
        conns = host.get_network().connections.get(ID.from_base58(peer), [])
        for conn in conns if isinstance(conns, list | tuple) else [conns]:
            for addr in conn.get_transport_addresses():
                text = str(addr)
                if "/p2p-circuit" in text:
                    break  # relayed: the address is the relay's
                ma = multiaddr.Multiaddr(text)
                names = [p.name for p in ma.protocols()]
                for proto in ("ip4", "ip6"):
                    if proto in names:
                        return str(ma.value_for_protocol(proto))
    except Exception:  # the connection went away under us, or an odd address
        log.debug("no direct address for %s", peer, exc_info=True)
    return None


Address = tuple[str, int]  # a holder's side channel: (IP, port)
_RECEIVE_BYTES = 1 << 20  # few, large reads: this loop's cost is per read, not per byte
_MAX_ERROR_BODY = 4096  # a 404's text
_KEEP_IDLE = 4  # idle connections kept per holder (the ChunkPlan asks 2 at once)
# Any of these means the channel failed, not that the holder lied
_CHANNEL_FAILURES: tuple[type[BaseException], ...] = (
    OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
    h11.ProtocolError)


@dataclass
class _Connection:
    stream: trio.SocketStream
    h11: h11.Connection
    served: int = 0  # responses taken on it
    idle_since: float = 0.0


class ChunkClient:
    """Keep-alive HTTP/1.1 connections to holders (a batch is its chunks' GETs one after
    another on one connection; the ChunkPlan bounds the batches in flight per holder), and
    which holders' channel failed lately.

    On trio and h11 rather than httpx: a pull moves hundreds of MB through one event
    loop, and httpx's 64 KiB reads through its layers cost several times the CPU of
    h11 fed 1 MiB reads."""

    def __init__(self, spec: HttpChunks = CHUNKS_HTTP) -> None:
        self.spec = spec
        self.down: dict[str, float] = {}  # peer -> monotonic time its channel may be retried
        # Idle connections are dropped before the server would close them, so a request
        # seldom races the server's close (when it does, it is retried once, fresh)
        self.keep_idle_s = min(5.0, spec.request_timeout_s / 2)
        self._idle: dict[Address, list[_Connection]] = {}

    def usable(self, peer: str) -> bool:
        until = self.down.get(peer)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self.down[peer]
            return True
        return False

    async def fetch(self, peer: str, address: Address, batch: Sequence[bytes],
                    sizes: Mapping[bytes, int]) -> tuple[bytes, ...]:
        """data[i]: the chunk named batch[i] from `peer`'s server at `address`, or b"" when
        it does not hold it. Raises HttpUnavailable (and marks `peer` down), BadChunk."""
        data: list[bytes] = []
        conn: _Connection | None = None
        try:
            with trio.fail_after(self.spec.send_timeout_s):
                for retry in (False, True):
                    conn = await self._connection(address)
                    try:
                        data = await self._get_batch(conn, address, batch, sizes)
                        break
                    except _CHANNEL_FAILURES:
                        stale = conn.served > 0 and not retry
                        await trio.aclose_forcefully(conn.stream)
                        conn = None
                        if not stale:
                            raise
                if conn is not None and conn.h11.our_state is not h11.IDLE:
                    await trio.aclose_forcefully(conn.stream)  # the server closes it
                    conn = None
        except BaseException as exc:
            if conn is not None:
                await trio.aclose_forcefully(conn.stream)
            if isinstance(exc, (*_CHANNEL_FAILURES, HttpUnavailable)):
                self.down[peer] = time.monotonic() + self.spec.down_s
                raise HttpUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise
        if conn is not None:
            self._keep(address, conn)
        return tuple(data)

    async def _get_batch(self, conn: _Connection, address: Address, batch: Sequence[bytes],
                         sizes: Mapping[bytes, int]) -> list[bytes]:
        """The batch's GETs, pipelined: all requests go out at once and the server answers
        them in order (a round trip a batch, not a chunk: LoRA chunks are small). Leaves
        `conn` ready for the next batch unless its state says to close. Raises
        HttpUnavailable, BadChunk and _CHANNEL_FAILURES."""
        c = conn.h11
        requests = [h11.Request(method="GET", target=f"{self.spec.path}{h.hex()}",
                                headers=[("host", _host_header(address))]) for h in batch]
        await conn.stream.send_all(b"".join(map(_request_bytes, requests)))
        out: list[bytes] = []
        for i, (h, request) in enumerate(zip(batch, requests, strict=True)):
            if i and not (c.our_state is c.their_state is h11.DONE):
                raise HttpUnavailable("the server closed the connection mid-batch")
            if i:
                c.start_next_cycle()
            c.send(request)  # in step with what went out (the bytes are not sent again)
            c.send(h11.EndOfMessage())
            out.append(await self._response(conn, h, sizes[h]))
        if c.our_state is c.their_state is h11.DONE:
            c.start_next_cycle()
        return out

    async def _response(self, conn: _Connection, h: bytes, size: int) -> bytes:
        c = conn.h11
        status = 0
        limit = _MAX_ERROR_BODY
        parts: list[bytes | bytearray] = []
        got = 0
        while True:
            event = c.next_event()
            if event is h11.NEED_DATA:
                c.receive_data(await conn.stream.receive_some(_RECEIVE_BYTES))
            elif isinstance(event, h11.Response):
                status = event.status_code
                if status == 200:
                    limit = _content_length(event, h, size)
                elif status != 404:
                    raise HttpUnavailable(f"HTTP {status}")
            elif isinstance(event, h11.Data):
                got += len(event.data)
                if got > limit:
                    raise HttpUnavailable(f"a {status} body past {limit} bytes")
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpUnavailable("the server closed mid-response")
        conn.served += 1
        return b"".join(parts) if status == 200 else b""

    async def _connection(self, address: Address) -> _Connection:
        now = time.monotonic()
        idle = self._idle.get(address, [])
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.keep_idle_s:
                return conn
            await trio.aclose_forcefully(conn.stream)
        with trio.fail_after(self.spec.connect_timeout_s):
            stream = await trio.open_tcp_stream(*address)
        return _Connection(stream, h11.Connection(h11.CLIENT))

    def _keep(self, address: Address, conn: _Connection) -> None:
        now = time.monotonic()
        self._sweep(now)
        idle = self._idle.setdefault(address, [])
        conn.idle_since = now
        idle.append(conn)
        while len(idle) > _KEEP_IDLE:
            idle.pop(0).stream.socket.close()

    def _sweep(self, now: float) -> None:
        """Close the idle connections of every holder that are past keeping, and forget
        holders whose channel may be retried: an address used once (a holder that left)
        kept its sockets, half closed by the server, for good."""
        for address in list(self._idle):
            idle = self._idle[address]
            for conn in [c for c in idle if now - c.idle_since >= self.keep_idle_s]:
                idle.remove(conn)
                conn.stream.socket.close()
            if not idle:
                del self._idle[address]
        for peer in [p for p, until in self.down.items() if now >= until]:
            del self.down[peer]

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await trio.aclose_forcefully(conn.stream)


def _request_bytes(request: h11.Request) -> bytes:
    c = h11.Connection(h11.CLIENT)
    return c.send(request) + (c.send(h11.EndOfMessage()) or b"")


def _host_header(address: Address) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _content_length(response: h11.Response, h: bytes, size: int) -> int:
    """A 200's declared length, which must be the chunk's. Raises BadChunk (the holder's
    lie), HttpUnavailable (no length: not our server)."""
    declared = [v for k, v in response.headers if k == b"content-length"]
    if not declared:
        raise HttpUnavailable("a 200 without a content-length")
    length = int(declared[0])  # h11 checked it is a number
    if length != size:
        raise BadChunk(f"chunk {h.hex()[:16]} is {length} bytes over HTTP, expected {size}")
    return length


class ChunkFetcher:
    """A batch of chunks from one holder: over HTTP when it advertises a port (in its
    ledger entry) and we reach it directly, else, or when that fails, over libp2p.
    Counts into `pulled`: "http_chunks", "http_bytes", "http_fallbacks"."""

    def __init__(self, node: Node, ledger: LedgerGossip | None, pulled: Counter[str]) -> None:
        self.node = node
        self.ledger = ledger  # None: libp2p only
        self.pulled = pulled
        self.http = ChunkClient()

    async def fetch(self, peer: str, batch: Sequence[bytes], sizes: Mapping[bytes, int]
                    ) -> tuple[bytes, ...]:
        """data[i]: the chunk named batch[i] as `peer` sent it, or b"" when it lacks it.
        Raises PeerError, and what a libp2p call raises."""
        address = self.address(peer)
        if address is not None:
            try:
                data = await self.http.fetch(peer, address, batch, sizes)
            except HttpUnavailable as exc:
                self.pulled["http_fallbacks"] += 1
                log.info("chunks from %s over HTTP failed (%s); asking over libp2p", peer, exc)
            else:
                self.pulled.update(http_chunks=sum(1 for d in data if d),
                                   http_bytes=sum(len(d) for d in data))
                return data
        reply: ChunkReply = await call(self.node.host, peer, CHUNKS,
                                       ChunkRequest(hashes=tuple(batch)),
                                       dial=self.node.new_stream)
        if len(reply.data) != len(batch):
            raise PeerError(f"{len(reply.data)} chunks for {len(batch)} asked",
                            reason="malformed")
        return reply.data

    def address(self, peer: str) -> Address | None:
        """Where `peer` serves chunks over HTTP, when it says it does, we reach it
        directly, and its channel has not failed us lately."""
        if self.ledger is None or not self.http.usable(peer):
            return None
        entry = self.ledger.book.get(peer)
        port = entry.weights_http_port if entry is not None else 0
        if not 0 < port < 65536:
            return None
        ip = direct_ip(self.node.host, peer)
        return None if ip is None else (ip, port)

    async def aclose(self) -> None:
        await self.http.aclose()
