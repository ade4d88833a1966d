"""Serve the API with hypercorn's trio worker inside the daemon's event loop.

A client that stops reading must not hold the daemon: hypercorn writes to the socket
in a shielded `send_all` with no deadline (read_timeout and the idle timer do not run
while a response is being sent), so a client that never reads would block that write,
the response feeding it, and the daemon's shutdown, forever. The kernel bounds it
instead: TCP_USER_TIMEOUT on the listening socket (accepted sockets inherit it) drops a
connection whose sent data stays unacknowledged, or whose receive window stays shut,
for `client_stall_s()`; the blocked write then fails and hypercorn closes the
connection, which the app sees as the client leaving. An honest client that reads,
however slowly, and an idle SSE stream (a keep-alive every 15 s) are never cut.

On shutdown the daemon does not wait that long: once hypercorn's grace for in-flight
responses is over, every connection still open on the API's port is shut down at the
socket (`sever`), which fails a blocked write at once.

A request that h11 cannot parse (a malformed request line or header, a Content-Length
that is not a number, headers over its limit) never reaches the app: hypercorn answers
it 400 or 431 with an empty body. `answer_in_words` gives those answers an error body in
the API's shape (errors.py), saying what to change.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from http import HTTPStatus
from itertools import chain
from typing import Any

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp

from peerd.api.errors import ApiError

CLIENT_STALL_S = 30.0  # a client that reads nothing this long has left
# Test-only knob: PEERD_TEST_CLIENT_STALL_S shortens the bound, so a test of a stalled
# client need not wait half a minute.
TEST_STALL_ENV = "PEERD_TEST_CLIENT_STALL_S"


def client_stall_s() -> float:
    """How long a response may wait on a client that does not read before it is
    treated as gone."""
    return float(os.environ.get(TEST_STALL_ENV) or CLIENT_STALL_S)


class ApiBindError(RuntimeError):
    pass


def bind(host: str, port: int) -> tuple[HypercornConfig, Any]:
    """Create the listening socket now, so a busy port is reported before start-up
    goes further, in words the user can act on."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("peerd.api")
    config.graceful_timeout = 0.5
    config.keep_alive_timeout = 30
    try:
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
            # (Linux; elsewhere a stalled client holds its connection until it leaves)
            if (hasattr(socket, "TCP_USER_TIMEOUT")
                    and sock.family in (socket.AF_INET, socket.AF_INET6)):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                round(client_stall_s() * 1000))
    except OSError as exc:
        if exc.errno == 98:  # EADDRINUSE
            raise ApiBindError(f"API address {host}:{port} is already in use (another peerd?);"
                               " choose another with --api HOST:PORT") from None
        raise ApiBindError(f"cannot bind the API to {host}:{port}: {exc.strerror}") from None
    return config, sockets


def protocol_error(status: int) -> bytes:
    """The body of hypercorn's answer to a request h11 could not parse (`status`, its
    hint: 431 for headers over the limit, else 400)."""
    if status == 431:
        words = (f"the request line and headers come to over "
                 f"{HypercornConfig.h11_max_incomplete_size} bytes: send fewer or shorter "
                 "headers")
    else:
        words = ("the request is not HTTP/1.1 that this server can parse (its request line, "
                 "a header, or its Content-Length or chunked body): send a well-formed "
                 "request, as any HTTP client does")
    return json.dumps({"error": ApiError(status, words, code="bad_http").body()}).encode()


def answer_in_words() -> None:
    """Make hypercorn's answers to unparseable requests carry `protocol_error`'s body
    (its own have none). Once per process; a hypercorn without the method it replaces
    keeps its own answers."""
    if getattr(H11Protocol, "_peerd_words", False) or not hasattr(
            H11Protocol, "_send_error_response"):
        return

    async def send_error_response(self: Any, status_code: int) -> None:
        body = protocol_error(status_code)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await self._send_h11_event(h11.Response(
            status_code=status_code, reason=HTTPStatus(status_code).phrase.encode(),
            headers=list(chain(headers, self.config.response_headers("h11")))))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    H11Protocol._send_error_response = send_error_response
    H11Protocol._peerd_words = True


async def serve(app: ASGIApp, config: HypercornConfig, sockets: Any,
                shutdown: trio.Event) -> None:
    answer_in_words()
    listening = [sock.getsockname()[:2] for sock in sockets.insecure_sockets]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sever_on_shutdown, listening, shutdown, config.graceful_timeout)
        await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config,
                           sockets=sockets, shutdown_trigger=shutdown.wait)
        nursery.cancel_scope.cancel()


async def _sever_on_shutdown(listening: list[tuple[str, int]], shutdown: trio.Event,
                             grace_s: float) -> None:
    await shutdown.wait()
    try:
        await trio.sleep(grace_s)
    finally:  # also when the daemon's own grace runs out first and cancels us
        sever(listening)


def sever(listening: list[tuple[str, int]]) -> int:
    """Shut down (both ways) every connected TCP socket of this process whose local
    address is one of `listening`: the API's clients. A write blocked on a client that
    does not read then fails at once instead of after `client_stall_s()`. Linux
    (/proc/self/fd); elsewhere nothing. Returns how many were shut down."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    severed = 0
    for fd in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves ours open
        except OSError:
            continue
        with sock:
            try:
                if (sock.family in (socket.AF_INET, socket.AF_INET6)
                        and sock.type == socket.SOCK_STREAM
                        and _on(sock.getsockname()[:2], listening)):
                    sock.getpeername()  # OSError for the listening socket itself
                    sock.shutdown(socket.SHUT_RDWR)
                    severed += 1
            except OSError:
                continue
    return severed


def _on(local: tuple[str, int], listening: list[tuple[str, int]]) -> bool:
    """Whether a connection's local address is one the API listens on (a wildcard
    host matches any)."""
    return any(port == local[1] and host in (local[0], "0.0.0.0", "::")
               for host, port in listening)
