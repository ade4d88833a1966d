"""What a remote peer claims on the shard pipeline, over real in-process hosts: the
entry peer an OPEN names (it is charged the session, and its turns are counted) and
the culprit and code a FAILED names (the entry bans it). A first hop admits only the
entry itself, and a later hop only the hop before it; the compute's per-peer figures
stay bounded however many entries come; a culprit off the route, or named by a hop
that may not name it, is the reporter's fault, and a code nobody knows is "other"."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from peerd.inference.slot import ModelOptions
from peerd.inference.swarm import server as server_module
from peerd.inference.swarm.pipeline import PipelineFailure
from peerd.inference.swarm.routing import Route, Span
from protocols.codec import decode, encode
from protocols.framing import read_frame, write_frame
from protocols.shard import IMPERSONATION, OTHER, SHARD, Hop, Open
from protocols.spec import ErrorReply
from testnet.greedy import GreedyPeer, whole
from tests.harness import book, serve_model, swarm, wait_for
from tests.models import tiny_llama_dir

LAYERS = 4  # the tiny model's


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


def stranger() -> str:
    """A well-formed peer id of nobody in the swarm."""
    return str(ID.from_pubkey(create_new_key_pair().public_key))


async def open_raw(dialer: Any, shard: Any, opening: Open) -> Any:
    """Write `opening` on a new shard stream from `dialer` to `shard`; the stream."""
    stream = await dialer.new_stream(shard.peer_id, SHARD.id)
    await write_frame(stream, encode(opening), SHARD.max_control_bytes)
    return stream


async def test_an_open_for_another_entry_is_refused_as_impersonation(tmp_path: Path,
                                                                     tiny: Path) -> None:
    """The first hop is opened by the entry itself, so an OPEN there naming anyone else
    as its entry (to be counted, and given a fair share, under that name) is refused
    and counted; a later hop is opened by the route's hop before it, and an OPEN from
    anyone else is refused the same way. Nothing is held or counted for either."""
    async with swarm(2, tmp_path, connect="star", heartbeat_s=2.0) as (shard_node, forger):
        shard = await serve_model(shard_node, ModelOptions(str(tiny), layers=(0, LAYERS)))
        named = stranger()
        first = Open(session="i" * 16, model_id=shard.model_id,
                     route=(Hop(shard_node.peer_id, 0, LAYERS),), hop=0, entry_peer=named,
                     max_length=64, dtype="float32")
        later = Open(session="j" * 16, model_id=shard.model_id,
                     route=(Hop(named, 0, 1), Hop(shard_node.peer_id, 1, LAYERS)), hop=1,
                     entry_peer=named, max_length=64, dtype="float32")
        for n, opening in enumerate((first, later), 1):
            stream = await open_raw(forger, shard_node, opening)
            with trio.fail_after(10):
                reply = decode(await read_frame(stream, SHARD.max_control_bytes), ErrorReply)
            assert reply.code == IMPERSONATION, reply
            assert shard_node.offences[forger.peer_id][IMPERSONATION] == n
            await stream.close()
        assert not shard.server.sessions and not shard.server.lending.sessions.held
        assert not shard.server.compute.stats()
        # the entry itself is admitted as before
        greedy = GreedyPeer(forger, shard.model_id, shard.block.hidden_size)
        await greedy.flood(whole(shard_node.peer_id, LAYERS), 3, rounds=1)
        assert greedy.forwards == 1
        assert set(shard.server.compute.stats()) == {forger.peer_id}


async def test_the_compute_stats_stay_bounded_however_many_entries_come(
        tmp_path: Path, tiny: Path) -> None:
    """Honest entries, one session each, one after the other, through a shard that
    counts at most two peers one by one: the costliest and the newest keep their
    figures, the rest add up in `other`, and the totals still count every turn."""
    async with swarm(5, tmp_path, connect="star", heartbeat_s=2.0) as nodes:
        shard_node, *entries = nodes
        shard = await serve_model(shard_node, ModelOptions(str(tiny), layers=(0, LAYERS)))
        turns = shard.server.compute
        turns.max_peers = 2
        positions = [2, 3, 4, 5]  # a turn each (within the turn budget): cost x LAYERS
        for node, n in zip(entries, positions, strict=True):
            greedy = GreedyPeer(node, shard.model_id, shard.block.hidden_size)
            await greedy.flood(whole(shard_node.peer_id, LAYERS), n, rounds=1)
            assert greedy.forwards == 1
            assert len(turns.stats()) <= 2
        stats = turns.stats()
        assert set(stats) == {entries[2].peer_id, entries[3].peer_id}
        assert [stats[e.peer_id].cost for e in entries[2:]] == [4 * LAYERS, 5 * LAYERS]
        assert (turns.other().turns, turns.other().cost) == (2, (2 + 3) * LAYERS)
        assert (turns.totals().turns, turns.totals().cost) == (4, sum(positions) * LAYERS)
        lent = shard.server.lent()["compute"]
        assert set(lent["peers"]) == set(stats) and lent["other"]["turns"] == 2


async def test_a_culprit_a_hop_may_not_name_is_the_reporters_fault(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hops that name a stranger (off the route) as the peer at fault, with a code of
    5000 characters: the first hop refusing the OPEN, the last hop refusing it (the
    honest first hop relays it), the last hop reporting a failed step straight to the
    entry. Each time the liar is blamed, the code is "other", and the entry's ban
    list holds the liars only, however many strangers they name."""
    async with swarm(3, tmp_path, connect="star", heartbeat_s=2.0) as nodes:
        entry = await serve_model(nodes[0], ModelOptions(str(tiny), layers=(0, LAYERS)))
        first = await serve_model(nodes[1], ModelOptions(str(tiny), layers=(0, 2)))
        last = await serve_model(nodes[2], ModelOptions(str(tiny), layers=(2, LAYERS)))
        ids = {n.peer_id for n in nodes}
        await wait_for(lambda: all(set(n.connected_peers()) >= ids - {n.peer_id}
                                   and len([e for e in book(n).entries() if e.models]) == 3
                                   for n in nodes), 15, "a full mesh")
        route = Route((Span(first.node.peer_id, 0, 2, 0.0),
                       Span(last.node.peer_id, 2, LAYERS, 0.0)), 0.0)
        generator, pipeline = entry.generator, entry.generator.pipeline
        long_code = "x" * 5000

        async def lying_admit(*args: Any) -> None:
            raise server_module.Refused(long_code, "go away", stranger())

        async def failed_open() -> PipelineFailure:
            with pytest.raises(PipelineFailure) as failed:
                await pipeline.open(route, 64)
            generator.blame(failed.value, 1)
            return failed.value

        for liar in (first, last):  # a refusal, its own or relayed by the first hop
            with monkeypatch.context() as m:
                m.setattr(liar.server, "_admit", lying_admit)
                for _ in range(5):
                    failure = await failed_open()
                    assert (failure.culprit, failure.code) == (liar.node.peer_id, OTHER)
        liars = {first.node.peer_id, last.node.peer_id}
        assert generator.bans.banned(time.monotonic()) == liars and len(generator.bans) == 2

        # a report straight from the last hop, after a step it failed
        generator.bans.forgive(last.node.peer_id)
        report = last.server._report

        async def lying_report(s: Any, step: int, culprit: str, code: str,
                               message: str) -> None:
            await report(s, step, stranger(), long_code, message)

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("simulated GPU failure")

        monkeypatch.setattr(last.server, "_report", lying_report)
        monkeypatch.setattr(last.block, "begin", broken)
        for _ in range(3):
            session = await pipeline.open(route, 64)
            with torch.inference_mode():
                hidden = entry.head.embed(torch.tensor([[5, 17, 33]]))  # [1, 3, H]
            with pytest.raises(PipelineFailure) as failed:
                await session.step(hidden, 0)
            await session.close()
            assert (failed.value.culprit, failed.value.code) == (last.node.peer_id, OTHER)
            generator.blame(failed.value, 1)
        assert generator.bans.banned(time.monotonic()) == liars and len(generator.bans) == 2


def test_a_failures_code_is_one_of_a_known_few_or_other() -> None:
    """What a hop sends as a code is kept by the entry (bans, metrics, the RL sampler's
    retries by code): a code nobody declared, of any length, is "other"."""
    assert PipelineFailure(None, "x" * 5000, "m").code == OTHER
    assert PipelineFailure(None, "made_up", "m").code == OTHER
    for code in ("overloaded", "evicted", "behind", "revoked", "timeout", "malformed"):
        assert PipelineFailure(None, code, "m").code == code
