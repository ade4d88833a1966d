"""A greedy peer: it takes what shard servers lend and uses it for nothing.

Well-formed greed, not garbage: it opens pipeline sessions the protocol allows (the
largest it may, then smaller ones to fill what is left) and holds them idle, or it
pushes FORWARDs of many positions back to back through one session, cutting its KV
to 0 each time. The tests and `scripts/bench_fairness.py` use it to check that
peers lend in fair shares (peerd/shares.py, peerd/inference/swarm/lending.py,
peerd/turns.py). It speaks peerd's own protocol through peerd's own pipeline client.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import trio

from peerd.inference.swarm.pipeline import Pipeline, PipelineFailure, PipelineSession
from peerd.inference.swarm.routing import Route, Span
from peerd.node import Node


def whole(peer_id: str, num_layers: int) -> Route:
    """A route through one peer that serves every layer."""
    return Route((Span(peer_id, 0, num_layers, 0.0),), 0.0)


class GreedyPeer:
    def __init__(self, node: Node, model_id: str, hidden_size: int) -> None:
        self.node = node
        self.hidden_size = hidden_size
        self.pipeline = Pipeline(node, model_id)
        self.pipeline.register()
        self.held: list[PipelineSession] = []
        self.refused = 0  # opens refused (the servers' shares at work)
        self.forwards = 0  # flood forwards that went through
        self.failures = 0  # flood forwards that did not (evicted, refused)

    async def hold(self, route: Route, lengths: Sequence[int]) -> int:
        """Open sessions on `route`, one per max_length in `lengths` (largest first,
        then smaller ones to fill what is left), and keep them idle; how many opened."""
        opened = 0
        for length in lengths:
            try:
                self.held.append(await self.pipeline.open(route, length))
                opened += 1
            except PipelineFailure:
                self.refused += 1
        return opened

    async def flood(self, route: Route, positions: int, rounds: int | None = None) -> None:
        """FORWARDs of `positions` random positions back to back (keep=0 each time),
        `rounds` of them or until cancelled; a session that fails is opened again."""
        session: PipelineSession | None = None
        hidden = torch.randn(1, positions, self.hidden_size)  # [1, T, H]
        done = 0
        try:
            while rounds is None or done < rounds:
                if session is None:
                    try:
                        session = await self.pipeline.open(route, positions)
                    except PipelineFailure:
                        self.refused += 1
                        await trio.sleep(0.05)
                        continue
                try:
                    await session.step(hidden, 0, keep=0)
                    self.forwards += 1
                except PipelineFailure:
                    self.failures += 1
                    await session.close()
                    session = None
                done += 1
        finally:
            if session is not None:
                with trio.CancelScope(shield=True):
                    await session.close()

    async def release(self) -> None:
        with trio.CancelScope(shield=True):
            for s in self.held:
                await s.close()
        self.held.clear()
