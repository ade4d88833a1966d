"""The shard pipeline over real in-process libp2p hosts, against single-process
transformers: a tiny random Llama split 1, 2 and 3 ways; fault tolerance; bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from libp2p.host.ping import ID as PING_PROTOCOL_ID

from peerd.inference.generate import NoCoverage
from peerd.inference.model.source import reference_model, resolve
from peerd.inference.model.tensors import to_wire
from peerd.inference.options import SamplingParams
from peerd.inference.runtime import ModelRuntime
from peerd.inference.slot import ModelOptions
from peerd.inference.swarm import pipeline as pipeline_module
from peerd.inference.swarm import server as server_module
from peerd.inference.swarm.pipeline import Pipeline, PipelineFailure, PipelineSession
from peerd.inference.swarm.routing import NoRoute, Route, Span
from peerd.node import Node
from peerd.rpc import stream_handler
from peerd.streams import OpenFailed
from protocols.codec import decode, encode
from protocols.errors import WireError
from protocols.framing import frame
from protocols.shard import Failed, Forward, Hop, HopTiming, Result
from protocols.shard_progress import SHARD_PROGRESS
from tests.harness import book, is_connected, serve_model, swarm, wait_for
from tests.models import tiny_llama_dir

LOGIT_ATOL = 1e-4  # float32 everywhere: the chain must match one process this closely
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> torch.nn.Module:
    return reference_model(resolve(str(tiny)))


PROMPT = [5, 17, 33, 101, 7, 250, 12, 64, 3, 99]


def reference_tokens(model: torch.nn.Module, prompt: Sequence[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([list(prompt)]), do_sample=False,  # type: ignore[operator]
                             max_new_tokens=n, min_new_tokens=n)
    return [int(t) for t in out[0, len(prompt):]]


@contextlib.asynccontextmanager
async def model_swarm(tmp_path: Path, spec: Path, splits: Sequence[tuple[int, int]],
                      extra_nodes: int = 0, dtype: str = "auto"
                      ) -> AsyncIterator[tuple[list[Node], list[ModelRuntime]]]:
    """One node per split (plus `extra_nodes` without a model), all connected."""
    async with swarm(len(splits) + extra_nodes, tmp_path, connect="star",
                     heartbeat_s=2.0) as nodes:
        runtimes = [await serve_model(node, ModelOptions(str(spec), layers=split, dtype=dtype))
                    for node, split in zip(nodes, splits, strict=False)]
        ids = {n.peer_id for n in nodes}
        await wait_for(lambda: all({e.peer_id for e in book(n).entries() if e.models}
                                   >= {r.node.peer_id for r in runtimes} for n in nodes),
                       15, "every ledger to list every shard")
        await wait_for(lambda: all(set(n.connected_peers()) >= ids - {n.peer_id}
                                   for n in nodes), 15, "a full mesh")
        yield nodes, runtimes


async def generate(runtime: ModelRuntime, prompt: Sequence[int], n: int = NEW_TOKENS,
                   on_token: object = None) -> tuple[list[int], dict[str, object]]:
    tokens: list[int] = []

    async def collect(token: int) -> bool:
        tokens.append(token)
        if callable(on_token):
            await on_token(len(tokens))
        return True

    request = await runtime.generator.prepare(list(prompt), SamplingParams(max_tokens=n))
    stats = await runtime.generator.generate(request, collect)
    return tokens, stats.to_json()


@pytest.mark.parametrize("splits", [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]],
                         ids=["1-way", "2-way", "3-way"])
async def test_split_matches_single_process(tmp_path: Path, tiny: Path,
                                           reference: torch.nn.Module,
                                           splits: list[tuple[int, int]]) -> None:
    expected = reference_tokens(reference, PROMPT, NEW_TOKENS)
    async with model_swarm(tmp_path, tiny, splits) as (_, runtimes):
        entry = runtimes[-1]  # the entry serves the last span: the route starts elsewhere
        tokens, info = await generate(entry, PROMPT)
        assert tokens == expected
        assert [hop["layers"] for hop in info["route"]] == [list(s) for s in splits]  # type: ignore[index, union-attr, attr-defined]

        # Per-position logits of the prompt through the pipeline vs one process.
        route = entry.generator.route()
        session = await entry.generator.pipeline.open(route, 64)  # type: ignore[arg-type]
        try:
            with torch.inference_mode():
                hidden = entry.head.embed(torch.tensor([PROMPT]))
            result = await session.step(hidden, 0)
        finally:
            await session.close()
        with torch.inference_mode():
            ours = entry.head.logits(result.hidden)[0]  # [T, V]
            theirs = reference(torch.tensor([PROMPT])).logits[0]  # type: ignore[operator]
        diff = (ours - theirs).abs().max().item()
        print(f"{len(splits)}-way: max |logit diff| = {diff:.2e} (tolerance {LOGIT_ATOL})")
        assert diff < LOGIT_ATOL


async def test_a_session_of_several_rows_computes_each_row_as_alone(tmp_path: Path,
                                                                    tiny: Path) -> None:
    """OPEN.rows = 3 over a 2-way split: each step runs the three rows as one batch and
    every row's hidden states are those of a one-row session on the same tokens (float
    rounding); every hop charges three rows' KV; the session is never pooled."""
    rows = [[5, 17, 33, 101], [7, 250, 12, 64], [3, 99, 5, 5]]
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4)]) as (_, runtimes):
        entry, shard = runtimes[1], runtimes[0]
        pipeline = entry.generator.pipeline
        route = entry.generator.route()
        assert isinstance(route, Route)

        async def run(tokens: list[list[int]], n_rows: int) -> torch.Tensor:
            session = await pipeline.open(route, 16, rows=n_rows)
            outs = []
            for pos, chunk in ((0, [r[:3] for r in tokens]), (3, [r[3:] for r in tokens])):
                with torch.inference_mode():
                    hidden = entry.head.embed(torch.tensor(chunk))  # [rows, T, H]
                outs.append((await session.step(hidden, pos)).hidden)
            if n_rows > 1:
                held = shard.server.lending.lent[session.id]
                assert held.kv_per_position == n_rows * shard.block.kv_bytes_per_position()
                await pipeline.release(session)  # not pooled: closed
                assert not pipeline.pooled and session.done.is_set()
            else:
                await session.close()
            return torch.cat(outs, 1)  # [rows, 4, H]

        together = await run(rows, 3)
        assert together.shape == (3, 4, entry.head.hidden_size)
        for i, row in enumerate(rows):
            alone = await run([row], 1)
            assert torch.allclose(together[i], alone[0], atol=1e-5), i
        # rows 0 and 2 share a prompt: the first step carries it once (`source`), each
        # hop computes it once and copies its KV, then the rows go their own ways
        forked = [[*rows[0][:3], 9], rows[1], [*rows[0][:3], 11]]
        session = await pipeline.open(route, 16, rows=3)
        with torch.inference_mode():
            first = entry.head.embed(torch.tensor([rows[0][:3], rows[1][:3]]))
            then = entry.head.embed(torch.tensor([[r[3]] for r in forked]))
        out = (await session.step(first, 0, source=(0, 1, 0))).hidden
        assert out.shape == (2, 3, entry.head.hidden_size)  # the FORWARD's rows
        last = (await session.step(then, 3)).hidden  # [3, 1, H]
        held = shard.server.sessions[session.id]
        assert shard.block.cache_len(held.cache) == 4
        await session.close()
        for i, row in enumerate(forked):
            alone = await run([row], 1)
            assert torch.allclose(out[[0, 1, 0][i]], alone[0, :3], atol=1e-5), i
            assert torch.allclose(last[i, 0], alone[0, 3], atol=1e-5), i

        session = await pipeline.open(route, 16, rows=3)
        with pytest.raises(ValueError, match="rows"):  # the entry's own check
            await session.step(torch.zeros(1, 2, entry.head.hidden_size), 0)
        await session.close()


