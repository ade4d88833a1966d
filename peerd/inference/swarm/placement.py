"""Placement: which layers a new peer should serve when the user does not say.

Pure. The peer takes the contiguous window of layers that fits its memory and
serves the swarm best: first the window covering the most layers nobody serves,
then the one whose layers are least served, then the lowest start (deterministic).
"""

from __future__ import annotations

from collections.abc import Iterable

from peerd.inference.swarm.routing import Server


def coverage(servers: Iterable[Server], num_layers: int) -> list[int]:
    """How many peers serve each layer."""
    counts = [0] * num_layers
    for s in servers:
        for i in range(max(0, s.start), min(num_layers, s.end)):
            counts[i] += 1
    return counts


def window_size(num_layers: int, bytes_per_layer: int, budget_bytes: int) -> int:
    """Layers that fit the memory budget (at least one: a peer that cannot hold one
    layer should not serve at all, which the caller decides)."""
    if bytes_per_layer <= 0:
        return num_layers
    return max(1, min(num_layers, budget_bytes // bytes_per_layer))


def choose_layers(servers: Iterable[Server], num_layers: int, window: int) -> tuple[int, int]:
    counts = coverage(servers, num_layers)
    window = max(1, min(window, num_layers))
    best: tuple[int, int, int] | None = None
    for start in range(num_layers - window + 1):
        span = counts[start:start + window]
        key = (-sum(1 for c in span if c == 0), sum(span), start)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2], best[2] + window
