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
service's lifetime.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mcp_types as types
import trio
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from prometheus_client import Counter
from starlette.routing import Route
from trio_typing import TaskStatus

from peerd import __version__
from peerd.plans.caller import ToolFailure
from peerd.plans.dispatch import Call
from peerd.plans.planning import CannotPlan
from peerd.plans.retry import DEFAULT_POLICY, RetryPolicy
from peerd.plans.schema import Invalid, SchemaCheck
from peerd.service import Service
from protocols.tool import MAX_ARGUMENTS_BYTES

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from peerd.plans.service import Tools

log = logging.getLogger(__name__)

PATH = "/mcp"
MAX_BODY_BYTES = MAX_ARGUMENTS_BYTES + 16384
MAX_GOAL_CHARS = 4000


@dataclass(frozen=True, slots=True)
class PlanAnswer:
    answer: str  # or, when the plan failed, why
    plan_id: str
    ok: bool = True  # False: the plan failed (a budget ran out, ...)


PlanFn = Callable[[str], Awaitable[PlanAnswer]]  # goal -> the planner's answer

PLAN_INPUT = SchemaCheck({
    "type": "object", "additionalProperties": False, "required": ["goal"],
    "properties": {"goal": {"type": "string", "minLength": 1, "maxLength": MAX_GOAL_CHARS,
                            "description": "what to achieve, in words"}}})
PLAN_OUTPUT: dict[str, Any] = {
    "type": "object", "required": ["answer", "plan_id"],
    "properties": {"answer": {"type": "string"},
                   "plan_id": {"type": "string", "description": "GET /v1/plans/{id}"}}}
PLAN_TOOL = types.Tool(
    name="plan", description="Plan and run a goal over the swarm's tools (ReAct with the "
    "swarm's model); the answer and the plan's id.", input_schema=PLAN_INPUT.schema,
    output_schema=PLAN_OUTPUT)


class McpEndpoint(Service):
    name = "mcp"

    def __init__(self, tools: Tools, *, plan: PlanFn | None = None,
                 policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self.tools = tools
        self.plan = plan  # the planner, when the daemon wires one
        self.policy = policy
        self.calls = Counter("peerd_mcp_calls", "Tool calls made through /mcp, by outcome",
                             ["outcome"], registry=tools.node.metrics.registry)
        self.server: Server[Any] = Server("peerd", version=__version__,
                                          on_list_tools=self._list_tools,
                                          on_call_tool=self._call_tool)
        # stateless: every request stands alone, so the tool list is always the ledger's;
        # JSON answers, not SSE; no DNS-rebinding check: the bearer token is the guard
        self.manager = StreamableHTTPSessionManager(self.server, stateless=True,
                                                    json_response=True,
                                                    max_request_body_size=MAX_BODY_BYTES)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with self.manager.run():
            task_status.started()
            await trio.sleep_forever()

    def routes(self) -> Sequence[BaseRoute]:
        # stateless: no stream to open on a GET (the SDK's held the connection, silent)
        return [Route(PATH, StreamableHTTPASGIApp(self.manager), methods=["POST", "DELETE"])]

    # ---- the handlers ---------------------------------------------------------------

    async def _list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None
                          ) -> types.ListToolsResult:
        specs = list((await self.tools.specs()).values())
        listed = [types.Tool(name=s.name, description=s.description or None,
                             input_schema=s.input_schema, output_schema=s.output_schema)
                  for s in specs if not (self.plan is not None and s.name == PLAN_TOOL.name)]
        if self.plan is not None:
            listed.append(PLAN_TOOL)
        return types.ListToolsResult(tools=listed)

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams
                         ) -> types.CallToolResult:
        arguments = params.arguments or {}
        if self.plan is not None and params.name == PLAN_TOOL.name:
            return await self._plan(arguments)
        listed = (await self.tools.specs([params.name])).get(params.name)  # as tools/list
        schema = listed.schema if listed is not None else ""  # showed it: its peers first
        (done,) = await self.tools.dispatch([Call(params.name, arguments, schema=schema)],
                                            self.policy)
        self.calls.labels(done.code).inc()
        if isinstance(done.outcome, ToolFailure) or done.outcome is None:
            by = done.outcome.by if done.outcome is not None else "caller"
            return error(f"{done.code} ({by}): {done.message}")
        return answer(done.outcome.value)

    async def _plan(self, arguments: dict[str, Any]) -> types.CallToolResult:
        assert self.plan is not None
        try:
            goal = PLAN_INPUT(arguments)["goal"]
        except Invalid as exc:
            self.calls.labels("invalid_arguments").inc()
            return error(f"invalid_arguments (caller): arguments of plan: {exc}")
        try:
            planned = await self.plan(goal)
        except CannotPlan as exc:  # no model here, the planner not up yet: in its words
            self.calls.labels("refused").inc()
            return error(f"refused (callee): {exc}")
        except Exception as exc:  # the planner's bug: say so, keep serving
            log.exception("plan over /mcp failed")
            self.calls.labels("tool_error").inc()
            return error(f"tool_error (callee): the planner failed ({type(exc).__name__})")
        if not planned.ok:
            self.calls.labels("plan_failed").inc()
            return error(f"plan_failed (callee): {planned.answer} (plan {planned.plan_id})")
        self.calls.labels("ok").inc()
        return answer({"answer": planned.answer, "plan_id": planned.plan_id})


def answer(value: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(value, ensure_ascii=False))],
        structured_content=value)


def error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)],
                                is_error=True)