async def test_failed_shard_is_rerouted_and_replayed(tmp_path: Path, tiny: Path,
                                                     reference: torch.nn.Module) -> None:
    """Two replicas of [2, 4): the serving one fails mid-generation; the request
    completes through the other with the same tokens. (The process-level crash, a
    SIGKILLed peer, is tested on the testnet.)"""
    expected = reference_tokens(reference, PROMPT, 12)
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        route = entry.generator.route()
        serving = route.spans[-1].peer_id  # type: ignore[union-attr]
        victim = next(r for r in runtimes if r.node.peer_id == serving)

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("simulated GPU failure")

        async def fail_after_five(produced: int) -> None:
            if produced == 5:
                victim.block.begin = broken  # type: ignore[method-assign, assignment]

        tokens, info = await generate(entry, PROMPT, 12, fail_after_five)
        assert tokens == expected
        assert info["reroutes"] == 1
        assert info["route"][-1]["peer_id"] != serving  # type: ignore[index]
        assert any(e.type == "inference.ban" and e.data["peer_id"] == serving
                   for e in entry.node.events.recent())


async def test_no_coverage_names_the_missing_layers(tmp_path: Path, tiny: Path) -> None:
    async with model_swarm(tmp_path, tiny, [(0, 1), (3, 4)]) as (_, runtimes):
        with pytest.raises(NoCoverage, match=r"\[1, 3\)"):
            await generate(runtimes[0], PROMPT)


