"""A cold pipeline session on /peerd/shard/3.0.0, over real in-process hosts: its OPEN
travels with the first FORWARD and no hop waits for any answer (the first step
completes with every OPENED held back), streams open without multistream round
trips; a refusal from the last hop reaches the entry naming it; a peer of another
version is named with code "version", and a 1.0.0 dialer is told why; a return stream
for a session the entry never opened ends the session along the chain; an eager stream
half-closes as a negotiated one does."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

import peerd.streams as streams_module
from peerd.inference.runtime import ModelRuntime
from peerd.inference.slot import ModelOptions, ShardLimits
from peerd.inference.swarm import pipeline as pipeline_module
from peerd.inference.swarm import server as server_module
from peerd.inference.swarm.pipeline import PipelineFailure
from peerd.inference.swarm.routing import Route, Span
from peerd.node import Node
from protocols import framing
from protocols.codec import decode, encode, unpackb
from protocols.shard import (
    RETIRED_IDS,
    RETIRED_RETURN_IDS,
    SHARD,
    SHARD_RETURN,
    Failed,
    Hop,
    Open,
    Opened,
)
from protocols.spec import ErrorReply
from tests.harness import book, serve_model, swarm, wait_for
from tests.models import tiny_llama_dir

SPLITS = [(0, 1), (1, 3), (3, 4)]
PROMPT = [5, 17, 33, 101, 7, 250, 12, 64, 3, 99]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@contextlib.asynccontextmanager
async def chain(tmp_path: Path, tiny: Path, last: ShardLimits | None = None
                ) -> AsyncIterator[list[ModelRuntime]]:
    """Three peers serving the tiny model in three spans, all connected; the last with
    `last` limits."""
    async with swarm(3, tmp_path, connect="star", heartbeat_s=2.0) as nodes:
        runtimes = [await serve_model(n, ModelOptions(str(tiny), layers=split,
                                                      limits=(last if i == 2 else None)
                                                      or ShardLimits()))
                    for i, (n, split) in enumerate(zip(nodes, SPLITS, strict=True))]
        ids = {n.peer_id for n in nodes}
        await wait_for(lambda: all(len([e for e in book(n).entries() if e.models]) == 3
                                   for n in nodes), 15, "every ledger to list every shard")
        await wait_for(lambda: all(set(n.connected_peers()) >= ids - {n.peer_id}
                                   for n in nodes), 15, "a full mesh")
        yield runtimes


def route_of(runtimes: list[ModelRuntime]) -> Route:
    return Route(tuple(Span(r.node.peer_id, a, b, 0.0)
                       for r, (a, b) in zip(runtimes, SPLITS, strict=True)), 0.0)


def embed(rt: ModelRuntime) -> torch.Tensor:
    with torch.inference_mode():
        return rt.head.embed(torch.tensor([PROMPT]))  # [1, T, H]


def kind(payload: bytes) -> str:
    obj = unpackb(payload)
    return str(obj.get("t")) if isinstance(obj, dict) else "?"


async def test_a_cold_step_waits_for_no_answer(tmp_path: Path, tiny: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """No answer to an opening is read until the first step is done (every read of
    one, peerd.streams.read_answer, is held back); the step completes all the same,
    with the hidden states an eagerly opened session computes, so no hop waited for an
    answer: the open and the first FORWARD are one pass. Each hop opened one stream,
    without negotiating it first, and the frames that crossed are the pass's own."""
    release = trio.Event()
    written: Counter[str] = Counter()

    async def held_read(stream: Any, max_size: int) -> bytes:
        await release.wait()
        return await framing.read_frame(stream, max_size)

    def counting(write: Any) -> Any:
        async def write_frame(stream: Any, payload: bytes, max_size: int) -> None:
            written[kind(payload)] += 1
            await write(stream, payload, max_size)
        return write_frame

    async with chain(tmp_path, tiny) as runtimes:
        entry = runtimes[0]
        route = route_of(runtimes)
        reference = await entry.generator.pipeline.open(route, 64)  # (waits for answers)
        expected = (await reference.step(embed(entry), 0)).hidden
        await reference.close()
        await wait_for(lambda: not any(r.server.sessions for r in runtimes), 5,
                       "the reference session closed everywhere")

        opened: Counter[tuple[str, bool]] = Counter()  # (protocol, eager) of remote streams
        for name, eager in (("new_stream", False), ("new_stream_eager", True)):
            original = getattr(Node, name)

            async def dial(self: Node, peer_id: str, protocol: str, _o: Any = original,
                           _e: bool = eager) -> Any:
                if peer_id != self.peer_id and protocol.startswith("/peerd/shard"):
                    opened[protocol, _e] += 1
                return await _o(self, peer_id, protocol)
            monkeypatch.setattr(Node, name, dial)
        monkeypatch.setattr(streams_module, "read_frame", held_read)
        for module in (server_module, pipeline_module, streams_module):
            monkeypatch.setattr(module, "write_frame", counting(framing.write_frame))

        with trio.fail_after(30):
            session = await entry.generator.pipeline.start(route, 64)
            result = await session.step(embed(entry), 0)
        assert torch.equal(result.hidden, expected)
        # entry -> n0 is in-process; n0 -> n1, n1 -> n2, n2 -> the entry's return stream
        assert opened == {(SHARD.id, True): 2, (SHARD_RETURN.id, True): 1}
        # OPENED: each hop's answer (3), the return stream's opening and its answer
        assert written == {"shard.open": 3, "shard.forward": 3, "shard.opened": 5,
                           "shard.result": 1}
        assert not session.admitted.is_set()  # the first hop's answer is still unread
        release.set()
        await wait_for(lambda: session.admitted.is_set(), 5, "the first hop's OPENED read")
        await session.close()


