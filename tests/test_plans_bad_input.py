"""Bad input to the tools and plans API, from a peer or from a user, between real
in-process peers. A peer's schema or result that is not plain JSON (NaN, bytes, a key
that is not a string: msgpack carries them all) is malformed: counted against it, its
tools left out, every route still answering. A user's huge number, or arguments over
the cap or holding NaN, get a 400 naming them; a plan past the running cap a 429 (a
tool error over /mcp); a HEAD on an event stream its headers at once; a bug of ours a
JSON 500."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from trio_typing import TaskStatus

from peerd.agents.sealing import seal
from peerd.api.app import create_app
from peerd.daemon import plan_over_mcp
from peerd.node import Node
from peerd.plans.caller import MALFORMED, ToolResult
from peerd.plans.dispatch import Call
from peerd.plans.mcp_endpoint import McpEndpoint
from peerd.plans.planner import Transcript
from peerd.plans.planning import MAX_RUNNING, Plans
from peerd.plans.service import Tools
from peerd.plans.thinker import ScriptedThinker, StepText, Thinker
from peerd.plans.tool import schema_tool, typed_tool
from peerd.service import Service
from protocols import tool as wire
from protocols.codec import decode
from protocols.tool import CallResult, SignedResult, ToolReply, ToolRequest
from tests.harness import gossip, swarm, wait_for
from tests.test_mcp import api as mcp_api
from tests.test_mcp import mcp_client

TOKEN = "t0ken"
HUGE = 10**400  # json.loads reads it; math.isfinite overflows on it
# what a peer may put where JSON is due: each breaks json.dumps one way
NOT_JSON: list[Any] = [float("nan"), b"\x00raw", {1: "one", "b": 2}]


class Nothing(BaseModel):
    pass


class Text(BaseModel):
    text: str


async def odd(args: Nothing) -> Text:
    return Text(text="fine")


async def echo(args: dict[str, Any]) -> dict[str, Any]:
    return args


@dataclass
class Lies:
    """What B's tool server says of its tool `odd` (None: the truth): `schema` put in
    its inputSchema in tools/list, `result` as its text in a signed answer."""

    schema: Any = None
    result: Any = None


class LyingTools(Tools):
    """A real tool server whose answers about `odd` are doctored, then signed."""

    lies = Lies()

    async def _serve(self, caller: str, request: ToolRequest) -> ToolReply:
        reply = await super()._serve(caller, request)
        if request.call is None and self.lies.schema is not None:
            return ToolReply(tools=tuple(
                replace(s, input_schema={**s.input_schema, "default": self.lies.schema})
                if s.name == "odd" else s for s in reply.tools))
        if reply.result is not None and self.lies.result is not None:
            told = decode(reply.result.body, CallResult)
            body, sig = seal(replace(told, result={"text": self.lies.result}),
                             self.node.key_pair.private_key)
            return ToolReply(result=SignedResult(body=body, sig=sig))
        return reply


class Gate:
    """A thinker whose every step waits for `opened`, then answers."""

    def __init__(self) -> None:
        self.opened = trio.Event()
        self.waiting = 0

    async def think(self, transcript: Transcript) -> StepText:
        self.waiting += 1
        await self.opened.wait()
        return StepText(json.dumps({"thought": "let through", "answer": "done"}), 5)


def offers_of(node: Node, peer: str) -> list[str]:
    entry = gossip(node).book.get(peer)
    return [] if entry is None else [t.name for t in entry.tools]


@contextlib.asynccontextmanager
async def peers(tmp_path: Path, thinker: Thinker | None = None,
                max_running: int = MAX_RUNNING, extra: Sequence[Service] = ()
                ) -> AsyncIterator[tuple[Node, Node, LyingTools, Plans, httpx.AsyncClient]]:
    """A (calculator, echo; plans, `extra`) and B (calculator, odd), B's tool server
    telling the lies its LyingTools.lies are set to."""
    async with swarm(2, tmp_path, connect="star") as (a, b):
        ta = Tools(a, gossip(a), builtins=[("calculator", None)], extra=[schema_tool(
            "echo", "", {"type": "object"}, {"type": "object"}, echo)])
        tb = LyingTools(b, gossip(b), builtins=[("calculator", None)],
                        extra=[typed_tool("odd", "", odd)])
        tb.lies = Lies()
        plans = Plans(a, ta, tmp_path / "n0", thinker=lambda: thinker or ScriptedThinker([]),
                      max_running=max_running)
        await a.start(ta, plans, *extra)
        await b.start(tb)
        gossip(a).refresh()
        gossip(b).refresh()
        await wait_for(lambda: "odd" in offers_of(a, b.peer_id)
                       and "echo" in offers_of(a, a.peer_id), what="tools in ledgers")
        transport = httpx.ASGITransport(app=create_app(a, TOKEN), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://peerd",
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=30.0) as client:
            yield a, b, tb, plans, client


async def test_a_peers_schema_that_is_not_json_leaves_its_tools_out(tmp_path: Path) -> None:
    async with peers(tmp_path) as (a, b, tb, plans, client):
        for lie in NOT_JSON:
            tb.lies.schema = lie
            listed = await client.get("/v1/tools", params={"peer": b.name})
            assert listed.status_code == 502, (lie, listed.text)
            assert listed.json()["error"]["code"] == MALFORMED
            assert "not plain JSON" in listed.json()["error"]["message"]
            called = await client.post("/v1/tools/call", json={"tool": "odd"})
            assert called.status_code == 200, (lie, called.text)
            assert called.json()["error"]["code"] == MALFORMED
            batch = await client.post("/v1/tools/dispatch", json={"calls": [
                {"tool": "odd"}, {"tool": "calculator", "arguments": {"expression": "6 * 7"}}]})
            assert batch.status_code == 200, (lie, batch.text)
            odd_end, calc_end = batch.json()["results"]
            assert odd_end["error"]["code"] == MALFORMED
            assert calc_end["result"] == {"value": "42"}
            # what /mcp's tools/list and the planner see: the rest of the swarm's tools
            assert set(await plans.tools.specs()) == {"calculator", "echo"}
            planned = await client.post("/v1/plans", json={"goal": "anything"})
            assert planned.status_code == 200, (lie, planned.text)
            shown = plans.live[planned.json()["id"]].planner.tools
            assert sorted(t.name for t in shown) == ["calculator", "echo"]
            asked = await client.post("/v1/plans", json={"goal": "x", "tools": ["odd"]})
            assert asked.status_code == 400 and "'odd'" in asked.json()["error"]["message"]
        assert a.offences[b.peer_id]["malformed"] >= len(NOT_JSON)
        # the truth is taken: each refusal above was for its lie
        tb.lies.schema = None
        listed = await client.get("/v1/tools", params={"peer": b.name})
        assert listed.status_code == 200 and "odd" in {t["name"] for t in
                                                       listed.json()["tools"]}
        assert set(await plans.tools.specs()) == {"calculator", "echo", "odd"}


async def test_a_peers_result_that_is_not_json_is_malformed(tmp_path: Path) -> None:
    async with peers(tmp_path) as (a, b, tb, _, client):
        for lie in NOT_JSON:
            tb.lies.result = lie
            called = await client.post("/v1/tools/call", json={"tool": "odd", "peer": b.name})
            assert called.status_code == 200, (lie, called.text)
            error = called.json()["error"]
            assert (error["code"], error["by"]) == (MALFORMED, "caller"), error
            assert "not plain JSON" in error["message"]
            batch = await client.post("/v1/tools/dispatch", json={"calls": [{"tool": "odd"}]})
            assert batch.status_code == 200, (lie, batch.text)
            assert batch.json()["results"][0]["error"]["code"] == MALFORMED
        assert a.offences[b.peer_id]["tool_malformed"] >= 2 * len(NOT_JSON)
        tb.lies.result = None
        called = await client.post("/v1/tools/call", json={"tool": "odd", "peer": b.name})
        assert called.json()["result"] == {"text": "fine"}, called.text


async def test_huge_numbers_are_400_not_500(tmp_path: Path) -> None:
    async with peers(tmp_path) as (_, _, _, _, client):
        for name in ("steps", "tokens", "wall_s", "calls"):
            for value in (HUGE, -HUGE):
                got = await client.post("/v1/plans", json={"goal": "x",
                                                           "budget": {name: value}})
                assert got.status_code == 400, (name, got.text)
                assert got.json()["error"]["param"] == f"budget.{name}"
        for value in (HUGE, -HUGE):
            got = await client.post("/v1/tools/call", json={"tool": "calculator",
                                                            "deadline_s": value})
            assert got.status_code == 400 and got.json()["error"]["param"] == "deadline_s"
            got = await client.post("/v1/tools/dispatch", json={
                "calls": [{"tool": "calculator"}], "deadline_s": value})
            assert got.status_code == 400 and got.json()["error"]["param"] == "deadline_s"


async def test_a_batchs_bad_arguments_are_400_naming_the_call(tmp_path: Path) -> None:
    async with peers(tmp_path) as (_, _, _, plans, client):
        fine = {"tool": "echo", "arguments": {"x": 1}}
        over = {"tool": "echo", "arguments": {"pad": "x" * wire.MAX_ARGUMENTS_BYTES}}
        got = await client.post("/v1/tools/dispatch", json={"calls": [fine, over]})
        assert got.status_code == 400, got.text
        error = got.json()["error"]
        assert error["param"] == "calls[1].arguments" and "bytes of JSON" in error["message"]
        for literal in ("NaN", "Infinity", "-Infinity"):
            raw = f'{{"calls": [{json.dumps(fine)}, {{"tool": "echo", "arguments": ' \
                f'{{"x": [{literal}]}}}}]}}'
            got = await client.post("/v1/tools/dispatch", content=raw)
            assert got.status_code == 400, (literal, got.text)
            assert got.json()["error"]["param"] == "calls[1].arguments"
            got = await client.post("/v1/tools/call", content=f'{{"tool": "echo", '
                                    f'"arguments": {{"x": {literal}}}}}')
            assert got.status_code == 400 and got.json()["error"]["param"] == "arguments"
        # past the API (a planner's step, /mcp): the call's failure, not the batch's
        (nan, ok) = await plans.tools.dispatch([Call("echo", {"x": float("nan")}),
                                                Call("echo", {"x": 2})])
        assert nan.code == wire.INVALID_ARGUMENTS and "not plain JSON" in nan.message
        assert isinstance(ok.outcome, ToolResult) and ok.outcome.value == {"x": 2}
        got = await client.post("/v1/tools/dispatch", json={"calls": [fine]})
        assert got.json()["results"][0]["result"] == {"x": 1}, got.text
        assert (await client.get("/health")).status_code == 200


async def test_plans_past_the_cap_get_429_and_mcp_a_tool_error(tmp_path: Path) -> None:
    gate = Gate()
    async with peers(tmp_path, thinker=gate, max_running=2) as (a, _, _, plans, client):
        endpoint = McpEndpoint(plans.tools)
        endpoint.plan = plan_over_mcp(plans)  # as the daemon wires it
        await a.start(endpoint)
        ids = []
        for _ in range(2):
            got = await client.post("/v1/plans", json={"goal": "wait"})
            assert got.status_code == 200, got.text
            ids.append(got.json()["id"])
        await wait_for(lambda: gate.waiting == 2, what="two plans thinking")
        refused = await client.post("/v1/plans", json={"goal": "one more"})
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "5"
        error = refused.json()["error"]
        assert error["code"] == "too_many_plans" and "2 plans at once" in error["message"]
        async with mcp_api(a) as url, mcp_client(url) as session:
            planned = await session.call_tool("plan", {"goal": "one more"})
        assert planned.is_error and "2 plans at once" in str(planned.content[0]), planned
        assert len(plans.live) == 2 and plans.running() == 2
        gate.opened.set()
        await wait_for(lambda: plans.running() == 0, what="the plans to end")
        got = await client.post("/v1/plans", json={"goal": "now there is room"})
        assert got.status_code == 200, got.text


class Boom(Service):
    """A service with a bug: its route raises."""

    name = "boom"

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()

    def routes(self) -> Sequence[BaseRoute]:
        async def boom(request: Request) -> Response:
            raise RuntimeError("a bug of ours")

        return [Route("/boom", boom)]


async def test_head_on_event_streams_and_our_bugs_get_json(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate()
    async with peers(tmp_path, thinker=gate, extra=[Boom()]) as (_, _, _, _, client):
        plan_id = (await client.post("/v1/plans", json={"goal": "wait"})).json()["id"]
        await wait_for(lambda: gate.waiting == 1, what="the plan thinking")
        with trio.fail_after(5):  # the streams would run until the plan or client ends
            for path in ("/events", f"/v1/plans/{plan_id}/events"):
                head = await client.head(path)
                assert head.status_code == 200, path
                assert head.headers["content-type"].startswith("text/event-stream")
                assert head.content == b""
            assert (await client.head("/v1/plans/nope/events")).status_code == 404
        gate.opened.set()
        streamed = (await client.get(f"/v1/plans/{plan_id}/events")).text
        assert "event: plan.answer" in streamed  # a GET still streams, to the end

        caplog.set_level(logging.ERROR, logger="peerd.api.app")
        crashed = await client.get("/boom")
        assert crashed.status_code == 500
        error = crashed.json()["error"]
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
        assert any("GET /boom" in r.getMessage() and "a bug of ours" in r.getMessage()
                   for r in caplog.records)
        assert (await client.get("/health")).status_code == 200