async def test_a_finished_session_is_reused_by_the_next_request(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module) -> None:
    """The next request on the same route takes the idle session (no OPEN round trips)
    and truncates its caches with keep=0: same tokens. A pooled session that the
    shards dropped meanwhile is replaced by a fresh one, and nobody is blamed."""
    expected = reference_tokens(reference, PROMPT, NEW_TOKENS)
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4)]) as (_, runtimes):
        entry, other = runtimes
        assert (await generate(entry, PROMPT))[0] == expected
        assert entry.generator.pipeline.pooled == 1
        first = next(iter(other.server.sessions))
        tokens, info = await generate(entry, PROMPT[:4])
        assert tokens == reference_tokens(reference, PROMPT[:4], NEW_TOKENS)
        assert list(other.server.sessions) == [first]  # the same session served both
        assert (await generate(entry, PROMPT))[0] == expected
        # the shards forget the idle session (a restart, a ttl): the next request opens
        # a new one without banning anyone
        for r in runtimes:
            for session in list(r.server.sessions.values()):
                await r.server._drop(session)
        tokens, info = await generate(entry, PROMPT)
        assert tokens == expected and info["reroutes"] == 0
        assert not entry.generator.bans.banned(time.monotonic())
        assert list(other.server.sessions) != [first]


async def test_a_pooled_session_serves_a_shared_prefix_from_its_caches(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module) -> None:
    """reuse_prefix: a request that extends what the pooled session's caches hold
    (a chain resumed after a tool call) computes only its new tokens, via keep, and
    still decodes what one process does; a request that parts early reuses only the
    shared tokens; without reuse_prefix nothing is reused."""
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]

        async def run(prompt: list[int], reuse: bool) -> tuple[list[int], int]:
            out: list[int] = []

            async def collect(token: int) -> bool:
                out.append(token)
                return True

            request = await entry.generator.prepare(prompt, SamplingParams(max_tokens=NEW_TOKENS))
            stats = await entry.generator.generate(request, collect, reuse_prefix=reuse)
            return out, stats.cached_tokens

        first, cached = await run(PROMPT, True)
        assert cached == 0  # nothing pooled yet
        # the caches hold PROMPT and the first 7 generated tokens; resume after 4 of
        # them plus a token of our own (what a calculator's result looks like)
        resumed = [*PROMPT, *first[:4], 42]
        tokens, cached = await run(resumed, True)
        assert cached == len(PROMPT) + 4
        assert tokens == reference_tokens(reference, resumed, NEW_TOKENS)
        parted = [PROMPT[0], PROMPT[1], 77, *PROMPT[3:]]
        tokens, cached = await run(parted, True)
        assert cached == 2
        assert tokens == reference_tokens(reference, parted, NEW_TOKENS)
        tokens, cached = await run(parted, False)
        assert cached == 0
        assert tokens == reference_tokens(reference, parted, NEW_TOKENS)


def test_the_pool_hands_out_the_session_caching_the_longest_prefix() -> None:
    pipeline = Pipeline(None, "m")  # type: ignore[arg-type]  # take() needs no node
    route = Route((Span("p", 0, 4, 1.0),), 1.0)
    hops = (Hop("p", 0, 4),)
    a, b, c = (PipelineSession(pipeline, name, hops, "float32", max_length=256)
               for name in "abc")
    a.cached, b.cached, c.cached = (1, 2, 3, 4), (1, 2, 9), (1, 2, 3)
    pipeline.pool[hops] = [a, b, c]
    assert pipeline.take(route, 300, [1, 2, 3, 4, 5]) is None  # none long enough
    assert pipeline.take(route, 128, [1, 2, 3, 4, 5]) is a
    assert pipeline.take(route, 128, [1, 2, 3, 4, 5]) is c  # 3 shared beat 2
    assert pipeline.take(route, 128, [7]) is b
    assert pipeline.take(route, 128, [7]) is None
    pipeline.pool[hops] = [a, b]
    assert pipeline.take(route, 128, [8]) is b  # equals: the most recently pooled


async def test_entry_alone_with_the_whole_model(tmp_path: Path, tiny: Path,
                                                reference: torch.nn.Module) -> None:
    """A single peer serving every layer routes through itself (loopback streams)."""
    async with model_swarm(tmp_path, tiny, [(0, 4)]) as (_, runtimes):
        with trio.fail_after(30):
            tokens, _ = await generate(runtimes[0], PROMPT)
    assert tokens == reference_tokens(reference, PROMPT, NEW_TOKENS)


