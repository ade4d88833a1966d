"""Varint-length-prefixed frames over byte streams, with a size cap."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from protocols.errors import FrameTooLarge, WireError
from protocols.framing import (
    StreamClosed,
    encode_uvarint,
    frame,
    read_frame,
    write_frame,
)

LIMIT = 1024


class ScriptedStream:
    """A read/write stream fed from a script of chunks; counts what was read.

    `read` returns at most one chunk (or part of one) per call, like a socket, then
    b"" at EOF, or raises `eof_exc` instead when given (libp2p raises StreamEOF).
    """

    def __init__(self, *chunks: bytes, eof_exc: BaseException | None = None) -> None:
        self.chunks = [c for c in chunks if c]
        self.bytes_read = 0
        self.written = bytearray()
        self.eof_exc = eof_exc

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.chunks:
            if self.eof_exc is not None:
                raise self.eof_exc
            return b""
        chunk = self.chunks[0]
        take = len(chunk) if n is None else min(n, len(chunk))
        out, rest = chunk[:take], chunk[take:]
        if rest:
            self.chunks[0] = rest
        else:
            self.chunks.pop(0)
        self.bytes_read += len(out)
        return out

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += data


class StreamAdapter:
    """libp2p-style read(n)/write over a trio stream (memory_stream_pair)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def read(self, n: int | None = None) -> bytes:
        return await self.stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**32, 2**63])
def test_uvarint_matches_the_multiformats_encoding(n: int) -> None:
    from libp2p.utils.varint import encode_uvarint as reference

    assert encode_uvarint(n) == reference(n)


def test_uvarint_refuses_negative() -> None:
    with pytest.raises(ValueError):
        encode_uvarint(-1)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 1000, LIMIT])
async def test_round_trip_over_memory_streams(size: int) -> None:
    left, right = trio.testing.memory_stream_pair()
    payload = bytes(i % 251 for i in range(size))
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await read_frame(StreamAdapter(right), LIMIT))
        got.append(await read_frame(StreamAdapter(right), LIMIT))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await write_frame(StreamAdapter(left), payload, LIMIT)
            await write_frame(StreamAdapter(left), b"second", LIMIT)
    assert got == [payload, b"second"]


async def test_body_arriving_in_small_pieces() -> None:
    data = frame(b"x" * 500)
    stream = ScriptedStream(*(data[i:i + 7] for i in range(0, len(data), 7)))
    assert await read_frame(stream, LIMIT) == b"x" * 500


async def test_back_to_back_frames_are_not_merged() -> None:
    stream = ScriptedStream(frame(b"one") + frame(b"") + frame(b"three"))
    assert [await read_frame(stream, LIMIT) for _ in range(3)] == [b"one", b"", b"three"]
    with pytest.raises(StreamClosed):
        await read_frame(stream, LIMIT)


async def test_oversized_length_is_refused_before_the_body_is_read() -> None:
    header = encode_uvarint(LIMIT + 1)
    stream = ScriptedStream(header, b"\0" * (LIMIT + 1))
    with pytest.raises(FrameTooLarge) as err:
        await read_frame(stream, LIMIT)
    assert err.value.reason == "oversized"
    assert stream.bytes_read == len(header)  # not one byte of the body


async def test_huge_announced_length_needs_no_body_at_all() -> None:
    # A peer announcing 2**62 bytes must not make us wait for (or buffer) them.
    stream = ScriptedStream(encode_uvarint(2**62))
    with pytest.raises(FrameTooLarge):
        await read_frame(stream, LIMIT)


async def test_writer_refuses_to_send_an_oversized_frame() -> None:
    stream = ScriptedStream()
    with pytest.raises(ValueError):
        await write_frame(stream, b"x" * (LIMIT + 1), LIMIT)
    assert stream.written == b""


@pytest.mark.parametrize("data", [
    frame(b"hello world")[:-3],  # body cut short
    frame(b"hello world")[:1],  # length only
    b"\x80",  # inside the length
    b"\xff\xff",  # inside the length
])
async def test_truncated_frame_is_a_wire_error(data: bytes) -> None:
    with pytest.raises(WireError) as err:
        await read_frame(ScriptedStream(data), LIMIT)
    assert not isinstance(err.value, FrameTooLarge)


async def test_clean_eof_before_a_frame_is_stream_closed() -> None:
    with pytest.raises(StreamClosed):
        await read_frame(ScriptedStream(), LIMIT)


async def test_libp2p_style_eof_exception_counts_as_eof() -> None:
    with pytest.raises(StreamClosed):
        await read_frame(ScriptedStream(eof_exc=StreamEOF()), LIMIT)
    with pytest.raises(WireError):
        await read_frame(ScriptedStream(b"\x05ab", eof_exc=StreamEOF()), LIMIT)


async def test_a_reset_is_not_an_eof() -> None:
    with pytest.raises(StreamReset):
        await read_frame(ScriptedStream(eof_exc=StreamReset()), LIMIT)


async def test_other_read_errors_propagate() -> None:
    with pytest.raises(ConnectionResetError):
        await read_frame(ScriptedStream(eof_exc=ConnectionResetError()), LIMIT)


async def test_memory_stream_closed_by_the_writer_is_stream_closed() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.aclose()
    with trio.fail_after(5):
        with pytest.raises(StreamClosed):
            await read_frame(StreamAdapter(right), LIMIT)


async def test_eleven_byte_varint_is_refused() -> None:
    stream = ScriptedStream(b"\x80" * 10 + b"\x01", b"body")
    with pytest.raises(WireError, match="longer than 10 bytes") as err:
        await read_frame(stream, 2**80)
    assert not isinstance(err.value, FrameTooLarge)
    assert stream.bytes_read == 10  # stopped at the limit, did not read the 11th


async def test_ten_byte_varint_is_the_longest_accepted() -> None:
    # A non-minimal but legal 10-byte encoding of 3.
    stream = ScriptedStream(b"\x83" + b"\x80" * 8 + b"\x00", b"abc")
    assert await read_frame(stream, LIMIT) == b"abc"
