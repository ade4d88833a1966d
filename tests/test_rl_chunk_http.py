"""The weight-chunk HTTP side channel on real sockets: the server answers the one thing
it serves, refuses everything else with a clear status (bad path, malformed or unknown
hash, another method, a body, an oversized or garbled head, a stalled head, a flood past
its connection cap) and keeps serving; the client maps what it gets back to chunks,
"not held", a lie (BadChunk) or a channel to give up on (HttpUnavailable)."""

from __future__ import annotations

import dataclasses
import hashlib
import time

import pytest
import trio

from peerd.config import ConfigError, load_config
from peerd.rl.chunk_client import ChunkClient, HttpUnavailable
from peerd.rl.chunk_http import ChunkServer, serve_beside
from protocols.codec import decode, encode
from protocols.ledger import LedgerEntry
from protocols.weights import CHUNKS_HTTP, BadChunk

SPEC = dataclasses.replace(CHUNKS_HTTP, max_concurrent=4, request_timeout_s=0.5,
                           connect_timeout_s=1.0)
DATA = bytes(range(256)) * 4096  # 1 MiB
NAME = hashlib.sha256(DATA).digest()
UNKNOWN = hashlib.sha256(b"not held").digest()


async def exchange(port: int, raw: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send `raw` on a fresh connection; everything the server sends until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    with trio.fail_after(timeout_s):
        try:
            await stream.send_all(raw)
            while got := await stream.receive_some(65536):
                out += got
        finally:
            await stream.aclose()
    return out


def status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    return int(response.split(b" ", 2)[1])


def get(target: str, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nhost: x\r\n{extra}\r\n".encode()


async def test_the_server_serves_chunks_refuses_the_rest_and_keeps_serving() -> None:
    server = ChunkServer({NAME: DATA}.get, SPEC)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_beside, server, ["/ip4/127.0.0.1/tcp/0"], 0)
        url = ("127.0.0.1", port)
        client = ChunkClient(SPEC)
        sizes = {NAME: len(DATA), UNKNOWN: 5}
        # two requests on one keep-alive connection: a held chunk, one not held
        assert await client.fetch("p", url, [NAME, UNKNOWN], sizes) == (DATA, b"")
        await client.aclose()
        cases = [
            (get("/etc/passwd"), 404, b"only /chunks/"),
            (get("/chunks/"), 400, b"64 lowercase hex"),  # no listing
            (get("/chunks/" + NAME.hex().upper()), 400, b"64 lowercase hex"),
            (get(f"/chunks/{NAME.hex()}/../x"), 400, b"64 lowercase hex"),
            (get(f"/chunks/{NAME.hex()}?x=1"), 400, b"64 lowercase hex"),
            (f"POST /chunks/{NAME.hex()} HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n"
             "abc".encode(), 405, b"only GET"),
            (f"DELETE /chunks/{NAME.hex()} HTTP/1.1\r\nhost: x\r\n\r\n".encode(), 405,
             b"only GET"),
            (get(f"/chunks/{NAME.hex()}", "content-length: 5\r\n") + b"hello", 400,
             b"a GET with a body"),
            (get(f"/chunks/{NAME.hex()}", "x-pad: " + "a" * 20_000 + "\r\n"), 431, b""),
            (b"\x00\x01 hello\r\n\r\n", 400, b"bad request"),
        ]
        for raw, want, text in cases:
            got = await exchange(port, raw)
            assert status(got) == want, (raw[:60], got[:200])
            assert text in got, got[:200]
        # a head that stalls is answered 408 once the request deadline passes
        assert status(await exchange(port, b"GET /chunks/ab")) == 408
        # an unknown chunk: 404, the connection kept (closed here when it idles)
        assert status(await exchange(port, get(f"/chunks/{UNKNOWN.hex()}"))) == 404
        # a flood: the cap's worth of connections stalled mid-head, then one more
        stalled = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(4)]
        for s in stalled:
            await s.send_all(b"GET /chu")
        await trio.sleep(0.05)
        assert server.active == 4
        busy = await exchange(port, get(f"/chunks/{NAME.hex()}"))
        assert status(busy) == 503 and b"busy" in busy
        for s in stalled:
            await s.aclose()
        await trio.sleep(0.05)
        # and it still serves
        client = ChunkClient(SPEC)
        assert await client.fetch("p", url, [NAME], sizes) == (DATA,)
        await client.aclose()
        assert server.answered[200] == 2 and server.answered[503] == 1
        assert server.answered[408] == 1 and server.answered[431] == 1
        server.close()


async def test_the_client_maps_answers_to_chunks_lies_and_a_channel_to_give_up() -> None:
    server = ChunkServer({NAME: DATA}.get, SPEC)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run, "127.0.0.1", 0)
        url = ("127.0.0.1", port)
        client = ChunkClient(SPEC)
        # a length other than the manifest's is the holder's lie
        with pytest.raises(BadChunk, match="bytes over HTTP"):
            await client.fetch("liar", url, [NAME], {NAME: len(DATA) - 1})
        assert client.usable("liar")  # a lie is an offence, not a broken channel
        server.close()
    # nothing listens there now: give up on the channel with that holder for a while
    with pytest.raises(HttpUnavailable):
        await client.fetch("gone", url, [NAME], {NAME: len(DATA)})
    assert not client.usable("gone") and client.usable("other")
    await client.aclose()


def test_the_port_setting_and_its_ledger_field() -> None:
    assert load_config({}, environ={}).weights_http_port == 0
    assert load_config({"weights_http_port": "off"}, environ={}).weights_http_port == -1
    assert load_config({"weights_http_port": "8123"}, environ={}).weights_http_port == 8123
    for bad in ("70000", "-2", "x"):
        with pytest.raises(ConfigError, match="weights_http_port"):
            load_config({"weights_http_port": bad}, environ={})
    # an entry without a port is the same bytes as before the field; with one, it reads back
    entry = LedgerEntry(peer_id="p", seq=1, timestamp=1.0, ttl_s=30.0)
    assert b"weights_http_port" not in encode(entry)
    with_port = dataclasses.replace(entry, weights_http_port=8123)
    assert decode(encode(with_port), LedgerEntry).weights_http_port == 8123


async def test_the_client_closes_idle_connections_of_every_holder() -> None:
    """An address used once kept its idle connections (sockets the server had closed
    after its own timeout) until the same address was used again: for a holder that
    left, for good."""
    servers = [ChunkServer({NAME: DATA}.get, SPEC) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(s.run, "127.0.0.1", 0) for s in servers]
        client = ChunkClient(SPEC)
        sizes = {NAME: len(DATA)}
        for port in ports[:2]:
            assert await client.fetch("p", ("127.0.0.1", port), [NAME], sizes) == (DATA,)
        assert set(client._idle) == {("127.0.0.1", p) for p in ports[:2]}
        client.down["left"] = time.monotonic()  # its back-off is over
        await trio.sleep(client.keep_idle_s)
        assert await client.fetch("p", ("127.0.0.1", ports[2]), [NAME], sizes) == (DATA,)
        assert set(client._idle) == {("127.0.0.1", ports[2])}
        assert "left" not in client.down
        await client.aclose()
        for s in servers:
            s.close()