async def test_model_peers_stay_connected_beyond_target_peers(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module) -> None:
    """With target_peers=1 a line n0 - n1 - n2 stays a line, but n0 and n2 serve the
    two halves of one model: each keeps a connection to the other, so the first
    request does not wait for one, and its route is priced with a measured RTT."""
    async with swarm(3, tmp_path, connect="line", heartbeat_s=1.0,
                     target_peers=1) as (n0, n1, n2):
        first = await serve_model(n0, ModelOptions(str(tiny), layers=(0, 2)))
        await serve_model(n2, ModelOptions(str(tiny), layers=(2, 4)))
        await wait_for(lambda: is_connected(n0.host, n2.peer_id), 20,
                       "the halves' peers to connect")
        assert n1.peer_id in n0.connected_peers()  # the line's own link stays
        await wait_for(lambda: n2.peer_id in n0.rtt_ms, 20, "an RTT probe of n2")
        with trio.fail_after(30):
            tokens, info = await generate(first, PROMPT)
        assert tokens == reference_tokens(reference, PROMPT, NEW_TOKENS)
        assert [hop["layers"] for hop in info["route"]] == [[0, 2], [2, 4]]  # type: ignore[index, union-attr, attr-defined]


async def test_a_peer_without_layers_takes_the_least_served_window(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Placement end to end: with room for two layers, a newcomer next to a peer
    serving [0, 2) takes [2, 4), and together they serve the model."""
    import peerd.inference.runtime as runtime_mod

    monkeypatch.setattr(runtime_mod, "window_size", lambda *args: 2)
    async with swarm(2, tmp_path, connect="star", heartbeat_s=2.0) as (a, b):
        first = await serve_model(a, ModelOptions(str(tiny), layers=(0, 2)))
        await wait_for(lambda: any(e.models for e in book(b).entries()), 10,
                       "the newcomer to see the first shard")
        newcomer = await serve_model(b, ModelOptions(str(tiny)))
        assert (newcomer.block.start, newcomer.block.end) == (2, 4)
        await wait_for(lambda: not isinstance(first.generator.route(), NoRoute), 10,
                       "the first peer to see the newcomer's shard")
        tokens, _ = await generate(first, PROMPT)
    assert tokens == reference_tokens(reference, PROMPT, NEW_TOKENS)


async def test_a_forward_cut_by_a_cancel_resets_the_stream_and_blames_no_one(
        tmp_path: Path, tiny: Path) -> None:
    """A request cancelled (its client left) while its FORWARD was part-way onto the
    wire: the entry resets the stream instead of writing a CLOSE after the cut frame,
    which the first hop would read as garbage and count against an honest entry."""
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4)]) as (_, runtimes):
        entry, first_hop = runtimes[1], runtimes[0]
        pipeline = entry.generator.pipeline
        route = entry.generator.route()
        assert isinstance(route, Route)
        session = await pipeline.open(route, 16)
        assert session.peers[0] == first_hop.node.peer_id
        with torch.inference_mode():
            hidden = entry.head.embed(torch.tensor([[5, 17, 33, 101]]))  # [1, 4, H]
        write = session.first.write

        async def cut_write(data: bytes) -> None:
            await write(data[:len(data) // 2])  # half the frame goes out
            cancel.cancel()
            await trio.lowlevel.checkpoint()

        session.first.write = cut_write
        with trio.CancelScope() as cancel:
            await session.step(hidden, 0)
        assert session.writing
        await pipeline.release(session)  # a cut session is never pooled
        assert not pipeline.pooled and session.done.is_set()
        server = first_hop.server
        await wait_for(lambda: session.id not in server.sessions, 10,
                       "the first hop to drop the session")
        assert not first_hop.node.offences.get(entry.node.peer_id), \
            dict(first_hop.node.offences[entry.node.peer_id])


async def test_a_hop_cut_mid_forward_resets_downstream_and_blames_no_one(
        tmp_path: Path, tiny: Path) -> None:
    """A middle hop whose session is evicted while its FORWARD to the next hop is
    part-way onto the wire resets that stream: the next hop counts nothing against it
    (a CLOSE after the cut frame read as garbage, before), and the entry learns the
    step failed."""
    async with model_swarm(tmp_path, tiny, [(0, 1), (1, 2), (2, 4)]) as (_, runtimes):
        first, second, entry = runtimes
        route = entry.generator.route()
        assert isinstance(route, Route)
        pipeline = entry.generator.pipeline
        session = await pipeline.open(route, 16)
        assert session.peers[:2] == [first.node.peer_id, second.node.peer_id]
        with torch.inference_mode():
            hidden = entry.head.embed(torch.tensor([[5, 17, 33, 101]]))  # [1, 4, H]
        await session.step(hidden[:, :2], 0)  # the session is open all along the route
        held = first.server.sessions[session.id]
        write = held.downstream.write

        async def cut_write(data: bytes) -> None:
            await write(data[:len(data) // 2])  # half the frame goes out
            held.scope.cancel()  # as an eviction does
            await trio.lowlevel.checkpoint()

        held.downstream.write = cut_write
        with pytest.raises(PipelineFailure):
            await session.step(hidden[:, 2:], 2)
        assert held.writing
        await wait_for(lambda: session.id not in second.server.sessions, 10,
                       "the second hop to drop the session")
        assert not second.node.offences.get(first.node.peer_id), \
            dict(second.node.offences[first.node.peer_id])
        await session.close()


def unframed(data: bytes) -> bytes | None:
    """The body of `data` if it is one whole frame (as write_frame writes it)."""
    length, shift = 0, 0
    for i, byte in enumerate(data[:10]):
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            body = data[i + 1:]
            return body if len(body) == length else None
    return None


Lie = Callable[[Any], Any]  # a FORWARD or RESULT -> what the liar sends instead


def lie_downstream(liar: ModelRuntime, lie: Lie, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, `liar`'s shard server sends down each chain it opens what `lie`
    makes of every FORWARD or RESULT: a hop that lies past every check of its own."""
    connected = liar.server._connected

    def lying(s: Any, stream: Any) -> None:
        write = stream.write

        async def lying_write(data: bytes) -> None:
            body = unframed(data)
            if body is not None:
                try:
                    data = frame(encode(lie(decode(body, Forward, Result))))
                except WireError:  # (a CLOSE)
                    pass
            await write(data)

        stream.write = lying_write
        connected(s, stream)

    monkeypatch.setattr(liar.server, "_connected", lying)


def nan_hidden(msg: Any) -> Any:
    h = msg.hidden
    return dataclasses.replace(msg, hidden=to_wire(torch.full(h.shape, math.nan)))


LIES: dict[str, Lie] = {
    "NaN hidden states": nan_hidden,
    "an infinite compute time": lambda m: dataclasses.replace(m, timings=(
        *m.timings[:-1], HopTiming(m.timings[-1].peer_id, math.inf))),
    "a timing of a hop not on the route": lambda m: dataclasses.replace(
        m, timings=(*m.timings, m.timings[-1])),
}


def later_hops(entry: ModelRuntime, runtimes: Sequence[ModelRuntime]
               ) -> tuple[ModelRuntime, ModelRuntime]:
    """The second and third hops of the entry's route (three hops, the entry first)."""
    route = entry.generator.route()
    assert isinstance(route, Route) and len(route.spans) == 3
    second, third = (next(r for r in runtimes if r.node.peer_id == span.peer_id)
                     for span in route.spans[1:])
    return second, third


async def failed_step(entry: ModelRuntime, session: PipelineSession) -> PipelineFailure:
    """The failure of a step of PROMPT on `session` (which it closes)."""
    with torch.inference_mode():
        hidden = entry.head.embed(torch.tensor([PROMPT]))  # [1, T, H]
    with pytest.raises(PipelineFailure) as failed:
        await session.step(hidden, 0)
    await session.close()
    return failed.value


def failures(runtime: ModelRuntime) -> list[dict[str, Any]]:
    """The pipeline failures `runtime` blamed, as its events say them."""
    return [e.data for e in runtime.node.events.recent() if e.type == "inference.failure"]


@pytest.mark.parametrize("lie", list(LIES))
async def test_a_last_hop_returning_what_no_model_computes_is_banned_and_routed_around(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch, lie: str) -> None:
    """A RESULT's NaN hidden states made sampling raise (a 500, and the hop, never
    blamed, failed every request it served) or greedy decoding emit garbage; a NaN or
    infinite compute time reached the request's stats (a non-streamed answer was a
    500: JSON has no NaN). The entry refuses such a RESULT: the last hop is blamed
    (malformed: counted, banned), the request replays on a replica with the same
    tokens, and with no replica left it fails as the swarm not covering the model
    (the API's 503), never with garbage."""
    expected = reference_tokens(reference, PROMPT, NEW_TOKENS)
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        route = entry.generator.route()
        assert isinstance(route, Route)
        liar = next(r for r in runtimes if r.node.peer_id == route.spans[-1].peer_id)
        honest = next(r for r in runtimes[1:] if r is not liar)
        lie_downstream(liar, LIES[lie], monkeypatch)
        tokens, info = await generate(entry, PROMPT)
        assert tokens == expected
        assert info["reroutes"] == 1
        assert info["route"][-1]["peer_id"] == honest.node.peer_id  # type: ignore[index]
        json.dumps(info, allow_nan=False)  # what the API answers
        assert [(f["culprit"], f["code"]) for f in failures(entry)] == [(liar.node.peer_id,
                                                                         "malformed")]
        assert entry.node.offences[liar.node.peer_id]["malformed"] == 1
        assert liar.node.peer_id in entry.generator.bans.banned(time.monotonic())

        # the replica lies too (on a new session: the pooled one is closed)
        pipeline = entry.generator.pipeline
        for idle in list(pipeline.pool.values()):
            for session in list(idle):
                await session.close()
        pipeline.pool.clear()
        lie_downstream(honest, LIES[lie], monkeypatch)
        with pytest.raises(NoCoverage, match=r"\[2, 4\)"):
            await generate(entry, PROMPT)
        assert honest.node.peer_id in entry.generator.bans.banned(time.monotonic())


async def test_a_middle_hops_non_finite_hidden_states_stop_at_the_next_hop(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN from the first of two hops: the next hop refuses it (malformed, counted
    against the first hop) instead of computing NaN from it, which the entry would
    blame on that honest last hop alone; the next hop tells the entry, which cannot
    tell which of the two lies and blames the first with the last as its witness; the
    next hop keeps serving."""
    async with model_swarm(tmp_path, tiny, [(0, 4), (0, 2), (2, 4)]) as (_, runtimes):
        entry, first, second = runtimes
        pipeline = entry.generator.pipeline
        route = Route((Span(first.node.peer_id, 0, 2, 0.0),
                       Span(second.node.peer_id, 2, 4, 0.0)), 0.0)
        lie_downstream(first, nan_hidden, monkeypatch)
        session = await pipeline.open(route, 16)
        failed = await failed_step(entry, session)
        assert (failed.culprit, failed.witness, failed.code) == (
            first.node.peer_id, second.node.peer_id, "malformed"), failed
        assert second.node.offences[first.node.peer_id]["malformed"] == 1
        await wait_for(lambda: session.id not in second.server.sessions, 10,
                       "the next hop to drop the session")
        fresh = await pipeline.open(Route((Span(entry.node.peer_id, 0, 2, 0.0),
                                           Span(second.node.peer_id, 2, 4, 0.0)), 0.0), 16)
        with torch.inference_mode():
            hidden = entry.head.embed(torch.tensor([PROMPT]))  # [1, T, H]
        assert (await fresh.step(hidden, 0)).hidden.isfinite().all()
        await fresh.close()


async def test_a_middle_hop_that_lies_is_banned_with_its_witness_and_routed_around(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A middle hop sending NaN down the chain: the next hop's refusal would go back
    through the liar, which swallowed it, so every try failed with nobody blamed and
    the request failed. Now the next hop tells the entry: the liar and its witness are
    banned, and the request replays on the other replicas with the same tokens."""
    expected = reference_tokens(reference, PROMPT, NEW_TOKENS)
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 3), (2, 3), (3, 4), (3, 4)]) as (
            _, runtimes):
        entry = runtimes[0]
        liar, witness = later_hops(entry, runtimes)
        lie_downstream(liar, nan_hidden, monkeypatch)
        tokens, info = await generate(entry, PROMPT)
        assert tokens == expected
        assert info["reroutes"] == 1
        assert [(f["culprit"], f["witness"], f["code"]) for f in failures(entry)] == [
            (liar.node.peer_id, witness.node.peer_id, "malformed")]
        banned = entry.generator.bans.banned(time.monotonic())
        assert {liar.node.peer_id, witness.node.peer_id} <= banned
        assert not {s["peer_id"] for s in info["route"][1:]} & banned  # type: ignore[index]


