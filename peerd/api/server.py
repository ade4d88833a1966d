"""Serve the API with hypercorn's trio worker inside the daemon's event loop."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp


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
