"""Streams that open with no round trip: multistream-select written, not waited for.

`host.new_stream` negotiates a stream's protocol before handing it over: it writes
the multistream header and waits for its echo, then proposes the protocol and waits
for the acceptance, two round trips per stream (py-libp2p 0.8.1 has no "lazy"
negotiation). On a pipeline session's chain of new streams that was most of a cold
request's time (bench/README.md, "Cold sessions").

`open_eager` writes the header and the protocol at once and returns: the caller's
first frame follows in the same flight. The listener's two answers are read, and
checked, in front of the first byte the caller reads. Where the listener does not
serve the protocol ("na": an older peer speaking an earlier version), that first
read raises `NotSpoken`, a clear error and not a broken stream. The listener's side
is libp2p's own (it reads what it is sent in order), so nothing changes there.
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_delim

MULTISTREAM = "/multistream/1.0.0"
NOT_AVAILABLE = "na"
MAX_ANSWER_BYTES = 1024  # a protocol id and its newline; the multistream spec's limit is 64 KiB


class NotSpoken(Exception):
    """The far end answered that it does not serve `protocol`."""

    def __init__(self, peer_id: str, protocol: str, answer: str) -> None:
        super().__init__(f"{peer_id} does not speak {protocol} (it answered {answer!r:.80}): "
                         "it may run another version of peerd")
        self.peer_id = peer_id
        self.protocol = protocol


class EagerStream:
    """A libp2p stream whose negotiation is in flight: writes go straight out; the first
    read checks the listener's answers first (NotSpoken when it refused the protocol)."""

    def __init__(self, stream: Any, peer_id: str, protocol: str) -> None:
        self._stream = stream
        self._peer_id = peer_id
        self._protocol = protocol
        self._answered = False
        self.muxed_conn = stream.muxed_conn  # for the far end's peer id

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def read(self, n: int | None = None) -> bytes:
        if not self._answered:
            await self._check_answers()
        data: bytes = await self._stream.read(n)
        return data

    async def close_write(self) -> None:
        """No more writes (the far end reads EOF); reads go on, as on any stream."""
        await self._stream.close_write()

    async def close(self) -> None:
        await self._stream.close()

    async def reset(self) -> None:
        await self._stream.reset()

    async def _check_answers(self) -> None:
        header = await self._line()
        if header != MULTISTREAM:
            raise NotSpoken(self._peer_id, self._protocol, header)
        answer = await self._line()
        if answer != self._protocol:
            raise NotSpoken(self._peer_id, self._protocol, answer)
        self._answered = True

    async def _line(self) -> str:
        """One multistream message: a uvarint length, then that many bytes ending "\\n"
        (read exactly, so nothing of the caller's first frame is taken)."""
        length = shift = 0
        for _ in range(4):
            b = await self._exactly(1)
            length |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80:
                break
        if not 0 < length <= MAX_ANSWER_BYTES:
            raise NotSpoken(self._peer_id, self._protocol, f"<{length} bytes>")
        body = await self._exactly(length)
        if not body.endswith(b"\n"):
            raise NotSpoken(self._peer_id, self._protocol, repr(body[:40]))
        return body[:-1].decode(errors="replace")

    async def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk: bytes = await self._stream.read(n - len(out))
            if not chunk:
                raise EOFError("stream ended inside the multistream answer")
            out += chunk
        return out


async def open_eager(host: Any, peer_id: str, protocol: str) -> EagerStream:
    """A new stream to `peer_id` (dialled first if not connected) with `protocol`
    proposed and not yet confirmed: see the module's docstring."""
    stream = await host.get_network().new_stream(ID.from_base58(peer_id))
    try:
        await stream.write(encode_delim(MULTISTREAM.encode()) + encode_delim(protocol.encode()))
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0), \
                contextlib.suppress(Exception):
            await stream.reset()
        raise
    stream.set_protocol(protocol)
    return EagerStream(stream, peer_id, protocol)