@pytest.mark.parametrize("next_hop_up", [True, False], ids=["up", "gone"])
async def test_a_hop_that_says_its_next_hop_is_unreachable_is_checked(
        tmp_path: Path, tiny: Path, next_hop_up: bool) -> None:
    """The first of two hops cannot write to the next and reports it unreachable: the
    entry pings that hop. One that does not answer is blamed alone; one that answers is
    blamed with the reporter as its witness (the reporter lies, or the next hop took
    the session and stalled it: the entry cannot tell)."""
    async with model_swarm(tmp_path, tiny, [(0, 4), (0, 2), (2, 4)]) as (_, runtimes):
        entry, first, second = runtimes
        route = Route((Span(first.node.peer_id, 0, 2, 0.0),
                       Span(second.node.peer_id, 2, 4, 0.0)), 0.0)
        session = await entry.generator.pipeline.open(route, 16)

        async def down(data: bytes) -> None:
            raise trio.BrokenResourceError("the link to the next hop is down")

        for s in first.server.sessions.values():  # the session's link to the next hop
            s.downstream.write = down
        if not next_hop_up:  # a hop that hangs: it answers no ping either
            second.node.host.remove_stream_handler(PING_PROTOCOL_ID)
        failed = await failed_step(entry, session)
        witness = first.node.peer_id if next_hop_up else None
        assert (failed.culprit, failed.witness, failed.code) == (
            second.node.peer_id, witness, "unreachable"), failed


