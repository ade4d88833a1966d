"""Stream failures are caught by type: what ends a stream, and what does not."""

from __future__ import annotations

import pytest
import trio
from libp2p.network.stream.exceptions import StreamClosed as NetStreamClosed
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset

from peerd.loopback import loopback_pair
from peerd.streams import STREAM_FAILURES
from protocols.framing import StreamClosed

PEER = "12D3KooWExamplePeerIdThatIsNotCheckedHere"


# ---- stream failures, by type ---------------------------------------------------------


@pytest.mark.parametrize("exc", [StreamEOF(), StreamReset(), NetStreamClosed(),
                                 MuxedStreamReset(), MuxedStreamEOF(), StreamClosed(),
                                 trio.BrokenResourceError(), trio.ClosedResourceError()],
                         ids=lambda e: type(e).__name__)
def test_what_ends_a_stream_is_a_stream_failure(exc: Exception) -> None:
    assert isinstance(exc, STREAM_FAILURES)


@pytest.mark.parametrize("exc", [ValueError(), RuntimeError(), trio.TooSlowError(),
                                 ConnectionRefusedError()], ids=lambda e: type(e).__name__)
def test_our_bugs_and_deadlines_are_not_stream_failures(exc: Exception) -> None:
    assert not isinstance(exc, STREAM_FAILURES)


async def test_a_loopback_write_to_a_gone_peer_is_a_stream_failure() -> None:
    ours, theirs = loopback_pair(PEER)
    await theirs.close()
    with pytest.raises(STREAM_FAILURES):
        await ours.write(b"x")
    await ours.close()
    with pytest.raises(STREAM_FAILURES):
        await ours.write(b"x")
