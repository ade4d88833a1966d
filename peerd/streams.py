"""Streams, whatever the protocol: the failures that end one, closing one, a best-effort
send, the peer at the far end, and the opening handshake of a `SessionStream`.

`peerd/rpc.py` builds request/response protocols on these; session streams (the shard
pipeline) open with `open_session`, so the OPEN -> OPENED | refusal exchange, its
deadline, size cap and strict decoding are written once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamError
from libp2p.stream_muxer.exceptions import MuxedStreamError

from peerd.eager import NotSpoken
from protocols.codec import Message, decode, encode
from protocols.errors import PeerError
from protocols.framing import StreamClosed, read_frame, write_frame
from protocols.spec import SessionStream

Dial = Callable[[str, str], Awaitable[Any]]  # (peer id, protocol id) -> stream

# How a stream ends under us, by type (as py-libp2p 0.8.1 raises them):
# - NetStream.read/write turn every muxer and connection error into a StreamError:
#   StreamEOF at the far end's close (framing reads it as EOF: it is an EOFError),
#   StreamReset, StreamClosed on a write after close;
# - NetStream.close calls the muxed stream directly: MuxedStreamError and its kin;
# - peerd.loopback streams are trio memory streams: a write raises BrokenResourceError
#   once the far end is gone, ClosedResourceError after our own close;
# - protocols.framing.StreamClosed: the far end closed cleanly before a frame began.
STREAM_FAILURES: tuple[type[Exception], ...] = (
    StreamError,
    MuxedStreamError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    StreamClosed,
)
# the same, or a peer gone quiet past a deadline (trio.fail_after) on the stream
STREAM_FAILURES_OR_TIMEOUT: tuple[type[Exception], ...] = (trio.TooSlowError, *STREAM_FAILURES)


def remote_peer(stream: Any) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except Exception:
        return "unknown"


async def send_quietly(stream: Any, msg: Message, max_size: int) -> None:
    """Best effort, within a second: a reply or notice to a peer that may be gone."""
    with trio.move_on_after(1.0):
        try:
            await write_frame(stream, encode(msg), max_size)
        except Exception:
            pass


async def close_stream(stream: Any, *, abort: bool = False) -> None:
    """Close `stream` within about a second (a reset if the close fails), whatever
    cancels the caller: it is shielded.

    From a cancelled scope (the caller's deadline passed, its nursery was cancelled),
    or with `abort`, the stream is reset instead: a frame may have been cut part-way
    (a write of over 64 KiB goes out in several muxer frames), and a close would hand
    the far end a truncated frame to count against us as malformed, or leave it
    waiting out its own deadline for the rest."""
    cut = abort or trio.current_effective_deadline() == -math.inf
    with trio.CancelScope(shield=True):
        if not cut:
            with trio.move_on_after(1.0):
                try:
                    await stream.close()
                    return
                except Exception:
                    pass
        with trio.move_on_after(1.0):
            try:
                await stream.reset()
            except Exception:
                pass


# ---- opening a session stream ----------------------------------------------------------


class OpenFailed(Exception):
    """A session stream to `peer` did not open. Not a PeerError on purpose: the peer at
    fault is the one dialled, not the one the caller may be serving; the caller decides
    whom to blame."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(message)
        self.peer = peer


class Unreachable(OpenFailed):
    """No answer: the dial failed, the stream broke or closed, or the deadline passed."""


class BadAnswer(OpenFailed):
    """An answer outside the protocol: oversized, undecodable, of a type not allowed
    there, or not the answer to this opening (another session)."""


class Unsupported(OpenFailed):
    """The peer does not serve the protocol (an older or newer version of peerd)."""


class OpenRefused(OpenFailed):
    """The peer answered with one of the protocol's refusals: `reply`, which says why
    in `code` and `message` (SessionStream.refusals)."""

    def __init__(self, peer: str, reply: Message) -> None:
        self.reply = reply
        self.code: str = getattr(reply, "code")  # noqa: B009 (declared, not typed)
        self.message: str = getattr(reply, "message")  # noqa: B009
        super().__init__(peer, f"{peer} refused: {self.code}: {self.message}")


async def open_session(dial: Dial, peer_id: str, spec: SessionStream, opening: Message,
                       accept: Callable[[Any], bool] = lambda answer: True,
                       ) -> tuple[Any, Message]:
    """Open a `spec` stream to `peer_id`: dial, write `opening`, read the answer within
    `spec.open_timeout_s` and `spec.max_control_bytes`, decode it strictly.

    Returns the stream, now the caller's to close, and the `spec.opened` answer when
    `accept(answer)`. Otherwise the stream is closed here and this raises OpenRefused,
    BadAnswer, Unsupported or Unreachable (all OpenFailed); anything else it raises is
    our own bug.
    """
    stream: Any = None
    try:
        with trio.fail_after(spec.open_timeout_s):
            stream = await send_opening(dial, peer_id, spec, opening)
            answer = await read_answer(stream, peer_id, spec, accept)
    except trio.TooSlowError:
        if stream is not None:
            await close_stream(stream)
        raise Unreachable(peer_id, f"{peer_id} did not answer within "
                          f"{spec.open_timeout_s} s") from None
    except BaseException:
        if stream is not None:
            await close_stream(stream)
        raise
    return stream, answer


async def send_opening(dial: Dial, peer_id: str, spec: SessionStream, opening: Message) -> Any:
    """Dial `peer_id` for `spec` and write `opening`; the stream, its answer unread (the
    caller may write on before it comes: a pipelined opening). Unreachable if the dial
    or the write fails; the caller closes the stream."""
    if not isinstance(opening, spec.opens):
        raise TypeError(f"{type(opening).__name__} does not open {spec.id}")
    stream = await _dial(dial, peer_id, spec.id)
    try:
        await write_frame(stream, encode(opening), spec.max_control_bytes)
    except STREAM_FAILURES as exc:
        await close_stream(stream)
        raise Unreachable(peer_id, f"{peer_id} broke the stream: {exc!r:.200}") from None
    except BaseException:  # cancelled, perhaps mid-write: the caller never gets the stream
        await close_stream(stream, abort=True)
        raise
    return stream


async def read_answer(stream: Any, peer_id: str, spec: SessionStream,
                      accept: Callable[[Any], bool] = lambda answer: True) -> Message:
    """The listener's answer to an opening: `spec.opened` when `accept(answer)`, else
    OpenRefused, BadAnswer, Unsupported or Unreachable. The stream stays open (the
    caller's to close); the caller sets the deadline."""
    try:
        raw = await read_frame(stream, spec.max_control_bytes)
        answer = decode(raw, spec.opened, *spec.refusals)
    except NotSpoken as exc:
        raise Unsupported(peer_id, str(exc)) from None
    except StreamClosed:
        raise Unreachable(peer_id, f"{peer_id} closed the stream without an answer") from None
    except STREAM_FAILURES as exc:
        raise Unreachable(peer_id, f"{peer_id} broke the stream: {exc!r:.200}") from None
    except PeerError as exc:
        raise BadAnswer(peer_id, f"{peer_id} answered outside {spec.id}: {exc}") from None
    if isinstance(answer, spec.refusals):
        raise OpenRefused(peer_id, answer)
    if not accept(answer):
        raise BadAnswer(peer_id, f"{peer_id} answered another opening: {answer!r:.200}")
    return answer


async def _dial(dial: Dial, peer_id: str, protocol: str) -> Any:
    try:
        return await dial(peer_id, protocol)
    except Exception as exc:
        # A dial fails in many ways (no connection, a bad peer id, a protocol the peer
        # does not serve, the loopback's ConnectionRefusedError): here they all mean
        # the same thing.
        raise Unreachable(peer_id, f"cannot reach {peer_id}: {type(exc).__name__}") from None