@pytest.mark.parametrize("next_hop_up", [True, False], ids=["up", "gone"])
async def test_a_hop_that_cannot_open_the_session_on_its_next_hop_is_checked(
        tmp_path: Path, tiny: Path, next_hop_up: bool) -> None:
    """At OPEN, the first of two hops cannot dial the next and refuses the session as
    its own failure, relayed to the entry. That is its word about its next hop, as
    when a FORWARD cannot be written: a next hop that answers no ping from the entry is
    blamed alone (it had banned the honest reporter, and each replica before a dead
    hop in turn); one that answers is blamed with the reporter as its witness."""
    async with model_swarm(tmp_path, tiny, [(0, 4), (0, 2), (2, 4)]) as (_, runtimes):
        entry, first, second = runtimes
        route = Route((Span(first.node.peer_id, 0, 2, 0.0),
                       Span(second.node.peer_id, 2, 4, 0.0)), 0.0)
        dial = first.node.new_stream_eager

        async def cut(peer_id: str, protocol: str) -> Any:
            if peer_id == second.node.peer_id:
                raise OpenFailed(peer_id, f"no route to {peer_id}")
            return await dial(peer_id, protocol)

        first.node.new_stream_eager = cut  # type: ignore[method-assign]
        if not next_hop_up:  # a hop that hangs: it answers no ping either
            second.node.host.remove_stream_handler(PING_PROTOCOL_ID)
        with pytest.raises(PipelineFailure) as failed:
            await entry.generator.pipeline.open(route, 16)
        witness = first.node.peer_id if next_hop_up else None
        assert (failed.value.culprit, failed.value.witness, failed.value.code) == (
            second.node.peer_id, witness, "unreachable"), failed.value