async def test_a_refusal_from_the_last_hop_reaches_the_entry_naming_it(
        tmp_path: Path, tiny: Path) -> None:
    """The last hop is full: it refuses the OPEN that came with the first FORWARD; the
    refusal is relayed up the chain, the step fails naming that hop, and every hop
    before it lets the session go."""
    async with chain(tmp_path, tiny, last=ShardLimits(max_sessions=1)) as runtimes:
        entry, _, last = runtimes
        pipeline = entry.generator.pipeline
        holder = await pipeline.open(route_of(runtimes), 64)  # fills the last hop
        session = await pipeline.start(route_of(runtimes), 64)
        with trio.fail_after(30), pytest.raises(PipelineFailure) as err:
            await session.step(embed(entry), 0)
        assert (err.value.culprit, err.value.code) == (last.node.peer_id, "overloaded")
        await session.close()
        await wait_for(lambda: all(list(r.server.sessions) == [holder.id] for r in runtimes),
                       5, "the refused session let go everywhere")
        await holder.step(embed(entry), 0)  # the other session goes on
        await holder.close()


async def test_an_eager_stream_half_closes_as_a_negotiated_one_does(tmp_path: Path) -> None:
    """A request/response exchange (rpc.call: write, close_write, read the reply) works
    on an eager stream: the far end reads the request to its end, then answers."""
    async with swarm(2, tmp_path, connect="star") as (a, b):
        async def reverse(stream: Any) -> None:
            data = await read_to_eof(stream)
            await stream.write(data[::-1])
            await stream.close()

        b.set_stream_handler("/peerd/test-reverse/1.0.0", reverse)
        with trio.fail_after(10):
            stream = await a.new_stream_eager(b.peer_id, "/peerd/test-reverse/1.0.0")
            await stream.write(b"hello, ")
            await stream.write(b"world")
            await stream.close_write()
            got = await read_to_eof(stream)
            await stream.close()
        assert got == b"dlrow ,olleh"


async def read_to_eof(stream: Any) -> bytes:
    """What `stream` carries until its far end closes it for writing (StreamEOF, an
    EOFError)."""
    data = b""
    with contextlib.suppress(EOFError):
        while chunk := await stream.read(1024):
            data += chunk
    return data


async def test_a_peer_of_another_version_is_named(tmp_path: Path, tiny: Path) -> None:
    """The middle hop speaks only an older version: multistream-select answers "na" to
    its upstream's eager opening, which reports code "version" naming it. An older
    peer that dials us for a retired version is answered an ERROR of code "version"."""
    async with chain(tmp_path, tiny) as runtimes:
        entry, middle, last = runtimes
        middle.node.host.remove_stream_handler(SHARD.id)  # as a peer of an older version
        session = await entry.generator.pipeline.start(route_of(runtimes), 64)
        with trio.fail_after(30), pytest.raises(PipelineFailure) as err:
            await session.step(embed(entry), 0)
        assert (err.value.culprit, err.value.code) == (middle.node.peer_id, "version")
        assert f"does not speak {SHARD.id}" in str(err.value)
        await session.close()

        for retired in (*RETIRED_IDS, *RETIRED_RETURN_IDS):
            stream = await entry.node.new_stream(last.node.peer_id, retired)
            reply = decode(await framing.read_frame(stream, SHARD.max_control_bytes),
                           ErrorReply)
            assert reply.code == "version" and "upgrade peerd" in reply.message
            await stream.close()


async def test_a_return_stream_the_entry_did_not_ask_for_ends_the_session(
        tmp_path: Path, tiny: Path) -> None:
    """A peer opens a session on the last hop naming the entry as its entry peer (to
    charge it there); the entry answers the return stream with an ERROR (no offence:
    the hop is honest), and the hop relays it as a refusal and lets the session go."""
    async with chain(tmp_path, tiny) as runtimes:
        entry, forger, last = runtimes
        hops = tuple(Hop(r.node.peer_id, a, b) for r, (a, b) in zip(runtimes, SPLITS,
                                                                     strict=True))
        stream = await forger.node.new_stream(last.node.peer_id, SHARD.id)
        await framing.write_frame(stream, encode(Open(
            session="f" * 32, model_id=last.model_id, route=hops, hop=2,
            entry_peer=entry.node.peer_id, max_length=64, dtype="float32")),
            SHARD.max_control_bytes)
        with trio.fail_after(10):
            assert decode(await framing.read_frame(stream, SHARD.max_control_bytes),
                          Opened) == Opened("f" * 32)
            refusal = decode(await framing.read_frame(stream, SHARD.max_control_bytes),
                             Failed)
        assert "refused the session: no session" in refusal.message
        await wait_for(lambda: not last.server.sessions, 5, "the session let go")
        assert last.node.peer_id not in entry.node.offences
        await stream.close()
        session = await entry.generator.pipeline.start(route_of(runtimes), 64)
        await session.step(embed(entry), 0)  # the last hop serves on
        await session.close()
