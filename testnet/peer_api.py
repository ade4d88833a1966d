"""Calling the peers' HTTP APIs from the launcher, tests and scripts.

One process-wide client, and `map_peers` to ask many peers at once: on a 2-core
machine with dozens of busy peers, HTTP waits dominate and a client per call costs
too much CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import httpx

T = TypeVar("T")
R = TypeVar("R")


class ApiPeer(Protocol):
    """What calling a peer's API needs: `PeerInfo` is one."""

    @property
    def api(self) -> str: ...  # base URL, e.g. http://127.0.0.1:14100

    @property
    def token(self) -> str: ...  # bearer token for everything but /health


def api_request(
    peer: ApiPeer,
    method: str,
    path: str,
    *,
    json: Any = None,
    timeout_s: float = 10.0,
) -> Any:
    """Call a peer's HTTP API with its bearer token; the decoded JSON reply.

    Raises `httpx.HTTPStatusError` on a non-2xx reply and `httpx.TransportError`
    if the peer does not answer.
    """
    reply = http_client().request(
        method,
        peer.api + path,
        json=json,
        headers={"Authorization": f"Bearer {peer.token}"},
        timeout=timeout_s,
    )
    reply.raise_for_status()
    return reply.json()


def api_get(peer: ApiPeer, path: str, *, timeout_s: float = 10.0) -> Any:
    return api_request(peer, "GET", path, timeout_s=timeout_s)


def map_peers(items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """`fn` over every item concurrently (threads; HTTP waits dominate), in order."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(items))) as pool:
        return list(pool.map(fn, items))


@functools.cache
def http_client() -> httpx.Client:
    """One client for the process: a fresh one per call costs an SSL context's worth
    of CPU, which a status of 32 busy peers on 2 cores cannot spare. Thread-safe."""
    return httpx.Client(limits=httpx.Limits(max_connections=64))
