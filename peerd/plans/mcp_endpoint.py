"""peerd as an MCP server: `/mcp` in the local API, streamable HTTP (issue 27).

Any MCP client (with the API's bearer token: api/app.py refuses the rest with 401,
counted as `mcp_unauthorized`) sees the swarm's tools: every tool a live peer offers
in the ledger, under its name, with the inputSchema and outputSchema of its contract
(fetched once per schema hash over `/peerd/tool/1.0.0`, cached by Tools). A call is
dispatched like any other (Tools.dispatch: the arguments checked against the schema
before anything is sent, the best peer with a free slot, retry elsewhere); its result
is the tool's structured content (and the same JSON as text), a failure an error
result in words (`invalid_arguments (caller): ...`), never a protocol error.

The tool list is read again on each `tools/list`, so it follows the ledger; the
server is stateless (no session to notify of `list_changed`). With a planner wired in
(`plan`, a callable the daemon sets), a `plan` tool takes a goal and answers with the
answer and the plan's id; without one it is not listed.

The SDK's own HTTP runner starts uvicorn (asyncio only); here its session manager and
ASGI app run inside peerd's hypercorn trio server, the manager's task group in this
service's lifetime. The SDK (mcp_server.py) is imported, off the event loop, when
`/mcp` is first asked for: it takes about a second, which every daemon's start paid
whether anyone spoke MCP to it or not. That first request waits for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from prometheus_client import Counter
from starlette.routing import Route
from trio_typing import TaskStatus

from peerd.api.errors import ApiError
from peerd.plans.retry import DEFAULT_POLICY, RetryPolicy
from peerd.service import Service
from protocols.tool import MAX_ARGUMENTS_BYTES

if TYPE_CHECKING:
    from starlette.routing import BaseRoute
    from starlette.types import Receive, Scope, Send

    from peerd.plans.mcp_server import McpServer
    from peerd.plans.service import Tools

log = logging.getLogger(__name__)

PATH = "/mcp"
MAX_BODY_BYTES = MAX_ARGUMENTS_BYTES + 16384
LOAD_S = 60.0  # the first request's wait for the SDK to import (about 1 s; a loaded CPU)


@dataclass(frozen=True, slots=True)
class PlanAnswer:
    answer: str  # or, when the plan failed, why
    plan_id: str
    ok: bool = True  # False: the plan failed (a budget ran out, ...)


PlanFn = Callable[[str], Awaitable[PlanAnswer]]  # goal -> the planner's answer


class McpEndpoint(Service):
    name = "mcp"

    def __init__(self, tools: Tools, *, plan: PlanFn | None = None,
                 policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self.tools = tools
        self.plan = plan  # the planner, when the daemon wires one
        self.policy = policy
        self.calls = Counter("peerd_mcp_calls", "Tool calls made through /mcp, by outcome",
                             ["outcome"], registry=tools.node.metrics.registry)
        self.server: McpServer | None = None  # once the SDK is loaded and running
        self._wanted = trio.Event()  # /mcp was asked for: load the SDK
        self._loaded = trio.Event()  # loaded and running, or failed to (`server` None)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        await self._wanted.wait()
        try:
            server = await trio.to_thread.run_sync(self._load)
        except Exception:  # our bug, or a broken install: /mcp answers 503, nothing else
            log.exception("the MCP SDK failed to load: /mcp is unavailable")
            self._loaded.set()
            return
        async with server.manager.run():
            self.server = server
            self._loaded.set()
            await trio.sleep_forever()

    def _load(self) -> McpServer:
        from peerd.plans.mcp_server import McpServer  # (the SDK: mcp_server.py)
        return McpServer(self, MAX_BODY_BYTES)

    def routes(self) -> Sequence[BaseRoute]:
        # stateless: no stream to open on a GET (the SDK's held the connection, silent)
        return [Route(PATH, _Lazy(self), methods=["POST", "DELETE"])]


class _Lazy:
    """The ASGI app of `/mcp`: the SDK's, once the endpoint has loaded it."""

    def __init__(self, endpoint: McpEndpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ep = self.endpoint
        ep._wanted.set()
        with trio.move_on_after(LOAD_S):
            await ep._loaded.wait()
        if ep.server is None:
            why = ("the MCP server failed to load; the peer's log says why"
                   if ep._loaded.is_set() else "the MCP server is still loading; try again")
            await ApiError(503, why, "server_error", code="mcp_unavailable",
                           retry_after_s=None if ep._loaded.is_set() else 1.0
                           ).response()(scope, receive, send)
            return
        await ep.server.app(scope, receive, send)
