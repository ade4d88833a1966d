"""A holder's chunks over plain HTTP/1.1: the server of the side channel (CHUNKS_HTTP in
protocols/weights.py).

It serves one thing, `GET /chunks/<sha256 hex>`: the chunk's bytes when held now (200),
404 otherwise. Everything else gets a short plain-text error and the connection is
closed: another path 404, a malformed hash 400, another method 405, a request with a
body 400, a head past `max_header_bytes` 431, a connection beyond `max_concurrent` 503;
a connection that sends no complete head within `request_timeout_s` (idle keep-alive
included) is closed. Nothing lists what is held.

No token: the hash is the capability. A chunk is public the moment its version is
announced (any holder hands it to any peer over libp2p as well), and the puller checks
every byte against the manifest it verified against the trainer's signed hash, so a
server cannot make it accept anything else. What the server learns of a client is only
which hashes it asks for.

Its own small server on h11 rather than hypercorn (which serves the API): every limit
here (the connection cap answered 503, the deadline on a request's head and on each
response, no other route) is a few lines that the tests drive, and a response's body
goes out as the held `bytes` object itself, without an ASGI layer in between.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable

import h11
import multiaddr
import trio
from trio_typing import TaskStatus

from protocols.weights import CHUNKS_HTTP, HttpChunks

log = logging.getLogger(__name__)

_RECEIVE_BYTES = 16 * 1024
_HEX = re.compile(rb"[0-9a-f]{64}")
_REASONS = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}
_BUSY_HEAD_S = 1.0  # how long a refused connection may take to send its head
# After an error answer, what is still coming is read and dropped for up to this long (and
# this many bytes) before closing: a socket closed with unread data is reset, and the
# client would lose the answer.
_LINGER_S = 1.0
_LINGER_BYTES = 256 * 1024
_COALESCE_BYTES = 64 * 1024  # a body up to this goes out in one write with its head


class ClientError(Exception):
    """The client asked for something this server does not serve: answer, then close."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class ChunkServer:
    """Serves `lookup(hash)` (the chunk, or None when not held) on one TCP listener."""

    def __init__(self, lookup: Callable[[bytes], bytes | None],
                 spec: HttpChunks = CHUNKS_HTTP) -> None:
        self.lookup = lookup
        self.spec = spec
        self.port = 0  # bound, once running
        self.active = 0  # connections being served
        self.answered: Counter[int] = Counter()  # responses by status
        self._scope: trio.CancelScope | None = None

    async def run(self, host: str, port: int, *,
                  task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on host:port (0: any free port) and serve until cancelled; starts with
        the bound port. Raises OSError when the address cannot be bound."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as self._scope:
            task_status.started(self.port)
            await trio.serve_listeners(self._connection, listeners)

    def close(self) -> None:
        """Stop listening and drop every connection (`run` returns)."""
        if self._scope is not None:
            self._scope.cancel()

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One client connection. Never raises: a handler's error would end the server."""
        try:
            if self.active >= self.spec.max_concurrent:
                await self._refuse_busy(stream)
                return
            self.active += 1
            try:
                await self._requests(stream)
            finally:
                self.active -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client left, or was too slow to take its response
        except Exception:
            log.exception("weights HTTP: a connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _requests(self, stream: trio.SocketStream) -> None:
        """The requests of one keep-alive connection, one at a time."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.spec.max_header_bytes)
        while True:
            try:
                with trio.move_on_after(self.spec.request_timeout_s) as waited:
                    request = await _read_head(stream, conn)
                if waited.cancelled_caught:
                    if conn.their_state is h11.SEND_BODY or _has_partial_head(conn):
                        await self._error(stream, ClientError(408, "request too slow"))
                    return
                if request is None:
                    return  # the client closed
                chunk = self._route(request)
                if not isinstance(conn.next_event(), h11.EndOfMessage):  # a GET: no body
                    raise ClientError(400, "a request with a body")
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in _REASONS else 400
                await self._error(stream, ClientError(status, f"bad request: {exc}"))
                return
            except ClientError as exc:
                await self._error(stream, exc)
                return
            with trio.fail_after(self.spec.send_timeout_s):
                await self._respond(stream, conn, chunk)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    def _route(self, request: h11.Request) -> bytes | None:
        """The chunk asked for (None: not held). Raises ClientError."""
        if request.method != b"GET":
            raise ClientError(405, "only GET is served")
        if any((name == b"content-length" and value != b"0")
               or name == b"transfer-encoding" for name, value in request.headers):
            raise ClientError(400, "a GET with a body")
        prefix = self.spec.path.encode()
        if not request.target.startswith(prefix):
            raise ClientError(404, f"only {self.spec.path}<sha256 hex> is served")
        name = request.target[len(prefix):]
        if not _HEX.fullmatch(name):
            raise ClientError(400, "a chunk's name is 64 lowercase hex digits (its SHA-256)")
        return self.lookup(bytes.fromhex(name.decode()))

    async def _respond(self, stream: trio.SocketStream, conn: h11.Connection,
                       chunk: bytes | None) -> None:
        status, body, kind = 404, b"chunk not held\n", b"text/plain"
        if chunk is not None:
            status, body, kind = 200, chunk, b"application/octet-stream"
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        head = conn.send(h11.Response(status_code=status, headers=headers))
        pieces = conn.send_with_data_passthrough(h11.Data(data=body)) or []
        tail = conn.send(h11.EndOfMessage())
        self.answered[status] += 1
        if len(body) <= _COALESCE_BYTES:  # one write: small chunks (LoRA) cost per write
            await stream.send_all(b"".join([head, *pieces, tail]))
            return
        await stream.send_all(head)
        for piece in pieces:
            await stream.send_all(piece)  # the held bytes themselves: no copy
        await stream.send_all(tail)

    async def _error(self, stream: trio.SocketStream, exc: ClientError) -> None:
        """Answer `exc` and let the caller close (the request may be half read)."""
        self.answered[exc.status] += 1
        with trio.move_on_after(self.spec.send_timeout_s):
            await stream.send_all(_plain(exc.status, str(exc)))
            await stream.send_eof()
        with trio.move_on_after(_LINGER_S):
            drained = 0
            while drained < _LINGER_BYTES:
                got = await stream.receive_some(_RECEIVE_BYTES)
                if not got:
                    break
                drained += len(got)

    async def _refuse_busy(self, stream: trio.SocketStream) -> None:
        """503, after taking the head when it comes at once: closing a socket with
        unread data resets it, and the client would not see the answer."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.spec.max_header_bytes)
        with trio.move_on_after(_BUSY_HEAD_S):
            try:
                await _read_head(stream, conn)
            except h11.RemoteProtocolError:
                pass
        await self._error(stream, ClientError(
            503, f"busy: {self.spec.max_concurrent} connections served at once"))


async def _read_head(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    """The next request's head, or None when the client closed. Raises
    h11.RemoteProtocolError."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_RECEIVE_BYTES))
        elif isinstance(event, h11.Request):
            return event
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:  # h11 gives a server nothing else before a request
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")


def _has_partial_head(conn: h11.Connection) -> bool:
    return bool(conn.trailing_data[0])


def _plain(status: int, text: str) -> bytes:
    body = (text[:200] + "\n").encode("utf-8", "replace")
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class WeightsHttpError(OSError):
    """The chunk side channel cannot listen where it was asked to."""


async def serve_beside(server: ChunkServer, listen: Iterable[str], port: int, *,
                       task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run `server` on the host of the first /ip4 or /ip6 libp2p listen address (all
    interfaces when there is none) at `port` (0: any free one). Raises WeightsHttpError
    when it cannot bind."""
    host = _listen_host(listen)
    try:
        await server.run(host, port, task_status=task_status)
    except OSError as exc:
        raise WeightsHttpError(
            f"cannot serve weight chunks over HTTP on {host}:{port} "
            f"({exc.strerror or exc}); choose another --weights-http-port, or off") from None


def _listen_host(listen: Iterable[str]) -> str:
    for addr in listen:
        ma = multiaddr.Multiaddr(addr)
        names = [p.name for p in ma.protocols()]
        for proto in ("ip4", "ip6"):
            if proto in names:
                return str(ma.value_for_protocol(proto))
    return "0.0.0.0"
