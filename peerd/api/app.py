"""Starlette application for the local API: the node's own routes (health, status,
metrics, events) and every service's.

Only `/health` is open; everything else needs `Authorization: Bearer <token>`, the
token kept in the data dir (0600); a GET or HEAD may carry the web view's cookie
instead (`/ui`, webui.py). Bad requests get a JSON error that says what to do;
nothing a client sends can take the daemon down, and a bug of ours met by a request is
logged and answered as a JSON 500, in the same shape. An event stream (`/events`,
`event_stream`) answers a HEAD with its headers alone.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from peerd.api import webui
from peerd.api.errors import ApiError
from peerd.node import Node

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health"}
SSE_KEEPALIVE_S = 15.0


def error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    """OpenAI's error shape, used by every endpoint."""
    return ApiError(status, message, type_).response()


class BearerAuth:
    """ASGI middleware: constant-time bearer token check on all but OPEN_PATHS; a GET
    or HEAD may carry the web view's cookie instead (webui.py), which `/ui?token=T`
    sets."""

    def __init__(self, app: ASGIApp, token: str,
                 on_reject: Callable[[str, str], None]) -> None:
        self.app = app
        self.raw_token = token
        self.token = token.encode()
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        bearer = scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        if not bearer and webui.login_token(scope) is not None:
            await webui.login(scope, receive, send, self.raw_token, self.on_reject)
            return
        if not bearer and not webui.has_session(scope, self.raw_token):
            self.on_reject("missing token" if not header else "wrong token", scope["path"])
            if webui.is_ui(scope):
                await webui.refusal(wrong=False)(scope, receive, send)
                return
            response = error(401, "missing or wrong bearer token; the CLI reads it from "
                             "<data dir>/api_token", "authentication_error")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(node: Node, token: str) -> ASGIApp:
    """The node's own routes, and every started service's (service.py)."""

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "peer_id": node.peer_id, "name": node.name})

    async def status(request: Request) -> Response:
        body = {**node.status(), "api": str(request.base_url).rstrip("/")}
        for service in node.services:
            for key, value in service.status().items():
                if isinstance(value, dict) and isinstance(body.get(key), dict):
                    body[key] = {**body[key], **value}  # e.g. "lent": each its resources
                else:
                    body[key] = value
        return JSONResponse(body)

    async def metrics(request: Request) -> Response:
        return Response(node.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def events(request: Request) -> Response:
        try:
            replay = max(0, min(256, int(request.query_params.get("replay", "0"))))
        except ValueError:
            return error(400, "replay must be an integer")
        types = {t for t in request.query_params.get("types", "").split(",") if t}
        return event_stream(request, _sse(node, replay, types))

    app = Starlette(routes=[
        Route("/health", health),
        Route("/status", status),
        Route("/metrics", metrics),
        Route("/events", events),
        *webui.routes(),
        *(route for service in node.services for route in service.routes()),
    ], exception_handlers={HTTPException: _routing_error, Exception: _crashed})

    def on_reject(reason: str, path: str) -> None:
        # /mcp (plans/mcp_endpoint.py) apart: MCP clients are other programs than the CLI
        mcp = path == "/mcp" or path.startswith("/mcp/")
        node.metrics.rejections.labels("mcp_unauthorized" if mcp else "api_unauthorized").inc()

    return BearerAuth(app, token, on_reject)


async def _routing_error(request: Request, exc: Exception) -> Response:
    """What Starlette's router answers in plain text (no such path, a method the path
    does not take), in our shape."""
    assert isinstance(exc, HTTPException)
    path = f"{request.url.path!r:.120}"
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"no endpoint {path} here; the README's API section lists them"
    elif exc.status_code == 405:
        # every route of the path, not only the first (GET and POST may be two routes)
        allow = sorted({m for route in request.app.router.routes
                        if route.matches(request.scope)[0] == Match.PARTIAL
                        for m in getattr(route, "methods", None) or ()})
        headers["Allow"] = ", ".join(allow)
        message = f"{path} takes {' or '.join(allow)}, not {request.method}"
    else:
        message = exc.detail
    response = ApiError(exc.status_code, message,
                        code="not_found" if exc.status_code == 404 else None).response()
    response.headers.update(headers)
    return response


async def _crashed(request: Request, exc: Exception) -> Response:
    """Starlette's plain-text 500, in our shape: what escaped an endpoint is our bug.
    Starlette raises it again after this answer, and the server (api/server.py) logs its
    traceback; this line says which request met it."""
    log.error("a request failed (our bug): %s %.120s: %s: %.300s", request.method,
              request.url.path, type(exc).__name__, exc)
    return ApiError(500, f"the peer failed on this request ({type(exc).__name__}); its "
                    "log has the details", "server_error").response()


def event_stream(request: Request, stream: AsyncIterator[str]) -> Response:
    """Server-Sent Events of `stream`; a HEAD gets the headers alone, at once (the
    stream would run, unread, until the client closed the connection)."""
    return StreamingResponse(_nothing() if request.method == "HEAD" else stream,
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _nothing() -> AsyncIterator[str]:
    return
    yield


async def _sse(node: Node, replay: int, types: set[str]) -> AsyncIterator[str]:
    yield ": peerd events\n\n"
    async with node.events.subscribe(replay=replay) as stream:
        iterator = stream.__aiter__()
        while True:
            event = None
            with trio.move_on_after(SSE_KEEPALIVE_S):
                event = await iterator.__anext__()
            if event is None:
                yield ": keep-alive\n\n"
                continue
            if types and event.type not in types:
                continue
            yield (f"id: {event.id}\nevent: {event.type}\n"
                   f"data: {json.dumps(event.to_json(), separators=(',', ':'), allow_nan=False)}"
                   "\n\n")


Endpoint = Callable[[Request], Awaitable[Response]]