async def test_a_hop_that_forges_a_later_hops_refusal_is_blamed_with_its_witness(
        tmp_path: Path, tiny: Path) -> None:
    """The middle of three hops refuses the session in the last hop's name (it cannot
    sign as the last hop). Before refusals were signed, the entry banned the honest last
    hop alone, on the word of whoever relayed it, and the liar went on unblamed. Now the
    first hop finds the signature false and refuses the session naming the liar: the
    entry blames it, the first hop as its witness, and never the last hop."""
    async with model_swarm(tmp_path, tiny, [(0, 4), (0, 1), (1, 3), (3, 4)]) as (_, runtimes):
        entry, first, middle, last = runtimes
        route = Route((Span(first.node.peer_id, 0, 1, 0.0), Span(middle.node.peer_id, 1, 3, 0.0),
                       Span(last.node.peer_id, 3, 4, 0.0)), 0.0)

        async def forge(req: Any, connected: Any = None) -> Any:
            raise server_module.Refused("overloaded", "no room", relayed=Failed(
                session=req.session, step=-1, peer_id=last.node.peer_id, code="overloaded",
                message="no room", by=last.node.peer_id, sig=b"\0" * 64))

        middle.server._connect_downstream = forge  # type: ignore[method-assign]
        with pytest.raises(PipelineFailure) as failed:
            await entry.generator.pipeline.open(route, 16)
        assert (failed.value.culprit, failed.value.witness, failed.value.code) == (
            middle.node.peer_id, first.node.peer_id, "bad_signature"), failed.value
        assert last.node.peer_id not in failed.value.at_fault


