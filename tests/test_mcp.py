"""MCP both ways between real in-process peers: an external MCP server (the SDK's
`MCPServer`, tests/mcp_servers/) started by one peer has its tools in another peer's
ledger and runs that peer's calls; a broken schema, wrong types, a crash, a server that
exits at once and one that never answers are each handled and the peer keeps serving;
`/mcp` serves the swarm's tools to the SDK's own streamable HTTP client under trio."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
import trio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from peerd.api.app import create_app
from peerd.api.server import bind, serve
from peerd.config import ConfigError, load_config
from peerd.daemon import plan_over_mcp
from peerd.node import Node
from peerd.plans import mcp_tools
from peerd.plans.caller import ToolFailure, ToolResult
from peerd.plans.external import McpSettings, StderrLines
from peerd.plans.mcp_endpoint import McpEndpoint
from peerd.plans.planner import Budget
from peerd.plans.planning import MAX_GOAL_CHARS, Plans
from peerd.plans.service import Tools
from peerd.plans.thinker import ScriptedThinker
from peerd.plans.tool import ToolError
from protocols import tool as wire
from tests.harness import events, gossip, swarm, wait_for

SERVERS = Path(__file__).parent / "mcp_servers"
TOKEN = "t0ken"
FAST = McpSettings(ready_s=10.0, backoff_s=0.05, max_restarts=2, deadline_s=10.0)
ARITH_TOOLS = {"add", "slow", "boom", "echo", "arith.calculator"}


def command(script: str, *args: str) -> str:
    return " ".join([sys.executable, str(SERVERS / script), *args])


def offers_of(node: Node, peer: str) -> set[str]:
    entry = gossip(node).book.get(peer)
    return set() if entry is None else {t.name for t in entry.tools}


def metric(node: Node, line: str) -> bool:
    return line in node.metrics.render().decode()


@contextlib.asynccontextmanager
async def with_arith(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, Tools, Tools]]:
    """A (calculator) and B (calculator and the arith MCP server's tools)."""
    async with swarm(2, tmp_path, connect="star") as (a, b):
        ta = Tools(a, gossip(a), builtins=[("calculator", None)])
        tb = Tools(b, gossip(b), builtins=[("calculator", None)],
                   mcp=[command("arith.py", "--calculator")], mcp_settings=FAST)
        await a.start(ta)
        await b.start(tb)
        gossip(a).refresh()
        await wait_for(lambda: offers_of(a, b.peer_id) >= ARITH_TOOLS, 20.0,
                       what="the external tools in A's ledger")
        yield a, b, ta, tb


async def test_external_tools_run_for_another_peer_and_survive_a_crash(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with with_arith(tmp_path) as (a, b, ta, tb):
        # the broken schema is refused alone, counted, with its reason in the log
        assert "broken" not in offers_of(a, b.peer_id)
        assert metric(b, 'peerd_mcp_tools_refused_total{server="mcp0"} 1.0')
        assert any("'broken' not offered" in r.message and "not valid JSON Schema" in
                   r.message for r in caplog.records)
        # the built-in keeps its name; the server's calculator is prefixed by its name
        assert tb.toolbox.tools["calculator"].description.startswith("Exact")
        assert tb.external[0].exported["arith.calculator"] == "calculator"
        # the server's stderr reaches our log
        assert any("mcp0 stderr: arith: ready on stdio" in r.message for r in caplog.records)

        got = await ta.call("add", {"a": 2, "b": 40}, peer=b.peer_id)
        assert isinstance(got, ToolResult) and got.value == {"result": 42}, got
        echo = await ta.call("echo", {"text": "hi"}, peer=b.peer_id)
        assert isinstance(echo, ToolResult) and echo.value == {"text": "hi"}, echo
        renamed = await ta.call("arith.calculator", {"expression": "1+1"}, peer=b.peer_id)
        assert isinstance(renamed, ToolResult) and renamed.value == {"result": "1+1"}

        # wrong types: refused here, before anything is sent
        served = len(events(b, "tool.served"))
        bad = await ta.call("add", {"a": "2", "b": 1}, peer=b.peer_id)
        assert isinstance(bad, ToolFailure) and (bad.code, bad.by) == (
            wire.INVALID_ARGUMENTS, "caller"), bad
        assert "a: '2' is not of type 'integer'" in bad.message
        assert len(events(b, "tool.served")) == served

        # a crash: the call in flight fails as an observation, the tools leave the
        # ledger, the restart brings them back, and they work again
        crashed = await ta.call("boom", {}, peer=b.peer_id)
        assert isinstance(crashed, ToolFailure) and crashed.code == wire.TOOL_ERROR, crashed
        assert "exited during the call" in crashed.message
        await wait_for(lambda: tb.external[0].state != "up", what="the crash seen")
        await wait_for(lambda: "add" in offers_of(a, b.peer_id)
                       and tb.external[0].state == "up", 20.0, what="the restart")
        assert metric(b, 'peerd_mcp_restarts_total{server="mcp0"} 1.0')
        assert any("mcp0 stderr: arith: boom, exiting" in r.message for r in caplog.records)
        again = await ta.call("add", {"a": 1, "b": 1}, peer=b.peer_id)
        assert isinstance(again, ToolResult) and again.value == {"result": 2}, again
        assert tb.status()["mcp_servers"]["mcp0"]["crashes"] == 1
        # the restart listed the broken tool again: still counted once, and named
        assert metric(b, 'peerd_mcp_tools_refused_total{server="mcp0"} 1.0')
        assert sum("'broken' not offered" in r.message for r in caplog.records) == 1
        refused = tb.status()["mcp_servers"]["mcp0"]["refused"]
        assert list(refused) == ["broken"] and "not valid JSON Schema" in refused["broken"]


async def test_servers_that_exit_or_never_answer_are_given_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = McpSettings(ready_s=1.0, backoff_s=0.05, max_restarts=1)
    async with swarm(1, tmp_path, connect="none") as (a,):
        tools = Tools(a, gossip(a), builtins=[("calculator", None)], mcp_settings=settings,
                      mcp=[command("exits.py"), command("silent.py"), "/nonexistent/mcp-server"])
        await a.start(tools)
        await wait_for(lambda: all(s.state == "given up" for s in tools.external), 15.0,
                       what="all three given up")
        log = "\n".join(r.message for r in caplog.records)
        assert "mcp0" in log and "it exited before it was ready; 1 restarts did not hold" in log
        assert "mcp1" in log and "no initialize reply and tool list within 1 s" in log
        assert "cannot start '/nonexistent/mcp-server'" in log
        assert "mcp0 stderr: exits: nothing to serve" in log
        for label in ("mcp0", "mcp1", "mcp2"):
            assert metric(a, f'peerd_mcp_given_up_total{{server="{label}"}} 1.0')
        # the peer keeps serving
        got = await tools.call("calculator", {"expression": "6 * 7"}, peer=a.peer_id)
        assert isinstance(got, ToolResult) and got.value == {"value": "42"}


@contextlib.asynccontextmanager
async def api(node: Node) -> AsyncIterator[str]:
    config, sockets = bind("127.0.0.1", 0)
    port = sockets.insecure_sockets[0].getsockname()[1]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, create_app(node, TOKEN), config, sockets, shutdown)
        yield f"http://127.0.0.1:{port}/mcp"
        shutdown.set()
        nursery.cancel_scope.deadline = trio.current_time() + 2


@contextlib.asynccontextmanager
async def mcp_client(url: str, token: str = TOKEN) -> AsyncIterator[ClientSession]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                  timeout=30) as http, \
            streamable_http_client(url, http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def test_mcp_endpoint_serves_the_swarm_tools(tmp_path: Path) -> None:
    async with with_arith(tmp_path) as (a, b, ta, _):
        endpoint = McpEndpoint(ta)
        await a.start(endpoint)
        assert endpoint.server is None  # the SDK is loaded when /mcp is first asked for
        async with api(a) as url:
            async with mcp_client(url) as session:
                assert endpoint.server is not None
                listed = {t.name: t for t in (await session.list_tools()).tools}
                assert ARITH_TOOLS | {"calculator"} <= set(listed), sorted(listed)
                assert "plan" not in listed
                assert listed["add"].input_schema["properties"]["a"]["type"] == "integer"
                assert listed["add"].output_schema is not None

                calc = await session.call_tool("calculator", {"expression": "6 * 7"})
                assert not calc.is_error and calc.structured_content == {"value": "42"}
                # the external add, on the other peer, through the dispatcher
                add = await session.call_tool("add", {"a": 20, "b": 22})
                assert not add.is_error and add.structured_content == {"result": 42}, add
                assert events(b, "tool.served", tool="add", caller=a.peer_id)
                # wrong types: an error result in words, nothing dispatched
                bad = await session.call_tool("add", {"a": "x", "b": 1})
                assert bad.is_error and isinstance(bad.content[0], types.TextContent)
                assert bad.content[0].text.startswith("invalid_arguments (caller)")
                none = await session.call_tool("nobody_offers_this", {})
                assert none.is_error and "no_offer" in str(none.content[0])

            # with the planner wired in as the daemon wires it, `plan` is listed and runs a
            # real plan: its step calls the external add on the other peer
            script = [ScriptedThinker([
                json.dumps({"thought": "add them", "calls": [
                    {"tool": "add", "arguments": {"a": 2, "b": 2}}]}),
                json.dumps({"thought": "the sum is in", "answer": "2 + 2 = 4"})])]
            plans = Plans(a, ta, tmp_path, thinker=lambda: script[0],
                          budget=Budget(steps=3))
            await a.start(plans)
            endpoint.plan = plan_over_mcp(plans)
            async with mcp_client(url) as session:
                assert "plan" in {t.name for t in (await session.list_tools()).tools}
                planned = await session.call_tool("plan", {"goal": "add 2 and 2"})
                assert not planned.is_error, planned
                got = planned.structured_content or {}
                assert got["answer"] == "2 + 2 = 4"
                record = plans.record(got["plan_id"]) or {}
                assert record["status"] == "answered"
                assert record["steps"][0]["calls"][0]["peer"] == b.peer_id
                # a plan that fails (its steps never parse, the budget runs out): an error
                script[0] = ScriptedThinker(["no JSON here"] * 3)
                failed = await session.call_tool("plan", {"goal": "add 2 and 2"})
                assert failed.is_error and "budget_steps" in str(failed.content[0])
                bad = await session.call_tool("plan", {"goal": ""})
                assert bad.is_error and "invalid_arguments" in str(bad.content[0])
                # the limit of POST /v1/plans, not a looser one of its own
                long = await session.call_tool("plan", {"goal": "x" * (MAX_GOAL_CHARS + 1)})
                assert long.is_error and "invalid_arguments" in str(long.content[0])

            # without a token or with a wrong one: 401, counted
            async with httpx2.AsyncClient() as http:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    got = await http.post(url, json={"jsonrpc": "2.0", "id": 1,
                                                     "method": "tools/list"},
                                          headers={**headers, "Accept":
                                                   "application/json, text/event-stream"})
                    assert got.status_code == 401
            assert metric(a, 'peerd_rejections_total{reason="mcp_unauthorized"} 2.0')
            assert metric(a, 'peerd_mcp_calls_total{outcome="ok"} 3.0')
            assert metric(a, 'peerd_mcp_calls_total{outcome="plan_failed"} 1.0')


async def test_an_sdk_that_fails_to_load_is_a_503_and_the_api_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: McpEndpoint) -> None:
        raise ImportError("No module named 'mcp.server'")

    monkeypatch.setattr(McpEndpoint, "_load", broken)
    async with swarm(1, tmp_path) as (a,):
        tools = Tools(a, gossip(a))
        await a.start(tools, McpEndpoint(tools))
        async with api(a) as url, httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            for _ in range(2):  # and again: the load is not retried on every request
                got = await http.post(url, json={"jsonrpc": "2.0", "id": 1,
                                                 "method": "tools/list"},
                                      headers={"Accept": "application/json, text/event-stream"})
                assert got.status_code == 503, got.text
                assert got.json()["error"]["code"] == "mcp_unavailable"
                assert "log" in got.json()["error"]["message"]
            health = await http.get(url.removesuffix("/mcp") + "/health")
            assert health.status_code == 200


