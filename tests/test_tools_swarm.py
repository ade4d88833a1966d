"""Typed tools between real in-process peers: a call on another peer comes back signed
and verified; every bad call gets its own clear answer and the peer keeps serving; a
forged or tampered result is caught by the caller; the ledger lists each peer's tools;
the API lists and calls them."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from pydantic import BaseModel

from peerd.api.app import create_app
from peerd.node import Node
from peerd.plans import builtins
from peerd.plans.caller import FORGED, MALFORMED, ToolFailure, ToolResult, call_tool
from peerd.plans.dispatch import Call
from peerd.plans.retry import RetryPolicy
from peerd.plans.schema import SchemaInvalid
from peerd.plans.service import Tools
from peerd.plans.tool import schema_tool, typed_tool
from protocols import tool as wire
from protocols.codec import encode
from protocols.framing import frame
from protocols.tool import CallResult, SignedResult, ToolReply
from tests.harness import (
    dial,
    error_code,
    events,
    gossip,
    rejections,
    rogue_host,
    swarm,
    wait_for,
)

CALC = builtins.calculator().schema
TOKEN = "t0ken"


class Nothing(BaseModel):
    pass


class Text(BaseModel):
    text: str


class Wait(BaseModel):
    i: int


async def hangs(args: Nothing) -> Text:
    await trio.sleep_forever()
    raise AssertionError


async def raises(args: Nothing) -> Text:
    raise KeyError("inside")


async def floods(args: Nothing) -> Text:
    return Text(text="x" * (wire.MAX_RESULT_BYTES + 10))


def offers_of(node: Node, peer: str) -> list[str]:
    entry = gossip(node).book.get(peer)
    return [] if entry is None else [t.name for t in entry.tools]


@contextlib.asynccontextmanager
async def two_peers(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, Tools, Tools]]:
    """A (calculator) and B (calculator and three bad tools), each seeing the other's."""
    async with swarm(2, tmp_path, connect="star") as (a, b):
        ta = Tools(a, gossip(a), builtins=[("calculator", None)])
        tb = Tools(b, gossip(b), builtins=[("calculator", 2)], extra=[
            typed_tool("hangs", "", hangs), typed_tool("raises", "", raises),
            typed_tool("floods", "", floods)])
        await a.start(ta)
        await b.start(tb)
        gossip(a).refresh()
        gossip(b).refresh()
        await wait_for(lambda: "hangs" in offers_of(a, b.peer_id)
                       and offers_of(b, a.peer_id) == ["calculator"], what="tools in ledgers")
        yield a, b, ta, tb


async def test_a_call_on_another_peer_returns_a_verified_result(tmp_path: Path) -> None:
    async with two_peers(tmp_path) as (a, b, ta, _):
        entry = gossip(a).book.get(b.peer_id)
        assert entry is not None
        assert [(t.name, t.schema, t.capacity) for t in entry.tools][:1] == [(
            "calculator", CALC, 2)]
        got = await call_tool(a, b.peer_id, "calculator", CALC, {"expression": "6 * 7"},
                              deadline_s=5.0, call_id="call-1")
        assert isinstance(got, ToolResult), got
        assert (got.peer, got.call_id, got.value) == (b.peer_id, "call-1", {"value": "42"})
        # the service's way: no hash given, the schema fetched, checked here, then sent
        via = await ta.call("calculator", {"expression": "1 + 1"}, peer=b.peer_id)
        assert isinstance(via, ToolResult) and via.value == {"value": "2"}
        assert CALC in ta._checks  # cached by hash: the next call costs no list
        served = events(b, "tool.served", tool="calculator", outcome="ok")
        assert len(served) == 2 and served[0].data["caller"] == a.peer_id
        assert events(a, "tool.called", peer_id=b.peer_id, outcome="ok")
        metrics = b.metrics.render().decode()
        assert 'peerd_tool_calls_total{outcome="ok",tool="calculator"} 2.0' in metrics
        assert 'peerd_tool_in_flight{tool="calculator"} 0.0' in metrics
        assert 'peerd_tool_capacity{tool="calculator"} 2.0' in metrics
        assert re.search(r'peerd_tool_latency_seconds_count\{tool="calculator"\} 2\.0', metrics)
        # our own tools are reachable the same way (a loopback stream)
        own = await ta.call("calculator", {"expression": "2 * 2"}, peer=a.peer_id)
        assert isinstance(own, ToolResult) and own.peer == a.peer_id


