"""Fair shares at shard servers, on real in-process hosts: a greedy peer (testnet/greedy.py)
that holds idle sessions on every peer, or floods large FORWARDs, against an honest
entry peer whose output must stay what it is undisturbed."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import trio

from peerd.api.app import create_app
from peerd.inference.model.source import load_config, reference_model, resolve
from peerd.inference.options import SamplingParams
from peerd.inference.runtime import ModelRuntime
from peerd.inference.slot import ModelOptions, ShardLimits
from testnet.greedy import GreedyPeer, whole
from tests.harness import book, events, gossip, serve_model, swarm, wait_for
from tests.models import tiny_llama_dir

LAYERS = 4  # the tiny model's
HEADROOM_POSITIONS = ShardLimits().kv_headroom_positions
TURN_BUDGET = ShardLimits().compute_turn_budget  # positions x layers
PROMPT = [5, 17, 33, 101, 7, 250, 12, 64, 3, 99]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(tiny: Path) -> list[int]:
    """The tiny model's greedy continuation of PROMPT, in one process."""
    model = reference_model(resolve(str(tiny)))
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), do_sample=False,  # type: ignore[operator]
                             max_new_tokens=8, min_new_tokens=8)
    return [int(t) for t in out[0, len(PROMPT):]]


@contextlib.asynccontextmanager
async def swarm_with_greed(tmp_path: Path, tiny: Path, shards: int, limits: ShardLimits,
                           ) -> AsyncIterator[tuple[ModelRuntime, list[ModelRuntime], GreedyPeer]]:
    """An honest entry (its own copy advertised as slow, so it routes through the
    shards), `shards` peers serving the whole model with `limits`, and a greedy peer."""
    async with swarm(shards + 2, tmp_path, connect="star", heartbeat_s=2.0) as nodes:
        entry_node, *shard_nodes, greedy_node = nodes
        servers = [await serve_model(n, ModelOptions(str(tiny), layers=(0, LAYERS),
                                                     limits=limits)) for n in shard_nodes]
        entry = await serve_model(entry_node, ModelOptions(str(tiny), layers=(0, LAYERS)))
        entry.served = dataclasses.replace(entry.served, tokens_per_s=0.001)
        gossip(entry_node).refresh()
        ids = {s.node.peer_id for s in servers} | {entry_node.peer_id}
        await wait_for(lambda: all({e.peer_id for e in book(n).entries() if e.models} >= ids
                                   for n in nodes), 15, "every ledger to list every shard")
        await wait_for(lambda: all(len(n.connected_peers()) == len(nodes) - 1 for n in nodes),
                       15, "a full mesh")
        greedy = GreedyPeer(greedy_node, entry.model_id, entry.block.hidden_size)
        yield entry, servers, greedy


async def generate(entry: ModelRuntime, on_token: Any = None) -> tuple[list[int], Any]:
    tokens: list[int] = []

    async def collect(token: int) -> bool:
        tokens.append(token)
        if on_token is not None:
            await on_token(len(tokens))
        return True

    request = await entry.generator.prepare(PROMPT, SamplingParams(max_tokens=8))
    stats = await entry.generator.generate(request, collect)
    return tokens, stats


def holders(runtime: ModelRuntime) -> dict[str, int]:
    return dict(runtime.server.lending.sessions.held)


async def test_idle_sessions_of_a_greedy_peer_do_not_deny_an_honest_request(
        tmp_path: Path, tiny: Path, expected: list[int]) -> None:
    """The greedy peer fills every slot of every shard and sends nothing; the honest
    request takes a slot back from it and decodes what one process does."""
    async with swarm_with_greed(tmp_path, tiny, 3, ShardLimits(max_sessions=4)) as (
            entry, servers, greedy):
        for shard in servers:
            route = whole(shard.node.peer_id, LAYERS)
            assert await greedy.hold(route, [8192, 4096, 1024, 256, 64]) == 4
            assert holders(shard) == {greedy.node.peer_id: 4}
        assert greedy.refused == 3  # the fifth open on each: the greedy peer is alone
        tokens, stats = await generate(entry)
        assert tokens == expected
        used = stats.route[0]["peer_id"]
        shard = next(s for s in servers if s.node.peer_id == used)
        evicted = events(shard.node, "shard.session.evicted")
        assert [e.data["holder"] for e in evicted] == [greedy.node.peer_id]
        assert evicted[0].data["for_peer"] == entry.node.peer_id
        assert evicted[0].data["forwards"] == 0
        # holding a session unused is greed: counted like any other offence
        assert shard.node.offences[greedy.node.peer_id]["idle_session"] == 1
        await wait_for(lambda: greedy.held[0].failed.is_set() or any(
            s.failed.is_set() for s in greedy.held), 5, "the greedy peer told of it")
        await greedy.release()


