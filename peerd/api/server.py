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
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp

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


async def serve(app: ASGIApp, config: HypercornConfig, sockets: Any,
                shutdown: trio.Event) -> None:
    await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config,
                       sockets=sockets, shutdown_trigger=shutdown.wait)
