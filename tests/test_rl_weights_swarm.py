"""Versioned weights over real in-process hosts: a trainer publishes a tiny Llama's
weights, two samplers pull them (the second from the first as well as from the
trainer: counted by what each served), a shard peer pulls only its layers' chunks, a
holder that lies (a tampered manifest, corrupted chunks) is counted and the pull
completes from another, bad requests and forged announcements are refused and the
peers keep serving."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from libp2p.peer.id import ID

from peerd.node import Node
from peerd.rl import weights as weights_module
from peerd.rl.follow import Follower
from peerd.rl.manifest import layer_names
from peerd.rl.weights import MANIFEST_HOLDERS, WeightStore, WeightsUnavailable
from peerd.rpc import Busy, stream_handler
from protocols.codec import encode
from protocols.errors import RemoteError
from protocols.framing import encode_uvarint, frame
from protocols.weights import (
    CHUNKS,
    MANIFEST,
    TOPIC,
    ChunkReply,
    ChunkRequest,
    Have,
    ManifestReply,
    ManifestRequest,
    SignedAnnounce,
    VersionAnnounce,
    digest,
)
from tests.harness import (
    Rogue,
    connect,
    dial,
    error_code,
    events,
    rejections,
    rogue_host,
    swarm,
    wait_for,
)

RUN = "run-1"
MODEL = "tiny-llama"
CHUNK = 64 * 1024


def tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass
class Swarm:
    trainer: WeightStore
    s1: WeightStore
    s2: WeightStore
    nodes: list[Node]


def topic_peers(node: Node) -> set[str]:
    return {str(p) for p in node.pubsub.peer_topics.get(TOPIC, set())}


@contextlib.asynccontextmanager
async def weights_swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    """A trainer and two samplers, all connected, each running the weights service and
    following RUN from the trainer."""
    async with swarm(3, tmp_path, connect="star", target_peers=2) as nodes:
        await connect(nodes[2], nodes[1])
        stores = [WeightStore(n, chunk_bytes=CHUNK, announce_s=1.0) for n in nodes]
        for node, store in zip(nodes, stores, strict=True):
            await node.start(store)
        for store in stores[1:]:
            store.follow(RUN, nodes[0].peer_id)
        for node in nodes:
            others = {n.peer_id for n in nodes if n is not node}
            await wait_for(lambda node=node, others=others: topic_peers(node) >= others,
                           what=f"{node.name} hears every peer on {TOPIC}")
        yield Swarm(*stores, nodes=nodes)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


async def announced(store: WeightStore, version: int) -> None:
    await wait_for(lambda: (a := store.latest(RUN)) is not None and a.version >= version,
                   what=f"version {version} announced to {store.node.name}")


# ---- the pull ------------------------------------------------------------------------


async def test_two_samplers_pull_and_the_second_fetches_from_the_first(tmp_path: Path
                                                                       ) -> None:
    model = tiny_llama(1)
    tensors = weights(model)
    async with weights_swarm(tmp_path) as sw:
        heard: list[int] = []

        async def lagging(announce: VersionAnnounce) -> None:
            heard.append(announce.version)

        sw.s1.on_announce(lagging)
        manifest = await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        total = len(manifest.chunk_sizes())
        assert total > 20  # enough chunks to spread
        await announced(sw.s1, 1)
        await wait_for(lambda: heard == [1], what="the announce hook")
        got1 = await sw.s1.pull(RUN, 1)
        assert_same(got1, tensors)
        assert sw.s1.pull_stats[-1].sources == {sw.trainer.node.peer_id: total}
        # s2 learns that s1 holds the version, then pulls from both
        await wait_for(lambda: sw.s1.node.peer_id in sw.s2.holders(digest(encode(manifest))),
                       what="s2 hears s1's Have")
        got2 = await sw.s2.pull(RUN, 1)
        assert_same(got2, tensors)
        sources = sw.s2.pull_stats[-1].sources
        assert sum(sources.values()) == total
        assert sw.s1.served["chunks"] == sources[sw.s1.node.peer_id] > 0
        assert sw.trainer.served["chunks"] == 2 * total - sources[sw.s1.node.peer_id]
        assert sw.trainer.served["chunks"] < 2 * total
        # the pulled weights make the same model: same logits
        fresh = tiny_llama(2)
        fresh.load_state_dict(got2)
        ids = torch.tensor([[1, 5, 9, 42]])
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, model(ids).logits)
        # exposed in status and on /metrics
        status = sw.s2.status()["weights"]
        assert status["last_pull"]["chunks"] == total
        # identical tensors (the norms, all ones) share their chunks: each travels once
        assert status["last_pull"]["bytes"] == sum(manifest.chunk_sizes().values())
        assert status["last_pull"]["bytes"] < manifest.nbytes
        text = sw.s1.node.metrics.render().decode()
        assert f"peerd_weights_served_chunks_total {float(sources[sw.s1.node.peer_id])}" in text
        assert "peerd_weights_last_pull_seconds" in text
        # a second pull of a held version fetches nothing
        await sw.s2.pull(RUN, 1)
        assert len(sw.s2.pull_stats) == 1


async def test_a_shard_pulls_only_its_layers(tmp_path: Path) -> None:
    tensors = weights(tiny_llama(3))
    async with weights_swarm(tmp_path) as sw:
        manifest = await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        names = layer_names(tensors, 1, 3, 4, head=False)
        mine = {h for t in manifest.tensors if t.name in names for h in t.chunks}
        assert 0 < len(mine) < len(manifest.chunk_sizes())
        got = await sw.s1.pull(RUN, 1, names=names)
        assert_same(got, {n: tensors[n] for n in names})
        assert sw.s1.pull_stats[-1].chunks == len(mine)
        assert set(sw.s1.chunks) == mine
        assert sw.trainer.served["chunks"] == len(mine)
        assert sw.s1.status()["weights"]["held"] == [f"{RUN}@1 (part)"]
        # the head-holding shard then the whole model: only what is missing travels
        await sw.s1.pull(RUN, 1)
        assert sw.s1.pull_stats[-1].chunks == len(manifest.chunk_sizes()) - len(mine)
        assert sw.s1.status()["weights"]["held"] == [f"{RUN}@1"]


class RecordingPolicy:
    """What the Follower needs of a whole-model policy: its version, its layers, its
    parameters' dtypes, and `apply` (recorded here)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.version = 0
        self.block = types.SimpleNamespace(start=0, end=4, num_layers=4)
        self.head = object()
        self._dtypes = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        self.applied: list[tuple[int, dict[str, torch.Tensor]]] = []

    def parameters(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self._dtypes

    async def apply(self, version: int, *, full: dict[str, torch.Tensor] | None = None,
                    deltas: dict[str, torch.Tensor] | None = None) -> None:
        assert full is not None and deltas is None
        self.applied.append((version, full))
        self.version = version


async def test_a_failed_pull_is_tried_again_without_a_newer_version(tmp_path: Path
                                                                    ) -> None:
    """Re-announcements of a version already heard run no hook: a sampler whose one
    pull of the trainer's last version failed must try again by itself, or it stays
    behind for good once the run ends (as a slow test saw under load)."""
    tensors = weights(tiny_llama(4))
    async with weights_swarm(tmp_path) as sw:
        policy = RecordingPolicy(tensors)
        follower = Follower(sw.s1, policy)  # type: ignore[arg-type]
        follower.take_up(RUN, sw.trainer.node.peer_id)
        real_pull, failures = sw.s1.pull, []

        async def flaky_pull(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            if len(failures) < 2:  # the first two attempts find no holder
                failures.append(args)
                raise WeightsUnavailable("no holder gave version 1 (asked 1)")
            return await real_pull(*args, **kwargs)

        sw.s1.pull = flaky_pull  # type: ignore[method-assign]
        await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        await wait_for(lambda: policy.version == 1, what="the follower at version 1")
        assert len(failures) == 2 and [v for v, _ in policy.applied] == [1]
        assert_same(policy.applied[0][1], tensors)
        # a newer version that supersedes a failing one is pulled, the failed one not
        failures.clear()
        await sw.trainer.publish(RUN, MODEL, 2, "full", tensors)
        await sw.trainer.publish(RUN, MODEL, 3, "full", tensors)
        await wait_for(lambda: policy.version == 3, what="the follower at version 3")
        assert [v for v, _ in policy.applied][-1] == 3
        # leaving the run stops the retries
        failures.clear()
        follower.leave()
        await sw.trainer.publish(RUN, MODEL, 4, "full", tensors)
        await announced(sw.s1, 4)
        await trio.sleep(1.5)
        assert policy.version == 3 and failures == []


async def test_lora_versions_and_old_versions_dropped(tmp_path: Path) -> None:
    async with weights_swarm(tmp_path) as sw:
        m = "model.layers.0.self_attn.q_proj"
        for version in range(1, 6):
            adapters = {f"{m}.lora_A": torch.full((4, 128), float(version)),
                        f"{m}.lora_B": torch.full((128, 4), -float(version))}
            await sw.trainer.publish(RUN, MODEL, version, "lora", adapters, lora_scale=2.0)
        await announced(sw.s1, 5)
        got = await sw.s1.pull(RUN, 5)
        assert torch.equal(got[f"{m}.lora_A"], torch.full((4, 128), 5.0))
        # the trainer keeps its newest three versions, and only their chunks
        assert sorted(h.announce.version for h in sw.trainer.held.values()) == [3, 4, 5]
        named = {c for h in sw.trainer.held.values() for t in h.manifest.tensors
                 for c in t.chunks}
        assert set(sw.trainer.chunks) == named
        with pytest.raises(WeightsUnavailable, match="no holder gave version 1"):
            await sw.s1.pull(RUN, 1)
        with pytest.raises(WeightsUnavailable, match="not following"):
            await sw.s1.pull("other-run", 1)


# ---- lies --------------------------------------------------------------------------


async def refuse_manifest(peer: str, request: ManifestRequest) -> ManifestReply:
    raise Busy("not now")



async def test_a_lying_holder_is_counted_and_the_pull_completes_elsewhere(tmp_path: Path
                                                                           ) -> None:
    tensors = weights(tiny_llama(4))
    async with weights_swarm(tmp_path) as sw:
        manifest = await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        await sw.s1.pull(RUN, 1)
        key = digest(encode(manifest))
        await wait_for(lambda: sw.s1.node.peer_id in sw.s2.holders(key), what="s1's Have")
        # s1 turns liar: a manifest that is not the signed one, and every chunk flipped
        held = sw.s1.held[key]
        lying = dataclasses.replace(manifest, chunk_bytes=manifest.chunk_bytes // 2)
        held.manifest_bytes = encode(lying)
        for h, data in sw.s1.chunks.items():
            sw.s1.chunks[h] = bytes([data[0] ^ 0xFF]) + data[1:]
        # the manifest: the trainer is asked first; while it refuses, s1 (a hint: on a
        # loaded machine its Have can age out of the holders, 3 announce periods, before
        # the pull starts) is asked, and its manifest is caught
        trainer_node = sw.trainer.node
        trainer_node.set_stream_handler(MANIFEST.id, stream_handler(
            MANIFEST, refuse_manifest, trainer_node.offence))
        with pytest.raises(WeightsUnavailable):
            await sw.s2.pull(RUN, 1, hints=[sw.s1.node.peer_id])
        liar = sw.s1.node.peer_id
        offences = sw.s2.node.offences[liar]
        assert offences["bad_announce"] == 1, dict(offences)
        # the trainer serves the manifest again; the chunks: s1 gets the first batch
        trainer_node.set_stream_handler(MANIFEST.id, stream_handler(
            MANIFEST, sw.trainer._serve_manifest, trainer_node.offence))
        got = await sw.s2.pull(RUN, 1, hints=[liar])
        assert_same(got, tensors)
        assert offences["bad_announce"] == 1, dict(offences)
        # counted once per batch it answered: up to per_holder (2) may have been in flight
        # when the first came back; it is never asked again
        assert 1 <= offences["bad_chunk"] <= 2, dict(offences)
        assert events(sw.s2.node, "peer.offence", peer_id=liar, reason="bad_chunk")
        assert rejections(sw.s2.node)["bad_chunk"] == offences["bad_chunk"]
        assert sw.s2.pull_stats[-1].sources == {sw.trainer.node.peer_id:
                                                len(manifest.chunk_sizes())}
        assert sw.s1.served["chunks"] > 0  # it did serve (garbage)


# ---- bad input ------------------------------------------------------------------------


async def test_bad_requests_get_clear_errors_and_the_peer_keeps_serving(tmp_path: Path
                                                                        ) -> None:
    tensors = weights(tiny_llama(5))
    async with weights_swarm(tmp_path) as sw, rogue_host(tmp_path) as rogue:
        manifest = await sw.trainer.publish(RUN, MODEL, 1, "full", tensors)
        trainer = sw.trainer.node
        await dial(rogue.host, trainer)
        h = manifest.tensors[0].chunks[0]
        cases = [
            (CHUNKS.id, frame(b"\xc1garbage"), "malformed"),
            (CHUNKS.id, encode_uvarint(CHUNKS.max_request_bytes + 1) + b"x" * 64, "oversized"),
            (CHUNKS.id, frame(encode(ChunkRequest(hashes=(h,) * 65))), "malformed"),
            (CHUNKS.id, frame(encode(ChunkRequest(hashes=(b"short",)))), "malformed"),
            (CHUNKS.id, frame(encode(ManifestRequest(run_id=RUN, version=1))), "wrong_type"),
            (MANIFEST.id, frame(encode(ManifestRequest(run_id="no spaces", version=1))),
             "malformed"),
            (MANIFEST.id, encode_uvarint(MANIFEST.max_request_bytes + 1), "oversized"),
        ]
        for protocol, raw, code in cases:
            assert error_code(await rogue.exchange(trainer, protocol, raw)) == code, raw[:40]
        assert sum(trainer.offences[rogue.peer_id].values()) == len(cases)
        # a chunk or a version the trainer does not hold: no error, an empty answer
        from peerd.rpc import call
        reply = await call(rogue.host, trainer.peer_id, CHUNKS,
                           ChunkRequest(hashes=(b"\0" * 32, h)))
        assert isinstance(reply, ChunkReply) and reply.data[0] == b"" and len(reply.data[1])
        reply = await call(rogue.host, trainer.peer_id, MANIFEST,
                           ManifestRequest(run_id="nope", version=-1))
        assert reply == ManifestReply()
        with pytest.raises(RemoteError, match="malformed"):
            await call(rogue.host, trainer.peer_id, MANIFEST,
                       ManifestRequest(run_id=RUN, version=-7))
        # and it keeps serving the honest
        assert_same(await sw.s1.pull(RUN, 1), tensors)


@contextlib.asynccontextmanager
async def rogue_on_topic(tmp_path: Path, node: Node) -> AsyncIterator[Rogue]:
    async with rogue_host(tmp_path, pubsub=True) as rogue:
        await dial(rogue.host, node)
        pid = ID.from_base58(node.peer_id)
        assert rogue.pubsub is not None
        await wait_for(lambda: pid in rogue.pubsub.peer_topics.get(TOPIC, set()),  # type: ignore[union-attr]
                       what="the rogue hears the sampler on the weights topic")
        yield rogue


async def test_forged_announcements_are_rejected_and_counted(tmp_path: Path) -> None:
    async with weights_swarm(tmp_path) as sw, \
            rogue_on_topic(tmp_path, sw.s1.node) as rogue:
        trainer = sw.trainer.node.peer_id
        heard: list[int] = []

        async def hook(announce: VersionAnnounce) -> None:
            heard.append(announce.version)

        sw.s1.on_announce(hook)
        announce = VersionAnnounce(run_id=RUN, model_id=MODEL, version=9, kind="full",
                                   manifest_hash=b"\1" * 32, author=trainer,
                                   timestamp=time.time())
        body = encode(announce)
        # the trainer's name, a garbage signature
        await rogue.publish(encode(SignedAnnounce(body=body, sig=b"\2" * 64)), TOPIC)
        # the rogue's own signature on an announce naming the trainer
        await rogue.publish(encode(SignedAnnounce(
            body=body, sig=rogue.key_pair.private_key.sign(body))), TOPIC)
        # a well-signed announce of a run whose trainer is someone else
        own = encode(dataclasses.replace(announce, author=rogue.peer_id))
        await rogue.publish(encode(SignedAnnounce(
            body=own, sig=rogue.key_pair.private_key.sign(own))), TOPIC)
        # a Have on behalf of another peer
        have = Have(run_id=RUN, version=9, manifest_hash=b"\1" * 32, holder=trainer,
                    complete=True, timestamp=time.time())
        await rogue.publish(encode(have), TOPIC)
        offences = sw.s1.node.offences[rogue.peer_id]
        await wait_for(lambda: offences["bad_signature"] == 2 and offences["not_trainer"] == 1
                       and offences["impersonation"] == 1, what=f"offences {dict(offences)}")
        assert sw.s1.latest(RUN) is None and heard == []
        # the real trainer's announcement still goes through
        await sw.trainer.publish(RUN, MODEL, 1, "full", {"w": torch.ones(4)})
        await wait_for(lambda: heard == [1], what="the trainer's announcement")
        assert sw.s1.holders(b"\1" * 32) == []


# ---- the benchmark's helper -----------------------------------------------------------


async def test_the_sync_timing_helper_runs_on_a_few_megabytes(tmp_path: Path) -> None:
    from peerd.rl.sync_timing import time_weight_sync

    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(512, 512, generator=g)
               for i in range(4)}  # 4 MiB of float32
    timing = await time_weight_sync(tensors, tmp_path, samplers=2, chunk_bytes=256 * 1024)
    assert timing.nbytes == 4 * 512 * 512 * 4 and timing.chunks == 16
    assert len(timing.pull_s) == 2 and all(s > 0 for s in timing.pull_s)
    # every byte each sampler fetched was served by the trainer or the other sampler
    assert timing.trainer_uploaded + timing.samplers_uploaded == 2 * timing.nbytes
    assert timing.http_bytes == 2 * timing.nbytes  # the chunks went over HTTP


# ---- holders that stall ------------------------------------------------------------


async def test_holders_that_stall_the_manifest_cost_a_bounded_number_of_asks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six peers announce Have for a version and never answer MANIFEST: the trainer is
    asked first and serves the pull; while it refuses, at most MANIFEST_HOLDERS of the
    stalling holders are asked per pull, and none of them twice."""
    monkeypatch.setattr(weights_module, "HOLDER_MANIFEST_TIMEOUT_S", 1.0)
    asked: list[str] = []  # the manifests the sampler asked for, of whom
    real_call = weights_module.call

    async def recording_call(host: Any, peer: str, spec: Any, *args: Any, **kw: Any
                             ) -> Any:
        if spec is MANIFEST:
            asked.append(peer)
        return await real_call(host, peer, spec, *args, **kw)

    async def stall(peer: str, request: ManifestRequest) -> ManifestReply:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(weights_module, "call", recording_call)
    # (ledger heartbeats of 10 s: eight peers republishing every second kept one of the
    # two cores busy with gossip, and the test took 28-45 s and failed once in four)
    async with swarm(8, tmp_path, connect="star", heartbeat_s=10.0) as nodes:
        sampler_node, trainer_node, *stalling = nodes
        sampler, trainer = WeightStore(sampler_node), WeightStore(trainer_node)
        await sampler_node.start(sampler)
        await trainer_node.start(trainer)
        sampler.follow(RUN, trainer_node.peer_id)
        stallers = {n.peer_id for n in stalling}
        for node in stalling:
            node.set_stream_handler(MANIFEST.id, stream_handler(MANIFEST, stall,
                                                                node.offence))
        await wait_for(lambda: trainer_node.peer_id in topic_peers(sampler_node),
                       what="the sampler hears the trainer")
        tensors = weights(tiny_llama(5))
        manifest = await trainer.publish(RUN, MODEL, 1, "full", tensors)
        key = digest(encode(manifest))
        await announced(sampler, 1)
        for node in stalling:
            sampler.runs._heard_have(Have(run_id=RUN, version=1, manifest_hash=key,
                                          holder=node.peer_id, complete=True,
                                          timestamp=time.time()))
        assert set(sampler.holders(key)) == stallers
        # the trainer refuses: it is asked first, then a few holders, none of them twice
        trainer_node.set_stream_handler(MANIFEST.id, stream_handler(
            MANIFEST, refuse_manifest, trainer_node.offence))
        for holders_asked in (MANIFEST_HOLDERS, len(stalling) - MANIFEST_HOLDERS, 0):
            asked.clear()
            with pytest.raises(WeightsUnavailable):
                await sampler.pull(RUN, 1, timeout_s=60.0)
            assert asked[0] == trainer_node.peer_id
            assert len(asked[1:]) == holders_asked and set(asked[1:]) <= stallers
        assert set(sampler._manifest_failed[RUN]) == stallers
        # the trainer serves again: it alone is asked
        trainer_node.set_stream_handler(MANIFEST.id, stream_handler(
            MANIFEST, trainer._serve_manifest, trainer_node.offence))
        asked.clear()
        got = await sampler.pull(RUN, 1, timeout_s=60.0)
        assert_same(got, tensors)
        assert asked == [trainer_node.peer_id]
        assert sampler.pull_stats[-1].sources == {trainer_node.peer_id:
                                                  len(manifest.chunk_sizes())}
