"""The web view, `/ui`: a page served by the daemon that shows the swarm, the ledger,
live plans, Symphony tasks and the routes of recent inference requests.

The page is three hand-written static files in `peerd/api/ui/` (no build step, no
CDN); it reads the same GET APIs and `/events` stream as the CLI.

Authentication. A browser cannot send a bearer header when it navigates, so the
address `peerd ui` prints carries the token once: `/ui?token=T` checks it, sets an
HttpOnly, SameSite=Strict cookie and redirects to `/ui`, which takes the token out of
the address bar. The cookie holds an HMAC of the token, not the token, and is taken
for GET and HEAD only: everything that changes state stays bearer-only, so a page on
another site has nothing to forge (no CSRF surface), and a leaked cookie cannot be
replayed as a bearer token. Its name carries the API port, so two daemons on one
host keep their own.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from html import escape
from importlib import resources
from urllib.parse import parse_qs

from starlette.requests import Request, cookie_parser
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

UI_PATH = "/ui"
SAFE_METHODS = frozenset({"GET", "HEAD"})
# What the page may load, and the content type of each; nothing else is served.
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# The page runs only its own script and talks only to its own daemon.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_SESSION_LABEL = b"peerd web view session v1"


def session_value(token: str) -> str:
    """What the cookie holds: a MAC of the token, so it opens only GETs."""
    return hmac.new(token.encode(), _SESSION_LABEL, hashlib.sha256).hexdigest()


def cookie_name(scope: Scope) -> str:
    server = scope.get("server")
    return f"peerd_ui_{server[1]}" if server and server[1] else "peerd_ui"


def has_session(scope: Scope, token: str) -> bool:
    """A GET or HEAD that carries this daemon's web view cookie."""
    if scope.get("method") not in SAFE_METHODS:
        return False
    raw = dict(scope.get("headers") or []).get(b"cookie")
    if not raw:
        return False
    given = cookie_parser(raw.decode("latin-1")).get(cookie_name(scope), "")
    return hmac.compare_digest(given.encode(), session_value(token).encode())


def is_ui(scope: Scope) -> bool:
    path: str = scope["path"]
    return path == UI_PATH or path.startswith(UI_PATH + "/")


def login_token(scope: Scope) -> str | None:
    """The token of `/ui?token=T`, else None."""
    if scope["path"] != UI_PATH:
        return None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query["token"][0] if query.get("token") else None


async def login(scope: Scope, receive: Receive, send: Send, token: str,
                on_reject: Callable[[str, str], None]) -> None:
    """Answer `/ui?token=T`: the cookie and a redirect to `/ui`, or 401 (counted)."""
    given = login_token(scope) or ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        on_reject("wrong token", scope["path"])
        await refusal(wrong=True)(scope, receive, send)
        return
    response = RedirectResponse(UI_PATH, status_code=303, headers=HEADERS)
    response.set_cookie(cookie_name(scope), session_value(token), path="/", httponly=True,
                        samesite="strict")
    await response(scope, receive, send)


def refusal(*, wrong: bool) -> Response:
    """The 401 page: what went wrong and how to open the view."""
    why = ("The token in this address is not this daemon's." if wrong else
           "This page needs the daemon's API token.")
    body = (f"<!doctype html><meta charset=utf-8><title>peerd: token needed</title>"
            "<link rel=icon href='data:,'>"
            f"<h1>peerd web view</h1><p>{escape(why)}</p>"
            "<p>Open it with <code>peerd ui --open</code>, or open the address that "
            "<code>peerd ui</code> prints (add <code>--data-dir</code> or "
            "<code>--api</code> for another daemon). That address carries the token "
            "once; the page then keeps a cookie.</p>")
    return HTMLResponse(body, status_code=401,
                        headers={**HEADERS, "WWW-Authenticate": "Bearer"})


def _asset(name: str) -> bytes:
    return resources.files("peerd.api").joinpath("ui", name).read_bytes()


def routes() -> list[Route]:
    async def page(request: Request) -> Response:
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8",
                        headers=HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain",
                            headers=HEADERS)
        return Response(_asset(name), media_type=STATIC[name], headers=HEADERS)

    return [Route(UI_PATH, page), Route(UI_PATH + "/{name}", asset)]
