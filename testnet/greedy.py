"""A greedy peer: it takes what shard servers lend and uses it for nothing.

Well-formed greed, not garbage: it opens pipeline sessions the protocol allows (the
largest it may, then smaller ones to fill what is left) and holds them idle, or it
pushes FORWARDs of many positions back to back through one session, cutting its KV
to 0 each time. The tests and `scripts/bench_fairness.py` use it to check that
peers lend in fair shares (peerd/shares.py, peerd/inference/swarm/lending.py,
peerd/turns.py). It speaks peerd's own protocol through peerd's own pipeline client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import trio
from libp2p.crypto.keys import KeyPair

from peerd.config import Config
from peerd.identity import ensure_data_dir, load_or_create_key
from peerd.inference.swarm.pipeline import Pipeline, PipelineFailure, PipelineSession
from peerd.inference.swarm.routing import Route, Span, find_route, servers_by_model
from peerd.ledger.gossip import LedgerGossip
from peerd.node import Node, open_node


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


# ---- as a process: `python -m testnet.greedy` (scripts/bench_fairness.py) -------------

LENGTHS = (8192, 4096, 2048, 1024, 512, 256, 128, 64)  # largest first, then fill
TOP_UP_S = 2.0  # how often it opens sessions again to replace what was taken back


async def run_process(config: Config, key_pair: KeyPair, model_id: str, hidden_size: int,
                      idle: bool, flood_positions: int, report: Path) -> None:
    """Join the swarm, wait for a route covering the model, then take: idle sessions
    along it (topped up forever), and/or a flood of long FORWARDs; write what it holds
    to `report` (JSON) every TOP_UP_S."""
    async with open_node(config, key_pair) as node:
        ledger = LedgerGossip(node)
        await node.start(ledger)
        while True:
            entries = ledger.book.entries()
            servers = servers_by_model(entries).get(model_id, [])
            layers = max((m.num_layers for e in entries for m in e.models
                          if m.model_id == model_id), default=0)
            found = find_route(servers, layers) if layers else None
            if isinstance(found, Route):
                break
            await trio.sleep(0.5)
        greedy = GreedyPeer(node, model_id, hidden_size)
        async with trio.open_nursery() as nursery:
            if flood_positions:
                nursery.start_soon(greedy.flood, found, flood_positions)
            while True:
                if idle:
                    greedy.held = [s for s in greedy.held if not s.failed.is_set()]
                    await greedy.hold(found, LENGTHS)
                await trio.Path(report).write_text(json.dumps({
                    "peer_id": node.peer_id, "held": len(greedy.held),
                    "refused": greedy.refused, "forwards": greedy.forwards,
                    "failures": greedy.failures}))
                await trio.sleep(TOP_UP_S)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m testnet.greedy", description=__doc__)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--bootstrap", required=True, metavar="MULTIADDR")
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--hidden-size", type=int, required=True)
    ap.add_argument("--idle", action="store_true", help="hold idle sessions (topped up)")
    ap.add_argument("--flood", type=int, default=0, metavar="POSITIONS",
                    help="FORWARDs of this many positions, back to back")
    args = ap.parse_args(argv)
    ensure_data_dir(args.data_dir)
    config = Config(data_dir=args.data_dir, listen=("/ip4/127.0.0.1/tcp/0",),
                    bootstrap=(args.bootstrap,), name=args.data_dir.name, heartbeat_s=2.0)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run_process, config, load_or_create_key(args.data_dir), args.model_id,
                 args.hidden_size, args.idle, args.flood, args.data_dir / "greedy.json")


if __name__ == "__main__":
    main()