async def test_an_evicted_honest_session_replays_elsewhere_unchanged(
        tmp_path: Path, tiny: Path, expected: list[int]) -> None:
    """Paused mid-answer, the honest request's session holds more KV than its share
    once another peer needs some: it is evicted (Failed "evicted"), and the request
    replays on the other replica with the same tokens."""
    config = load_config(resolve(str(tiny)))
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_position = LAYERS * 2 * config.num_key_value_heads * head_dim * 4  # K, V; float32
    async with swarm_with_greed(tmp_path, tiny, 2, ShardLimits(
            max_kv_bytes=(HEADROOM_POSITIONS + 40) * kv_per_position)) as (
            entry, servers, other):
        assert all(s.block.kv_bytes_per_position() == kv_per_position for s in servers)
        paused, resume = trio.Event(), trio.Event()

        async def pause_after_three(n: int) -> None:
            if n == 3:
                paused.set()
                await resume.wait()

        async with trio.open_nursery() as nursery:
            result: list[Any] = []

            async def honest() -> None:
                result.append(await generate(entry, pause_after_three))

            nursery.start_soon(honest)
            await paused.wait()
            used = next(s for s in servers if entry.node.peer_id in holders(s))
            # another peer opens a session there: 64 positions of KV, within its share
            assert await other.hold(whole(used.node.peer_id, LAYERS), [64]) == 1
            evicted = events(used.node, "shard.session.evicted")
            assert [e.data["holder"] for e in evicted] == [entry.node.peer_id]
            resume.set()
        tokens, stats = result[0]
        assert tokens == expected
        assert stats.reroutes == 1
        assert stats.route[0]["peer_id"] != used.node.peer_id
        failures = events(entry.node, "inference.failure")
        assert [(e.data["culprit"], e.data["code"]) for e in failures] == [
            (used.node.peer_id, "evicted")]
        await other.release()


async def test_a_flood_of_large_forwards_waits_its_turns(tmp_path: Path, tiny: Path,
                                                         expected: list[int]) -> None:
    """A peer pushing long FORWARDs back to back through the honest request's shard,
    three sessions at once: each honest step waits for at most the turn of the flood
    already running (one layer of one chunk), never for the flood's queue (first come
    first served would put it behind every queued turn), and decodes the same tokens."""
    async with swarm_with_greed(tmp_path, tiny, 1, ShardLimits()) as (entry, servers, greedy):
        shard = servers[0]
        log: list[tuple[str, str, int]] = []
        take = shard.server.compute.take

        @contextlib.asynccontextmanager
        async def recorded(peer: str, cost: int) -> AsyncIterator[None]:
            log.append(("ask", peer, cost))
            async with take(peer, cost):
                log.append(("run", peer, cost))
                yield

        shard.server.compute.take = recorded  # type: ignore[method-assign]
        flood = 3 * TURN_BUDGET  # three chunks a forward, a turn per layer each
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(greedy.flood, whole(shard.node.peer_id, LAYERS), flood)
            await wait_for(lambda: greedy.forwards >= 3, 20, "the flood to flow")
            tokens, _ = await generate(entry)
            nursery.cancel_scope.cancel()
        assert tokens == expected
        honest, flooder = entry.node.peer_id, greedy.node.peer_id
        asks = [i for i, (kind, peer, _) in enumerate(log) if kind == "ask" and peer == honest]
        assert len(asks) >= 8  # the prompt's pass and every decoding step
        # the flood went on all along: it had turns between the honest request's first
        # and last step
        assert [e for e in log[asks[0]:asks[-1]] if e[:2] == ("run", flooder)]
        for i in asks:
            ran = next(j for j in range(i, len(log)) if log[j][:2] == ("run", honest))
            flood_turns = [e for e in log[i:ran] if e[:2] == ("run", flooder)]
            assert len(flood_turns) <= 1, log[i:ran + 1]
        # a long FORWARD goes in turns of the budget: chunks of positions, one layer each
        assert {cost for kind, peer, cost in log if peer == flooder} == {TURN_BUDGET}
        stats = shard.server.compute.stats()
        assert stats[flooder].cost >= 2 * flood * LAYERS
        assert stats[honest].turns == len(asks)



async def test_a_saturated_swarm_is_a_503_with_retry_after(tmp_path: Path, tiny: Path) -> None:
    """The only peer serving layers 1..4 lends its one slot to a greedy peer (alone, it
    may take all): the honest request is refused there ("overloaded", the greedy peer
    within its share of one), finds no other route, and the API says the swarm is
    saturated, with a Retry-After."""
    async with swarm(3, tmp_path, connect="star", heartbeat_s=2.0) as (entry_node, shard_node,
                                                                      greedy_node):
        shard = await serve_model(shard_node, ModelOptions(
            str(tiny), layers=(0, LAYERS), limits=ShardLimits(max_sessions=1)))
        await serve_model(entry_node, ModelOptions(str(tiny), layers=(0, 1)))
        await wait_for(lambda: all(len([e for e in book(n).entries() if e.models]) == 2
                                   for n in (entry_node, greedy_node)), 15, "both listed")
        await wait_for(lambda: shard_node.peer_id in greedy_node.connected_peers(), 15,
                       "the greedy peer to reach the shard")
        greedy = GreedyPeer(greedy_node, shard.model_id, shard.block.hidden_size)
        assert await greedy.hold(whole(shard_node.peer_id, LAYERS), [64]) == 1
        app = create_app(entry_node, "t0ken")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://peerd", timeout=60.0) as client:
            r = await client.post("/v1/completions", headers={"Authorization": "Bearer t0ken"},
                                  json={"model": shard.model_id, "prompt": "hello",
                                        "max_tokens": 4})
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "saturated" and "saturated" in error["message"]
        assert int(r.headers["Retry-After"]) >= 1
        assert shard_node.offences[entry_node.peer_id]["over_share"] >= 1
        assert greedy.held and not greedy.held[0].failed.is_set()  # within its share
        await greedy.release()