async def test_a_hop_whose_own_output_overflows_reports_itself(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hop whose compute gives an infinity (float16 overflows at 65504) sends it no
    further: it reports itself to the entry (internal, banned like any failing hop)
    instead of passing it on for its next hop to count as an offence."""
    async with model_swarm(tmp_path, tiny, [(0, 4), (0, 2), (2, 4)]) as (_, runtimes):
        entry, first, second = runtimes
        route = Route((Span(first.node.peer_id, 0, 2, 0.0),
                       Span(second.node.peer_id, 2, 4, 0.0)), 0.0)
        forward = first.server._forward

        async def overflowing(s: Any, msg: Forward) -> torch.Tensor:
            out: torch.Tensor = await forward(s, msg)  # [1, T, H]
            return out.clone().index_fill_(2, torch.tensor([0]), math.inf)

        monkeypatch.setattr(first.server, "_forward", overflowing)
        session = await entry.generator.pipeline.open(route, 16)
        failed = await failed_step(entry, session)
        assert (failed.culprit, failed.code) == (first.node.peer_id, "internal")
        assert "finite" in str(failed)
        assert not second.node.offences.get(first.node.peer_id)


async def test_a_model_deeper_than_a_ledger_entry_may_say_fails_to_load_in_words(
        tiny: Path, tmp_path: Path) -> None:
    """A config of 1025 decoder layers loaded, then our ledger entry (which says the
    model's depth) failed its own check: the error escaped the model slot after it had
    started, and ended the daemon."""
    import shutil

    from peerd.inference.slot import ModelSlot
    from tests.harness import advertise, gossip, has_entry

    deep = tmp_path / "deep"
    shutil.copytree(tiny, deep)
    config = json.loads((deep / "config.json").read_text())
    (deep / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1025}))
    async with swarm(2, tmp_path, heartbeat_s=0.3) as (a, b):
        slot = ModelSlot(a, gossip(a), ModelOptions(str(deep)))
        await a.start(slot)
        await slot.settled.wait()
        assert slot.state == "failed" and "1025 decoder layers" in (slot.error or "")
        await advertise(a, ["still-here"])
        await wait_for(lambda: has_entry(b, a.peer_id, skills=("still-here",)), 10,
                       "a's ledger service still runs")


HOLDS: dict[str, str] = {
    # how the middle hop answers the entry's question (how far did the step get?)
    "says it holds it": "holds",
    "says it passed it on": "lies",
    "does not answer": "silent",
}


@pytest.mark.parametrize("answer", list(HOLDS))
async def test_a_hop_that_holds_steps_is_found_by_asking_the_hops_and_routed_around(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """A middle hop takes each FORWARD in and never passes it on. Every hop answered
    pings and nobody said a word, so each try stalled to its deadline with nobody
    blamed, and the request failed: one peer could fail every request routed through
    it. Now the entry asks each hop how far the step got: the hop that holds it is
    blamed alone; one that claims it passed it on is blamed with the next hop, which
    says it never got it (the entry cannot tell which lies); one that does not answer
    is blamed alone. The request replays around them with the same tokens."""
    expected = reference_tokens(reference, PROMPT, NEW_TOKENS)
    monkeypatch.setattr(pipeline_module, "step_deadline_s", lambda positions: 3.0)
    monkeypatch.setattr(pipeline_module, "PROGRESS_TIMEOUT_S", 1.0)
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 3), (2, 3), (3, 4), (3, 4)]) as (
            _, runtimes):
        entry = runtimes[0]
        liar, after = later_hops(entry, runtimes)

        async def hold(s: Any, msg: Forward) -> Any:
            await trio.sleep_forever()

        monkeypatch.setattr(liar.server, "_forward", hold)
        book = liar.server.progress
        if HOLDS[answer] == "lies":
            honest = book.answer

            def claim(peer: str, req: Any) -> Any:
                said = honest(peer, req)
                return dataclasses.replace(said, passed=said.received)

            monkeypatch.setattr(book, "answer", claim)
        elif HOLDS[answer] == "silent":
            async def silent(peer: str, req: Any) -> Any:
                await trio.sleep_forever()

            liar.node.set_stream_handler(SHARD_PROGRESS.id, stream_handler(
                SHARD_PROGRESS, silent, liar.node.offence))
        tokens, info = await generate(entry, PROMPT)
        assert tokens == expected
        assert info["reroutes"] == 1
        blamed = ((after.node.peer_id, liar.node.peer_id) if HOLDS[answer] == "lies"
                  else (liar.node.peer_id, None))
        assert [(f["culprit"], f["witness"], f["code"]) for f in failures(entry)] == [
            (*blamed, "stalled")], failures(entry)
        banned = entry.generator.bans.banned(time.monotonic())
        assert {p for p in blamed if p} <= banned
        assert not {s["peer_id"] for s in info["route"][1:]} & banned  # type: ignore[index]


async def test_a_refusal_a_hop_swallows_reaches_the_entry_from_the_hop_that_sent_it(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last of three hops refuses the session (overloaded); the middle hop keeps
    the refusal from the entry and says nothing. The step stalled to its deadline with
    nobody blamed. Now the entry asks each hop how far the step got, and the last hop
    answers with the refusal it sent: the entry weighs it as if it had come."""
    monkeypatch.setattr(pipeline_module, "step_deadline_s", lambda positions: 5.0)
    async with model_swarm(tmp_path, tiny, [(0, 4), (0, 1), (1, 3), (3, 4)]) as (_, runtimes):
        entry, first, middle, last = runtimes
        route = Route((Span(first.node.peer_id, 0, 1, 0.0), Span(middle.node.peer_id, 1, 3, 0.0),
                       Span(last.node.peer_id, 3, 4, 0.0)), 0.0)

        class Full:
            async def admit(self, tag: Any, revoke: Any) -> Any:
                raise server_module.Refused("overloaded", f"{last.node.peer_id} is full")

        last.server.gate = Full()
        server = middle.server

        async def swallow(s: Any, upstream: Any) -> None:
            try:
                await server._connect_downstream(s.open, lambda st: server._connected(s, st))
            except server_module.Refused:
                await trio.sleep_forever()  # holds the session, tells nobody

        monkeypatch.setattr(server, "_chain", swallow)
        session = await entry.generator.pipeline.start(route, 16)
        failed = await failed_step(entry, session)
        assert (failed.culprit, failed.witness, failed.code) == (
            last.node.peer_id, None, "overloaded"), failed
