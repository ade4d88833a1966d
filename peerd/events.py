"""In-process event bus behind `GET /events` (Server-Sent Events).

Publishing never blocks the daemon: each subscriber has a bounded queue, and a
subscriber that falls behind loses its oldest events (it is told how many). A short
history lets a new subscriber see what just happened.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

HISTORY = 256
SUBSCRIBER_QUEUE = 1024


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: str  # e.g. "peer.connected", "ledger.accepted", "ledger.rejected"
    ts: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The event as plain JSON values: what a publisher put in `data` may have come
        from a peer (a NaN, bytes, a lone surrogate), and one event that `json.dumps`
        refused ended every subscriber's stream, and every replay while it was in the
        history."""
        return {"id": self.id, "type": self.type, "ts": self.ts, **json_safe(self.data)}


def json_safe(value: Any) -> Any:
    """`value` as strict JSON can carry it: NaN and infinities as null, bytes as hex,
    text that cannot be UTF-8 escaped, tuples as lists, keys as text, anything else as
    its (short) str."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            value.encode()
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, bytes | bytearray):
        return bytes(value[:1024]).hex()
    if isinstance(value, dict):
        return {json_safe(k if isinstance(k, str) else str(k)): json_safe(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    return json_safe(str(value)[:300])


class _Subscriber:
    def __init__(self) -> None:
        self.queue: deque[Event] = deque(maxlen=SUBSCRIBER_QUEUE)
        self.dropped = 0
        self.wakeup = trio.Event()


class _Stream:
    """A subscriber's events. Cancel-safe: a wait cut short (an SSE keep-alive's
    timeout) loses nothing and the next `__anext__` goes on, which an async generator
    would not allow (the cancellation would end it)."""

    def __init__(self, sub: _Subscriber) -> None:
        self.sub = sub

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Event:
        sub = self.sub
        while not sub.queue:
            sub.wakeup = trio.Event()
            await sub.wakeup.wait()
        if sub.dropped:
            n, sub.dropped = sub.dropped, 0
            return Event(0, "events.dropped", time.time(), {"count": n})
        return sub.queue.popleft()


class EventBus:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._subscribers: set[_Subscriber] = set()

    def publish(self, type: str, **data: Any) -> Event:
        event = Event(next(self._ids), type, time.time(), data)
        self._history.append(event)
        for sub in self._subscribers:
            if len(sub.queue) == sub.queue.maxlen:
                sub.dropped += 1
            sub.queue.append(event)
            sub.wakeup.set()
        return event

    def recent(self, limit: int = HISTORY) -> list[Event]:
        return list(self._history)[-limit:]

    @asynccontextmanager
    async def subscribe(self, replay: int = 0) -> AsyncIterator[AsyncIterator[Event]]:
        """`async with bus.subscribe() as events: async for ev in events: ...`"""
        sub = _Subscriber()
        sub.queue.extend(self.recent(replay) if replay else [])
        self._subscribers.add(sub)

        try:
            yield _Stream(sub)
        finally:
            self._subscribers.discard(sub)
