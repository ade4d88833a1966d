"""Serving and calling request/response stream protocols declared in `protocols/`.

One place enforces what every protocol needs: a per-protocol and per-peer
concurrency cap (py-libp2p's resource manager does not enforce them), a size cap on
every frame, strict decoding before the handler runs, a deadline on the whole
exchange, an error reply on refusal, and a handler that can never take the host
down (LIBP2P_NOTES.md trap 1).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from libp2p.peer.id import ID

from peerd.streams import STREAM_FAILURES, Dial, close_stream, remote_peer, send_quietly
from protocols.codec import Message, decode, encode
from protocols.errors import PeerError, RemoteError, WireError
from protocols.framing import StreamClosed, read_frame, write_frame
from protocols.spec import ErrorReply, RequestResponse

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Handler = Callable[[str, Any], Awaitable[Message]]
OffenceHook = Callable[[str, str, str], None]  # (peer id, reason, detail)

_ERROR_REPLY_MAX = 4096


class Busy(PeerError):
    reason = "busy"


class _PeerLimiter:
    """At most `per_peer` concurrent streams per remote peer, `total` overall."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = trio.CapacityLimiter(total)
        self.per_peer = per_peer
        self.active: Counter[str] = Counter()

    def try_enter(self, peer: str, token: object) -> bool:
        if self.active[peer] >= self.per_peer:
            return False
        try:
            self.total.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            return False
        self.active[peer] += 1
        return True

    def leave(self, peer: str, token: object) -> None:
        self.total.release_on_behalf_of(token)
        self.active[peer] -= 1
        if self.active[peer] <= 0:
            del self.active[peer]


REQUEST_READ_S = 10.0  # for a request's first bytes, and a small one whole
REQUEST_READ_RATE = 1 << 20  # bytes a second a larger request is given beyond that


def request_read_s(spec: RequestResponse) -> float:
    """How long a handler waits for its request: 10 s, plus a second a MiB of the
    protocol's largest request (a slow link may carry a large one)."""
    return REQUEST_READ_S + spec.max_request_bytes / REQUEST_READ_RATE


def stream_handler(
    spec: RequestResponse, handle: Handler, on_offence: OffenceHook
) -> Callable[[Any], Awaitable[None]]:
    """Wrap `handle(peer_id, request) -> response` as a libp2p stream handler."""
    limiter = _PeerLimiter(spec.max_concurrent, spec.max_concurrent_per_peer)

    async def handler(stream: Any) -> None:
        peer = remote_peer(stream)
        token = object()
        entered = cut = False
        try:
            if not limiter.try_enter(peer, token):
                raise Busy(f"too many concurrent {spec.id} streams")
            entered = True
            with trio.fail_after(spec.timeout_s):
                # the request whole within a short time of its own: a peer that opens
                # streams and sends nothing would hold their slots for the whole
                # exchange's deadline (15 minutes of a sampler's, for a rollout)
                with trio.fail_after(min(spec.timeout_s, request_read_s(spec))):
                    raw = await read_frame(stream, spec.max_request_bytes)
                request = decode(raw, spec.request)
                response = await handle(peer, request)
                await write_frame(stream, encode(response), spec.max_response_bytes)
        except StreamClosed:
            pass
        except Busy as exc:
            await _reply_error(stream, exc.reason, str(exc))
        except PeerError as exc:
            on_offence(peer, exc.reason, str(exc))
            await _reply_error(stream, exc.reason, str(exc))
        except trio.TooSlowError:
            cut = True  # perhaps in the middle of our reply
            on_offence(peer, "timeout", f"{spec.id} exchange exceeded {spec.timeout_s} s")
        except STREAM_FAILURES as exc:
            log.debug("%s stream from %s failed: %r", spec.id, peer, exc)
        except Exception:  # our bug: keep serving
            log.exception("%s handler failed for peer %s", spec.id, peer)
            await _reply_error(stream, "internal", "internal error; see the peer's log")
        finally:
            if entered:
                limiter.leave(peer, token)
            await close_stream(stream, abort=cut)

    return handler


async def call(
    host: Any, peer_id: str, spec: RequestResponse, request: Message,
    timeout_s: float | None = None, *, dial: Dial | None = None,
) -> Any:
    """One request/response exchange with a deadline. Raises PeerError when the
    peer answers garbage, RemoteError when it answers with an error reply,
    trio.TooSlowError on the deadline, and the transport's errors otherwise.
    `dial` opens the stream instead of the host (`Node.new_stream` reaches ourselves
    too)."""
    with trio.fail_after(timeout_s or spec.timeout_s):
        if dial is not None:
            stream = await dial(peer_id, spec.id)
        else:
            stream = await host.new_stream(ID.from_base58(peer_id), [spec.id])
        try:
            await write_frame(stream, encode(request), spec.max_request_bytes)
            await stream.close_write()
            try:
                raw = await read_frame(stream, spec.max_response_bytes)
            except StreamClosed:
                raise WireError(f"{spec.id}: peer closed the stream without a reply") from None
            reply = decode(raw, spec.response, ErrorReply)
            if isinstance(reply, ErrorReply):  # the peer's words, quoted briefly
                raise RemoteError(reply.code[:64], reply.message[:1000])
            return reply
        finally:
            await close_stream(stream)


async def _reply_error(stream: Any, code: str, message: str) -> None:
    await send_quietly(stream, ErrorReply(code=code, message=message[:1000]), _ERROR_REPLY_MAX)
