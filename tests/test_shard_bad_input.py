"""Bad input on /peerd/shard/3.0.0 and /peerd/shard-progress/1.0.0, over real
in-process hosts: each is refused with a clear error and counted, and the shard keeps
serving its other sessions. Also: a full shard refuses OPEN and the router goes to a
replica."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from peerd.inference.model.tensors import to_wire
from peerd.inference.options import SamplingParams
from peerd.inference.runtime import ModelRuntime
from peerd.inference.slot import ModelOptions, ShardLimits
from peerd.inference.swarm.pipeline import PipelineSession
from peerd.inference.swarm.routing import Route, Span
from peerd.rpc import call
from protocols.codec import decode, encode
from protocols.errors import RemoteError
from protocols.framing import encode_uvarint, read_frame, write_frame
from protocols.shard import SHARD, Forward, Hop, HopTiming, Open, Opened
from protocols.shard_progress import SHARD_PROGRESS, Progress
from protocols.spec import ErrorReply
from tests.harness import book, gossip, serve_model, swarm, wait_for
from tests.models import tiny_llama_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@contextlib.asynccontextmanager
async def shard_and_entry(tmp_path: Path, tiny: Path, limits: ShardLimits | None = None
                          ) -> AsyncIterator[tuple[ModelRuntime, ModelRuntime]]:
    """`shard` serves the whole tiny model; `entry` serves it too but routes via `shard`."""
    async with swarm(2, tmp_path, connect="star", heartbeat_s=2.0) as (shard_node, entry_node):
        shard = await serve_model(shard_node, ModelOptions(str(tiny), layers=(0, 4),
                                                           limits=limits or ShardLimits()))
        entry = await serve_model(entry_node, ModelOptions(str(tiny), layers=(0, 4)))
        await wait_for(lambda: all(len([e for e in book(n).entries() if e.models]) == 2
                                   for n in (shard_node, entry_node)), 15, "both shards listed")
        yield shard, entry


def via(rt: ModelRuntime) -> Route:
    return Route((Span(rt.node.peer_id, 0, 4, 0.0),), 0.0)


async def good_step(session: PipelineSession, entry: ModelRuntime, pos: int = 0) -> None:
    with torch.inference_mode():
        hidden = entry.head.embed(torch.tensor([[5, 6, 7]]))
    result = await session.step(hidden, pos)
    assert result.hidden.shape == (1, 3, entry.head.hidden_size)


async def refused(session: PipelineSession, msg: Forward | bytes) -> ErrorReply:
    """Send something bad on the session's upstream stream; the shard's reply."""
    if isinstance(msg, bytes):
        await session.first.write(msg)
    else:
        await write_frame(session.first, encode(msg), SHARD.max_data_bytes)
    reply = decode(await read_frame(session.first, SHARD.max_control_bytes), ErrorReply)
    session.done.set()
    return reply


def hidden_of(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> object:
    return to_wire(torch.zeros(shape, dtype=dtype))


BAD_FORWARDS = {
    "unknown session": (lambda s, h: Forward("not-this-session", 1, 0, -1, hidden_of((1, 3, h))),
                        "unknown session"),
    "wrong shape": (lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((1, 3, h + 1))), "shape"),
    "two rows in a session of one": (lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((2, 3, h))),
                                     "expected [1, T>=1"),
    "a source row outside the FORWARD": (
        lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((1, 3, h)), source=(1,)), "outside"),
    "a source for more rows than the session's": (
        lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((1, 3, h)), source=(0, 0)),
        "gives each of them a row"),
    "wrong dtype": (lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((1, 3, h), torch.float16)),
                    "float16"),
    "start_pos beyond the cache": (lambda s, h: Forward(s.id, 1, 7, -1, hidden_of((1, 3, h))),
                                   "contiguous"),
    "keep beyond the cache": (lambda s, h: Forward(s.id, 1, 0, 5, hidden_of((1, 3, h))),
                              "keep=5"),
    "tree parent after its child": (
        lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((1, 3, h)), tree=(-1, 2, 0)), "parent"),
    "tree of the wrong length": (
        lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((1, 3, h)), tree=(-1, 0)), "tree of 2"),
    "past max_length": (lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((1, 70, h))),
                        "max_length"),
    "hidden states that are not finite": (
        lambda s, h: Forward(s.id, 1, 0, -1, to_wire(torch.full((1, 3, h), math.nan))),
        "not finite"),
    "timings from hops before the first": (
        lambda s, h: Forward(s.id, 1, 0, -1, hidden_of((1, 3, h)),
                             timings=(HopTiming(s.route[0].peer_id, 1.0),)), "timings"),
    "bytes that lie about their shape": (
        lambda s, h: Forward(s.id, 1, 0, -1, to_wire(torch.zeros(1, 3, h)).__class__(
            "float32", (1, 3, h), b"\0" * 12)), "bytes"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARDS))
async def test_bad_forward_is_refused_and_others_keep_working(tmp_path: Path, tiny: Path,
                                                              case: str) -> None:
    async with shard_and_entry(tmp_path, tiny) as (shard, entry):
        pipeline = entry.generator.pipeline
        bystander = await pipeline.open(via(shard), 64)
        await good_step(bystander, entry)
        victim = await pipeline.open(via(shard), 64)
        make, words = BAD_FORWARDS[case]
        reply = await refused(victim, make(victim, entry.head.hidden_size))
        assert reply.code == "malformed" and words in reply.message, reply
        assert shard.node.offences[entry.node.peer_id]["malformed"] >= 1
        await wait_for(lambda: victim.id not in shard.server.sessions, 5, "the session freed")
        await good_step(bystander, entry, pos=3)  # the other session goes on
        fresh = await pipeline.open(via(shard), 64)
        await good_step(fresh, entry)
        for s in (bystander, fresh, victim):
            await s.close()


async def test_oversized_frame_is_refused_before_it_is_read(tmp_path: Path, tiny: Path) -> None:
    async with shard_and_entry(tmp_path, tiny) as (shard, entry):
        session = await entry.generator.pipeline.open(via(shard), 64)
        reply = await refused(session, encode_uvarint(SHARD.max_data_bytes + 1))
        assert reply.code == "oversized"
        assert shard.node.offences[entry.node.peer_id]["oversized"] == 1
        fresh = await entry.generator.pipeline.open(via(shard), 64)
        await good_step(fresh, entry)
        await fresh.close()


async def test_a_frame_of_empty_maps_is_refused_before_they_are_built(tmp_path: Path,
                                                                     tiny: Path) -> None:
    """A 4 MiB frame of nothing but 1-byte maps: decoded whole it would be 4 million
    Python dicts (about 300 MB) before any field was checked."""
    n = 4 * 2**20
    flood = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    async with shard_and_entry(tmp_path, tiny) as (shard, entry):
        session = await entry.generator.pipeline.open(via(shard), 64)
        reply = await refused(session, encode_uvarint(len(flood)) + flood)
        assert reply.code == "malformed" and "maps and arrays" in reply.message, reply
        assert shard.node.offences[entry.node.peer_id]["malformed"] == 1
        fresh = await entry.generator.pipeline.open(via(shard), 64)
        await good_step(fresh, entry)
        await fresh.close()


@pytest.mark.parametrize(("route", "words"), [
    ((Hop("SELF", 0, 2), Hop("SELF", 3, 4)), "skips or repeats layers"),
    ((Hop("SELF", 0, 2),), "ends at layer 2"),
    ((Hop("SELF", 0, 4), Hop("SELF", 2, 4)), "skips or repeats layers"),
])
async def test_open_with_a_bad_route_is_refused(tmp_path: Path, tiny: Path,
                                                route: tuple[Hop, ...], words: str) -> None:
    async with shard_and_entry(tmp_path, tiny) as (shard, entry):
        hops = tuple(Hop(shard.node.peer_id, h.start, h.end) for h in route)
        stream = await entry.node.new_stream(shard.node.peer_id, SHARD.id)
        await write_frame(stream, encode(Open(session="s" * 16, model_id=shard.model_id,
                                              route=hops, hop=0, entry_peer=entry.node.peer_id,
                                              max_length=64, dtype="float32")),
                          SHARD.max_control_bytes)
        reply = decode(await read_frame(stream, SHARD.max_control_bytes), ErrorReply)
        assert reply.code == "malformed" and words in reply.message
        assert not shard.server.sessions
        fresh = await entry.generator.pipeline.open(via(shard), 64)
        await good_step(fresh, entry)
        await fresh.close()


@pytest.mark.parametrize("rows", [0, 65, -1])
async def test_open_with_rows_out_of_range_is_refused(tmp_path: Path, tiny: Path,
                                                      rows: int) -> None:
    async with shard_and_entry(tmp_path, tiny) as (shard, entry):
        hops = (Hop(shard.node.peer_id, 0, 4),)
        stream = await entry.node.new_stream(shard.node.peer_id, SHARD.id)
        await write_frame(stream, encode(Open(session="r" * 16, model_id=shard.model_id,
                                              route=hops, hop=0, entry_peer=entry.node.peer_id,
                                              max_length=64, dtype="float32", rows=rows)),
                          SHARD.max_control_bytes)
        reply = decode(await read_frame(stream, SHARD.max_control_bytes), ErrorReply)
        assert reply.code == "malformed" and f"rows {rows} outside" in reply.message
        assert not shard.server.sessions
        fresh = await entry.generator.pipeline.open(via(shard), 64)
        await good_step(fresh, entry)
        await fresh.close()


async def test_a_tree_in_a_session_of_several_rows_is_refused(tmp_path: Path,
                                                              tiny: Path) -> None:
    async with shard_and_entry(tmp_path, tiny) as (shard, entry):
        session = await entry.generator.pipeline.open(via(shard), 64, rows=2)
        h = entry.head.hidden_size
        reply = await refused(session, Forward(session.id, 1, 0, -1, hidden_of((2, 3, h)),
                                               tree=(-1, 0, 0)))
        assert reply.code == "malformed" and "a tree is one row's" in reply.message
        fresh = await entry.generator.pipeline.open(via(shard), 64)
        await good_step(fresh, entry)
        await fresh.close()


async def test_a_full_shard_refuses_open_and_the_router_goes_elsewhere(tmp_path: Path,
                                                                       tiny: Path) -> None:
    async with shard_and_entry(tmp_path, tiny, ShardLimits(max_sessions=1)) as (shard, entry):
        holder = await entry.generator.pipeline.open(via(shard), 64)  # fills the shard
        entry.node.rtt_ms[shard.node.peer_id] = 0.0  # make the full shard the cheapest...
        entry.generator.bans.forgive(shard.node.peer_id)

        def cheapest_is_full() -> bool:
            route = entry.generator.route()
            return isinstance(route, Route) and route.spans[0].peer_id == shard.node.peer_id

        # ...by making the entry's own copy look slow: tokens/s is what the route weighs
        entry.served = dataclasses.replace(entry.served, tokens_per_s=0.001)
        gossip(entry.node).refresh()
        assert cheapest_is_full()
        tokens: list[int] = []

        async def collect(t: int) -> bool:
            tokens.append(t)
            return True

        request = await entry.generator.prepare([5, 6, 7], SamplingParams(max_tokens=4))
        stats = await entry.generator.generate(request, collect)
        assert len(tokens) == 4
        assert stats.route[0]["peer_id"] == entry.node.peer_id  # went elsewhere
        failure = [e for e in entry.node.events.recent() if e.type == "inference.failure"]
        assert failure and failure[0].data["code"] == "overloaded"
        await holder.close()


async def test_the_progress_probe_answers_only_the_entry_and_refuses_garbage(
        tmp_path: Path, tiny: Path) -> None:
    """`/peerd/shard-progress`: the entry hears how far its session got; any other peer
    hears "never had it" (a session id tells a guesser nothing); a request that is not
    one is refused, counted, and the shard goes on serving."""
    async with shard_and_entry(tmp_path, tiny) as (shard, entry):
        session = await entry.generator.pipeline.open(via(shard), 64)
        await good_step(session, entry)
        asker, other = entry.node, shard.node
        said = await call(asker.host, other.peer_id, SHARD_PROGRESS, Progress(session.id),
                          dial=asker.new_stream)
        assert (said.received, said.passed, said.passing, said.failed) == (1, 1, False, None)
        stranger = await call(other.host, other.peer_id, SHARD_PROGRESS, Progress(session.id),
                              dial=other.new_stream)
        assert (stranger.received, stranger.passed) == (-1, -1)
        with pytest.raises(RemoteError, match="wrong_type"):
            await call(asker.host, other.peer_id, dataclasses.replace(
                SHARD_PROGRESS, request=Opened), Opened(session.id), dial=asker.new_stream)
        assert other.offences[asker.peer_id]["wrong_type"] == 1
        await good_step(session, entry, pos=3)
        await session.close()
