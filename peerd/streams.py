"""Streams, whatever the protocol: the failures that end one, closing one, a best-effort
send, the peer at the far end. `peerd/rpc.py` builds request/response protocols on these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamError
from libp2p.stream_muxer.exceptions import MuxedStreamError

from protocols.codec import Message, encode
from protocols.framing import StreamClosed, write_frame

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


async def close_stream(stream: Any) -> None:
    with trio.move_on_after(1.0) as scope:
        try:
            await stream.close()
        except Exception:
            scope.cancel()
    if scope.cancelled_caught:
        try:
            await stream.reset()
        except Exception:
            pass
