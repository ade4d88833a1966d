"""Timing a weight sync on loopback, for scripts/bench_rl.py (not a test threshold).

`time_weight_sync` opens one trainer and `samplers` real nodes (libp2p over TCP, Noise,
yamux, all in this process), publishes `tensors` as one version and has every sampler
pull it at once; it reports each pull's seconds and what the trainer uploaded. With
`http` (the daemon's default) every node also serves its chunks over the HTTP side
channel, and the pullers fetch there (the manifest and gossip still go over libp2p).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import multiaddr
import torch
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from peerd.config import Config
from peerd.identity import load_or_create_key
from peerd.ledger.gossip import LedgerGossip
from peerd.node import Node, open_node
from peerd.rl.weights import WeightStore
from protocols.weights import DEFAULT_CHUNK_BYTES, TOPIC

RUN = "sync-timing"


@dataclass(frozen=True)
class SyncTiming:
    kind: str
    nbytes: int  # the version's distinct chunk bytes
    chunks: int
    publish_s: float  # serialise, hash, store, announce
    pull_s: tuple[float, ...]  # each sampler's pull, all started together
    trainer_uploaded: int  # chunk bytes the trainer served
    samplers_uploaded: int  # chunk bytes the samplers served one another
    http_bytes: int  # of the chunk bytes the samplers fetched, those that came over HTTP


async def time_weight_sync(tensors: Mapping[str, torch.Tensor], base_dir: Path, *,
                           samplers: int = 2, kind: str = "full",
                           lora_scale: float | None = None,
                           chunk_bytes: int = DEFAULT_CHUNK_BYTES, http: bool = True
                           ) -> SyncTiming:
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(samplers + 1):
            data_dir = base_dir / f"node{i}"
            config = Config(data_dir=data_dir, listen=("/ip4/127.0.0.1/tcp/0",),
                            name=f"node{i}", target_peers=samplers + 1, heartbeat_s=1.0)
            nodes.append(await stack.enter_async_context(
                open_node(config, load_or_create_key(data_dir))))
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                addr = b.addrs()[0]
                addr = addr if "/p2p/" in addr else f"{addr}/p2p/{b.peer_id}"
                with trio.fail_after(10):
                    await a.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
        ledgers = [LedgerGossip(n) for n in nodes]
        stores = [WeightStore(n, chunk_bytes=chunk_bytes, ledger=ledger,
                              http_port=0 if http else None)
                  for n, ledger in zip(nodes, ledgers, strict=True)]
        for node, ledger, store in zip(nodes, ledgers, stores, strict=True):
            await node.start(ledger, store)
        trainer, pullers = stores[0], stores[1:]
        for store in pullers:
            store.follow(RUN, trainer.node.peer_id)
        with trio.fail_after(30):  # the gossip mesh, so Haves reach everyone
            for node in nodes:
                while len(node.pubsub.peer_topics.get(TOPIC, ())) < samplers:  # noqa: ASYNC110
                    # (pubsub has no event for a subscription heard)
                    await trio.sleep(0.05)
            while http and not all(  # noqa: ASYNC110 (the ledger has no such event)
                    (e := ledger.book.get(n.peer_id)) is not None and e.weights_http_port
                    for ledger in ledgers for n in nodes if n is not ledger.node):
                await trio.sleep(0.05)  # every node's HTTP port in every ledger
        start = trio.current_time()
        manifest = await trainer.publish(RUN, "timing", 1, kind, tensors, lora_scale)
        publish_s = trio.current_time() - start
        pull_s = [0.0] * samplers

        async def pull(i: int) -> None:
            began = trio.current_time()
            await pullers[i].pull(RUN, 1, hints=[trainer.node.peer_id])
            pull_s[i] = trio.current_time() - began

        async with trio.open_nursery() as nursery:
            for i in range(samplers):
                nursery.start_soon(pull, i)
        sizes = manifest.chunk_sizes()
        return SyncTiming(kind=kind, nbytes=sum(sizes.values()), chunks=len(sizes),
                          publish_s=publish_s, pull_s=tuple(pull_s),
                          trainer_uploaded=trainer.served["bytes"],
                          samplers_uploaded=sum(s.served["bytes"] for s in pullers),
                          http_bytes=sum(s.pulled["http_bytes"] for s in pullers))