async def test_bad_calls_each_get_their_error_and_the_peer_keeps_serving(
        tmp_path: Path) -> None:
    async with two_peers(tmp_path) as (a, b, _, tb):
        schema = {n: t.schema for n, t in tb.toolbox.tools.items()}

        async def outcome(tool: str, arguments: dict[str, Any], sch: str | None = None
                          ) -> ToolFailure:
            got = await call_tool(a, b.peer_id, tool, sch or schema.get(tool, CALC),
                                  arguments, deadline_s=0.5)
            assert isinstance(got, ToolFailure) and got.by == "callee", got
            return got

        cases = [(await outcome("nope", {}), wire.UNKNOWN_TOOL, "offers: calculator"),
                 (await outcome("calculator", {"expression": 1}), wire.INVALID_ARGUMENTS,
                  "expression: Input should be a valid string"),
                 (await outcome("calculator", {"expression": "1"}, "0" * 64),
                  wire.SCHEMA_MISMATCH, "list this peer's tools again"),
                 (await outcome("hangs", {}), wire.DEADLINE, "deadline of 0.5 s"),
                 (await outcome("raises", {}), wire.TOOL_ERROR, "raises failed (KeyError)"),
                 (await outcome("floods", {}), wire.OVERSIZED_RESULT, "ask for less")]
        for got, code, words in cases:
            assert got.code == code and words in got.message, got
        # an external-style tool whose schema is not JSON Schema is refused at registration
        with pytest.raises(SchemaInvalid, match="not valid JSON Schema"):
            tb.register(schema_tool("ext", "", {"type": "object", "properties": 5},
                                    {"type": "object"}, _echo))
        assert "ext" not in tb.toolbox.tools
        # a request that is not a request: an error reply, counted, and still serving
        async with rogue_host(tmp_path) as rogue:
            await dial(rogue.host, b)
            reply = await rogue.exchange(b, wire.TOOL.id, frame(b"\x93garbage"))
            assert error_code(reply) == "malformed"
        assert rejections(b).get("malformed", 0) >= 1
        ok = await call_tool(a, b.peer_id, "calculator", CALC, {"expression": "2 + 3"},
                             deadline_s=5.0)
        assert isinstance(ok, ToolResult) and ok.value == {"value": "5"}
        metrics = b.metrics.render().decode()
        for code in (wire.INVALID_ARGUMENTS, wire.DEADLINE, wire.TOOL_ERROR):
            assert f'outcome="{code}"' in metrics
        assert 'peerd_tool_calls_total{outcome="unknown_tool",tool="(unknown)"} 1.0' in metrics


async def _echo(args: dict[str, Any]) -> dict[str, Any]:
    return args