def test_a_daemon_nobody_speaks_mcp_to_does_not_import_the_sdk() -> None:
    """The SDK takes about a second to import: a daemon without `--mcp` loads it when
    `/mcp` is first asked for, not as it starts (nor torch, before a model)."""
    heavy = ("mcp", "mcp_types", "torch", "transformers", "pytest")
    code = ("import sys, peerd.daemon, peerd.cli.start; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- the pure parts ---------------------------------------------------------------


def test_names_results_and_stderr_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    taken = {"calculator", "srv.dup"}
    assert mcp_tools.export_name("add", "srv", taken.__contains__) == "add"
    assert mcp_tools.export_name("calculator", "srv", taken.__contains__) == \
        "srv.calculator"
    for name, words in (("dup", "both"), ("has space", "not a letter"),
                        ("x" * 62, "over 64")):
        with pytest.raises(mcp_tools.Refused, match=words):
            mcp_tools.export_name(name, "srv", (taken | {"dup", "x" * 62}).__contains__)
    assert mcp_tools.prefix_of("My Server!", "mcp3") == "My-Server"
    assert mcp_tools.prefix_of("9lives", "mcp3") == "mcp3"

    text = types.TextContent(type="text", text="oops")
    with pytest.raises(ToolError, match="oops"):
        mcp_tools.result_of(types.CallToolResult(content=[text], is_error=True), False)
    assert mcp_tools.result_of(types.CallToolResult(content=[text]), False) == {"text": "oops"}
    with pytest.raises(ToolError, match="no structured content"):
        mcp_tools.result_of(types.CallToolResult(content=[text]), True)

    caplog.set_level(logging.INFO)
    lines = StderrLines("mcp9")
    lines.feed(b"".join(b"line %d " % i + b"y" * 1000 + b"\n" for i in range(30)), 0.0)
    lines.feed(b"no end", 0.0)
    lines.close()
    logged = [r.message for r in caplog.records if "mcp9" in r.message]
    assert len(logged) == 21 and logged[-1] == "MCP server mcp9: 11 stderr lines not logged"
    assert all(len(m) < 460 for m in logged)


def test_wrapped_output_is_a_schema() -> None:
    tool = types.Tool(name="t", input_schema={"type": "object"})

    async def run(arguments: dict[str, Any]) -> dict[str, Any]:
        return {}

    made = mcp_tools.exported(tool, "t", run, capacity=2)
    assert made.output_schema == mcp_tools.WRAPPED_OUTPUT and made.capacity == 2


def test_mcp_settings(tmp_path: Path) -> None:
    cfg = load_config({"mcp": ("python a.py --x 1,2", "npx server"), "mcp_capacity": 2},
                      environ={"PEERD_HOME": str(tmp_path)})
    assert cfg.mcp == ("python a.py --x 1,2", "npx server") and cfg.mcp_capacity == 2
    env = load_config(environ={"PEERD_HOME": str(tmp_path),
                               "PEERD_MCP": "python a.py --x 1,2\nnpx server\n",
                               "PEERD_MCP_DEADLINE_S": "5"})
    assert env.mcp == cfg.mcp and env.mcp_deadline_s == 5.0
    for flags, words in (({"mcp": ("python 'a.py",)}, "not a command line"),
                         ({"mcp_capacity": 0}, "outside"),
                         ({"mcp_deadline_s": 120}, "outside")):
        with pytest.raises(ConfigError, match=words):
            load_config(flags, environ={"PEERD_HOME": str(tmp_path)})
