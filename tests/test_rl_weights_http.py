"""Weight chunks over the HTTP side channel between real in-process peers (libp2p for
the manifest and gossip, HTTP/1.1 for the chunks): two samplers pull a tiny Llama's
weights over HTTP (counted on both ends), a holder that serves tampered chunks over HTTP
is caught, counted and the pull completes from the trainer, and a holder whose channel
is off or unreachable is asked over libp2p instead."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch

from peerd.rl.weights import WeightStore
from protocols.codec import encode
from protocols.weights import TOPIC, digest
from tests.harness import book, connect, gossip, rejections, swarm, wait_for
from tests.test_rl_weights_swarm import MODEL, RUN, Swarm, assert_same, tiny_llama, weights


@contextlib.asynccontextmanager
async def http_swarm(tmp_path: Path, http: Sequence[bool] = (True, True, True)
                     ) -> AsyncIterator[Swarm]:
    """A trainer and two samplers, all connected, following RUN; node i serves chunks
    over HTTP when http[i], and every node reads the others' ports from its ledger."""
    async with swarm(3, tmp_path, connect="star", target_peers=2) as nodes:
        await connect(nodes[2], nodes[1])
        stores = [WeightStore(n, chunk_bytes=64 * 1024, announce_s=1.0, ledger=gossip(n),
                              http_port=0 if on else None)
                  for n, on in zip(nodes, http, strict=True)]
        for node, store in zip(nodes, stores, strict=True):
            await node.start(store)
        for store in stores[1:]:
            store.follow(RUN, nodes[0].peer_id)
        for node in nodes:
            others = [n for n in nodes if n is not node]

            def ready(node=node, others=others) -> bool:  # type: ignore[no-untyped-def]
                topic = {str(p) for p in node.pubsub.peer_topics.get(TOPIC, set())}
                entries = [book(node).get(o.peer_id) for o in others]
                return topic >= {o.peer_id for o in others} and all(
                    e is not None and (e.weights_http_port > 0) == (s.http_port is not None)
                    for e, s in zip(entries, [st for st in stores if st.node is not node],
                                    strict=True))

            await wait_for(ready, what=f"{node.name} hears every peer and its HTTP port")
        yield Swarm(*stores, nodes=nodes)


async def test_two_samplers_pull_over_http(tmp_path: Path) -> None:
    model = tiny_llama(11)
    tensors = weights(model)
    async with http_swarm(tmp_path) as sw:
        manifest = await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        total = len(manifest.chunk_sizes())
        nbytes = sum(manifest.chunk_sizes().values())
        got1 = await sw.s1.pull(RUN, 1)
        assert_same(got1, tensors)
        # every chunk came over HTTP, and the trainer served them there
        assert sw.s1.pulled["http_chunks"] == total and sw.s1.pulled["http_bytes"] == nbytes
        assert sw.s1.pulled["http_fallbacks"] == 0
        assert sw.trainer.served["http_chunks"] == sw.trainer.served["chunks"] == total
        await wait_for(lambda: sw.s1.node.peer_id in sw.s2.holders(digest(encode(manifest))),
                       what="s2 hears s1's Have")
        got2 = await sw.s2.pull(RUN, 1)
        assert_same(got2, tensors)
        sources = sw.s2.pull_stats[-1].sources
        assert sw.s2.pulled["http_chunks"] == sum(sources.values()) == total
        # the sampler re-serves over HTTP what it fetched: the trainer's upload does not
        # double
        assert sw.s1.served["http_chunks"] == sources[sw.s1.node.peer_id] > 0
        assert sw.trainer.served["chunks"] < 2 * total
        fresh = tiny_llama(12)
        fresh.load_state_dict(got2)
        ids = torch.tensor([[1, 5, 9, 42]])
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, model(ids).logits)
        status = sw.trainer.status()["weights"]["http"]
        assert status["port"] == book(sw.s1.node).get(sw.trainer.node.peer_id
                                                      ).weights_http_port  # type: ignore[union-attr]
        assert status["answered"]["200"] == sw.trainer.served["http_chunks"]


async def test_a_holder_serving_tampered_chunks_over_http_is_caught(tmp_path: Path) -> None:
    tensors = weights(tiny_llama(13))
    async with http_swarm(tmp_path) as sw:
        manifest = await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        await sw.s1.pull(RUN, 1)
        key = digest(encode(manifest))
        await wait_for(lambda: sw.s1.node.peer_id in sw.s2.holders(key), what="s1's Have")
        # s1 turns liar: every chunk it holds flipped in its first byte
        for h, data in sw.s1.chunks.items():
            sw.s1.chunks[h] = bytes([data[0] ^ 0xFF]) + data[1:]
        got = await sw.s2.pull(RUN, 1)
        assert_same(got, tensors)
        liar = sw.s1.node.peer_id
        offences = sw.s2.node.offences[liar]
        assert 1 <= offences["bad_chunk"] <= 2, dict(offences)
        assert rejections(sw.s2.node)["bad_chunk"] == offences["bad_chunk"]
        assert sw.s2.pull_stats[-1].sources == {sw.trainer.node.peer_id:
                                                len(manifest.chunk_sizes())}
        # the garbage went out over HTTP, and nothing over libp2p
        assert sw.s1.served["http_chunks"] == sw.s1.served["chunks"] > 0
        assert sw.s2.pulled["http_fallbacks"] == 0


async def test_without_http_or_when_it_fails_chunks_come_over_libp2p(tmp_path: Path
                                                                     ) -> None:
    tensors = weights(tiny_llama(14))
    # the trainer serves no HTTP: its entry advertises no port, nothing is tried
    async with http_swarm(tmp_path / "off", http=(False, True, True)) as sw:
        manifest = await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        assert_same(await sw.s1.pull(RUN, 1), tensors)
        assert sw.s1.pulled["chunks"] == len(manifest.chunk_sizes())
        assert sw.s1.pulled["http_chunks"] == sw.s1.pulled["http_fallbacks"] == 0
        assert sw.trainer.served["http_chunks"] == 0
    # the trainer advertises a port where nothing answers any more (a firewall, a
    # crash): the pull falls back to libp2p, without counting an offence
    async with http_swarm(tmp_path / "gone") as sw:
        assert sw.trainer.http_server is not None
        sw.trainer.http_server.close()
        manifest = await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        assert_same(await sw.s1.pull(RUN, 1), tensors)
        assert sw.s1.pulled["http_chunks"] == 0 and sw.s1.pulled["http_fallbacks"] >= 1
        assert sw.s1.pull_stats[-1].sources == {sw.trainer.node.peer_id:
                                                len(manifest.chunk_sizes())}
        assert not sw.s1.node.offences[sw.trainer.node.peer_id]
        assert not sw.s1.fetcher.http.usable(sw.trainer.node.peer_id)