async def test_a_forged_or_tampered_result_is_caught_by_the_caller(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as (a,), rogue_host(tmp_path) as rogue:
        await dial(rogue.host, a)
        other = create_new_key_pair()
        other_id = str(ID.from_pubkey(other.public_key))

        def result(**fields: Any) -> CallResult:
            base = {"call_id": "c-1", "caller": a.peer_id, "peer": rogue.peer_id,
                    "tool": "calculator", "schema": CALC, "outcome": "ok",
                    "result": {"value": "42"}}
            return CallResult(**{**base, **fields})

        def signed(msg: CallResult, key: Any) -> bytes:
            body = encode(msg)
            return frame(encode(ToolReply(result=SignedResult(body=body,
                                                                sig=key.sign(body)))))

        good = result()
        body = encode(good)
        tampered = body.replace(b"42", b"43")
        cases = {
            "signed with another key": (signed(good, other.private_key), FORGED),
            "signed by another peer": (signed(result(peer=other_id), other.private_key),
                                       FORGED),
            "tampered bytes": (frame(encode(ToolReply(result=SignedResult(
                body=tampered, sig=rogue.key_pair.private_key.sign(body))))), FORGED),
            "another call": (signed(result(call_id="c-2"), rogue.key_pair.private_key),
                             FORGED),
            "another caller": (signed(result(caller=other_id), rogue.key_pair.private_key),
                               FORGED),
            "garbage": (frame(b"\x81\xa1t\xa3bad"), MALFORMED),
            "no result": (frame(encode(ToolReply())), MALFORMED),
        }
        for what, (reply, code) in cases.items():
            rogue.answer(wire.TOOL.id, reply)
            got = await call_tool(a, rogue.peer_id, "calculator", CALC,
                                  {"expression": "6 * 7"}, deadline_s=2.0, call_id="c-1")
            assert isinstance(got, ToolFailure), what
            assert (got.code, got.by) == (code, "caller"), (what, got)
        # the honest reply passes, so each refusal above was for what it names
        rogue.answer(wire.TOOL.id, signed(good, rogue.key_pair.private_key))
        ok = await call_tool(a, rogue.peer_id, "calculator", CALC, {"expression": "6 * 7"},
                             deadline_s=2.0, call_id="c-1")
        assert isinstance(ok, ToolResult) and ok.value == {"value": "42"}
        assert sum(a.offences[rogue.peer_id].values()) >= len(cases)


async def test_the_api_lists_the_swarms_tools_and_calls_them(tmp_path: Path) -> None:
    async with two_peers(tmp_path) as (a, b, _, _):
        transport = httpx.ASGITransport(app=create_app(a, TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://peerd",
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=30.0) as client:
            rows = (await client.get("/v1/tools")).json()
            assert {(r["peer_id"], r["tool"]) for r in rows} == {
                (a.peer_id, "calculator"), (b.peer_id, "calculator"), (b.peer_id, "hangs"),
                (b.peer_id, "raises"), (b.peer_id, "floods")}
            assert all(set(r) == {"peer_id", "peer_name", "tool", "schema", "capacity",
                                  "self"} for r in rows)
            full = (await client.get("/v1/tools", params={"peer": b.name})).json()
            assert full["peer_id"] == b.peer_id
            calc = next(t for t in full["tools"] if t["name"] == "calculator")
            assert calc["inputSchema"]["properties"]["expression"]["type"] == "string"
            assert calc["schema"] == CALC and calc["capacity"] == 2
            r = await client.post("/v1/tools/call", json={
                "tool": "calculator", "arguments": {"expression": "7 * 6"}})
            assert r.status_code == 200 and r.json()["ok"] is True
            assert r.json()["peer"] == a.peer_id  # our own: no hop at all
            r = await client.post("/v1/tools/call", json={
                "tool": "calculator", "arguments": {"expression": "7 * 6"}, "peer": b.name})
            assert r.json()["peer"] == b.peer_id and r.json()["result"] == {"value": "42"}
            bad = (await client.post("/v1/tools/call", json={
                "tool": "calculator", "arguments": {"expression": 7}})).json()
            assert bad["ok"] is False and bad["error"]["code"] == "invalid_arguments"
            assert bad["error"]["by"] == "caller"  # checked here, never sent
            for body, status, words in [
                    ({"tool": "shell"}, 404, "no live peer offers"),
                    ({"tool": "calculator", "peer": "nobody"}, 404, "no live peer 'nobody'"),
                    ({"tool": "hangs", "peer": a.name}, 404, "offers no tool"),
                    ({"tool": "calculator", "arguments": []}, 400, "'arguments'"),
                    ({"tool": "calculator", "deadline_s": 0}, 400, "'deadline_s'"),
                    ({"tool": "calculator", "extra": 1}, 400, "unknown parameter")]:
                r = await client.post("/v1/tools/call", json=body)
                assert r.status_code == status and words in r.json()["error"]["message"], \
                    (body, r.text)
            missing = await client.get("/v1/tools", params={"peer": "nobody"})
            assert missing.status_code == 404


async def test_the_best_peer_is_chosen_and_a_busy_one_passed_over(tmp_path: Path) -> None:
    """A's own slot taken by B's call: A's call goes to A (nearest, and A knows of no
    load), is refused busy at once, and runs on B instead; with A's own call holding
    A's slot, the next goes straight to B."""
    opened = trio.Event()

    async def gate(args: Nothing) -> Text:
        await opened.wait()
        return Text(text="through")

    async with swarm(2, tmp_path, connect="star") as (a, b):
        ta = Tools(a, gossip(a), extra=[typed_tool("gate", "", gate, capacity=1)])
        tb = Tools(b, gossip(b), extra=[typed_tool("gate", "", gate, capacity=1)])
        await a.start(ta)
        await b.start(tb)
        gossip(a).refresh()
        gossip(b).refresh()
        await wait_for(lambda: offers_of(a, b.peer_id) == ["gate"]
                       and offers_of(b, a.peer_id) == ["gate"], what="tools in ledgers")
        got: dict[str, Any] = {}

        async def run(key: str, tools: Tools, peer: str | None = None) -> None:
            got[key] = await tools.call("gate", {}, peer=peer, deadline_s=5.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "b-on-a", tb, a.peer_id)
            await wait_for(lambda: ta.toolbox.capacity["gate"].in_flight == 1)
            nursery.start_soon(run, "a-retried", ta)
            await wait_for(lambda: tb.toolbox.capacity["gate"].in_flight == 1)
            opened.set()
        assert got["b-on-a"].peer == a.peer_id and got["b-on-a"].ok
        assert got["a-retried"].ok and got["a-retried"].peer == b.peer_id
        assert events(a, "tool.called", peer_id=a.peer_id, outcome=wire.BUSY)
        opened = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "a-own", ta, a.peer_id)
            await wait_for(lambda: ta.load[(a.peer_id, "gate")] == 1)
            nursery.start_soon(run, "a-next", ta)
            await wait_for(lambda: tb.toolbox.capacity["gate"].in_flight == 1)
            opened.set()
        assert got["a-own"].peer == a.peer_id and got["a-next"].peer == b.peer_id
        assert ta.toolbox.capacity["gate"].peak == 1 and tb.toolbox.capacity["gate"].peak == 1


async def test_a_batch_is_dispatched_over_the_api(tmp_path: Path) -> None:
    async with two_peers(tmp_path) as (a, b, ta, _):
        transport = httpx.ASGITransport(app=create_app(a, TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://peerd",
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=30.0) as client:
            calls = [{"tool": "calculator", "arguments": {"expression": f"{i} * 2"}}
                     for i in range(6)] + [{"tool": "raises", "arguments": {}}]
            got = (await client.post("/v1/tools/dispatch", json={"calls": calls})).json()
            results = got["results"]
            assert [r["result"]["value"] for r in results[:6]] == [str(2 * i) for i in range(6)]
            assert {r["peer"] for r in results[:6]} <= {a.peer_id, b.peer_id}
            assert results[6]["error"]["code"] == wire.TOOL_ERROR
            assert len(results[6]["attempts"]) == 1  # the tool's own error: not retried
            bad = await client.post("/v1/tools/dispatch", json={"calls": []})
            assert bad.status_code == 400
        assert ta.slots.peak[(b.peer_id, "calculator")] <= 2  # B declares 2
        scraped = a.metrics.render().decode()
        assert 'peerd_tool_dispatch_attempts_total{outcome="ok",tool="calculator"} 6.0' \
            in scraped
        # each attempt's queue time and duration, by tool
        assert 'peerd_tool_dispatch_queue_seconds_count{tool="calculator"} 6.0' in scraped
        assert 'peerd_tool_dispatch_attempt_seconds_count{tool="raises"} 1.0' in scraped


async def test_a_peer_stopped_mid_batch_is_routed_around(tmp_path: Path) -> None:
    """Three peers offer a slow tool; the third stops while holding calls; every call
    of the batch completes on the other two."""
    started = trio.Event()

    async def slow(args: Wait) -> Text:
        started.set()
        await trio.sleep(0.3)
        return Text(text=str(args.i))

    stop = trio.Event()
    stopped = trio.Event()
    async with swarm(2, tmp_path, connect="star") as (a, b):
        ta = Tools(a, gossip(a), extra=[typed_tool("slow", "", slow, capacity=2)])
        tb = Tools(b, gossip(b), extra=[typed_tool("slow", "", slow, capacity=2)])
        await a.start(ta)
        await b.start(tb)
        victim: list[Node] = []

        async def third(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            from tests.harness import connect_nodes, open_test_node
            async with open_test_node(tmp_path / "n2", heartbeat_s=1.0) as c:
                await connect_nodes(c, a)
                await c.start(Tools(c, gossip(c), extra=[typed_tool("slow", "", slow,
                                                                   capacity=2)]))
                gossip(c).refresh()
                victim.append(c)
                task_status.started()
                await stop.wait()
            stopped.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(third)
            gossip(a).refresh()
            gossip(b).refresh()
            c = victim[0]
            await wait_for(lambda: all(offers_of(a, p.peer_id) == ["slow"]
                                       for p in (a, b, c)), what="tools in ledgers")
            got: list[Any] = []

            async def batch() -> None:
                got.extend(await ta.dispatch([Call("slow", {"i": i}) for i in range(12)],
                                             RetryPolicy(attempt_deadline_s=2.0)))

            nursery.start_soon(batch)
            await wait_for(lambda: ta.slots.held(c.peer_id, "slow") > 0, what="calls on C")
            stop.set()
            await stopped.wait()
        assert [r.outcome.value["text"] for r in got] == [str(i) for i in range(12)]
        assert all(r.ok and r.peer != c.peer_id for r in got)
        assert any(len(r.attempts) > 1 for r in got)  # those C held went elsewhere
        assert max(ta.slots.peak.values()) <= 2
