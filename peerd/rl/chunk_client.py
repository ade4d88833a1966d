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
from typing import TYPE_CHECKING, Any

import httpx
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


def base_url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


class ChunkClient:
    """Keep-alive connections to holders (a few each: the ChunkPlan bounds the batches in
    flight per holder), and which holders' channel failed lately."""

    def __init__(self, spec: HttpChunks = CHUNKS_HTTP, *, max_connections: int = 32) -> None:
        self.spec = spec
        self.down: dict[str, float] = {}  # peer -> monotonic time its channel may be retried
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections,
                                    keepalive_expiry=min(5.0, spec.request_timeout_s / 2))
        # (expire idle connections before the server does, so a request never races
        # the server's close of an idle one)
        self._client: httpx.AsyncClient | None = None

    def usable(self, peer: str) -> bool:
        until = self.down.get(peer)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self.down[peer]
            return True
        return False

    async def fetch(self, peer: str, url: str, batch: Sequence[bytes],
                    sizes: Mapping[bytes, int]) -> tuple[bytes, ...]:
        """data[i]: the chunk named batch[i] from the server at `url`, or b"" when it does
        not hold it. Raises HttpUnavailable (and marks `peer` down), BadChunk."""
        client = self._client or self._open()
        data: list[bytes] = []
        try:
            with trio.fail_after(self.spec.send_timeout_s):
                for h in batch:
                    data.append(await self._one(client, f"{url}{self.spec.path}{h.hex()}",
                                                h, sizes[h]))
        except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
            self.down[peer] = time.monotonic() + self.spec.down_s
            raise HttpUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except HttpUnavailable:
            self.down[peer] = time.monotonic() + self.spec.down_s
            raise
        return tuple(data)

    async def _one(self, client: httpx.AsyncClient, url: str, h: bytes, size: int) -> bytes:
        async with client.stream("GET", url) as response:
            if response.status_code == 404:
                return b""
            if response.status_code != 200:
                raise HttpUnavailable(f"HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if not declared.isdigit():
                raise HttpUnavailable("a response without a content-length")
            if int(declared) != size:
                raise BadChunk(f"chunk {h.hex()[:16]} is {declared} bytes over HTTP, "
                               f"expected {size}")
            return await response.aread()

    def _open(self) -> httpx.AsyncClient:
        timeout = httpx.Timeout(self.spec.send_timeout_s, connect=self.spec.connect_timeout_s)
        self._client = httpx.AsyncClient(limits=self._limits, timeout=timeout,
                                         trust_env=False, follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await client.aclose()


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
        url = self.url(peer)
        if url is not None:
            try:
                data = await self.http.fetch(peer, url, batch, sizes)
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

    def url(self, peer: str) -> str | None:
        """Where `peer` serves chunks over HTTP, when it says it does, we reach it
        directly, and its channel has not failed us lately."""
        if self.ledger is None or not self.http.usable(peer):
            return None
        entry = self.ledger.book.get(peer)
        port = entry.weights_http_port if entry is not None else 0
        if not 0 < port < 65536:
            return None
        ip = direct_ip(self.node.host, peer)
        return None if ip is None else base_url(ip, port)

    async def aclose(self) -> None:
        await self.http.aclose()
