"""Varint-length-prefixed frames over a byte stream, with a per-protocol size cap.

The length is checked before the body is read, so a peer cannot make us buffer more
than the protocol's maximum. We do not use `libp2p.io.utils.read_exactly`: it gives
up after 100 partial reads (LIBP2P_NOTES.md).
"""

from __future__ import annotations

from typing import Protocol

from protocols.errors import FrameTooLarge, WireError

_MAX_VARINT_BYTES = 10


class ByteStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


class StreamClosed(Exception):
    """The stream ended (cleanly) before a frame began."""


def encode_uvarint(n: int) -> bytes:
    if n < 0:
        raise ValueError("uvarint must be non-negative")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def frame(payload: bytes) -> bytes:
    return encode_uvarint(len(payload)) + payload


async def write_frame(stream: ByteStream, payload: bytes, max_size: int) -> None:
    if len(payload) > max_size:
        # Our bug (or a caller's): never send what the peer must refuse.
        raise ValueError(f"frame of {len(payload)} bytes exceeds the limit {max_size}")
    await stream.write(frame(payload))


async def read_frame(stream: ByteStream, max_size: int) -> bytes:
    """Read one frame. Raises StreamClosed at a clean EOF before the frame starts,
    FrameTooLarge before reading an oversized body, WireError on a truncated frame."""
    length = 0
    shift = 0
    for i in range(_MAX_VARINT_BYTES):
        b = await _read_some(stream, 1)
        if not b:
            if i == 0:
                raise StreamClosed("stream closed")
            raise WireError("stream ended inside a frame length")
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    else:
        raise WireError("frame length varint longer than 10 bytes")
    if length > max_size:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit {max_size}")
    body = bytearray()
    while len(body) < length:
        chunk = await _read_some(stream, length - len(body))
        if not chunk:
            raise WireError(f"stream ended after {len(body)} of {length} frame bytes")
        body.extend(chunk)
    return bytes(body)


async def _read_some(stream: ByteStream, n: int) -> bytes:
    try:
        return await stream.read(n)
    except EOFError:
        # libp2p raises StreamEOF (an EOFError) at EOF instead of returning b"";
        # a StreamReset is no EOF and goes on up.
        return b""
