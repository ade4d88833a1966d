"""In-process streams for protocols a peer speaks with itself.

libp2p cannot dial its own peer id, but a pipeline route may well pass through the
entry peer's own shard. `LoopbackStream` gives the local handler the same interface
as a libp2p stream (read/write/close/reset, `muxed_conn.peer_id`), so every code path
stays one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio


@dataclass(frozen=True, slots=True)
class _Conn:
    peer_id: str


class LoopbackStream:
    def __init__(self, stream: Any, peer_id: str) -> None:
        self._stream = stream
        self.muxed_conn = _Conn(peer_id)

    async def read(self, n: int | None = None) -> bytes:
        try:
            data: bytes = await self._stream.receive_some(n)
            return data
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return b""

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close_write(self) -> None:
        await self._stream.send_eof()

    async def close(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        await trio.aclose_forcefully(self._stream)


def loopback_pair(peer_id: str) -> tuple[LoopbackStream, LoopbackStream]:
    import trio.testing  # (here: it imports pytest, which a daemon has no use for)

    a, b = trio.testing.memory_stream_pair()
    return LoopbackStream(a, peer_id), LoopbackStream(b, peer_id)
