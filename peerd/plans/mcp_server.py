"""The MCP SDK's side of `/mcp` (mcp_endpoint.py): its low-level server and stateless
session manager over the endpoint's tools and planner, and the two tool handlers.
Imported when `/mcp` is first asked for, not at start: the SDK takes about a second
to import, which every start of a daemon paid, used or not.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager

from peerd import __version__
from peerd.plans.caller import ToolFailure
from peerd.plans.dispatch import Call
from peerd.plans.planning import MAX_GOAL_CHARS, CannotPlan
from peerd.plans.schema import Invalid, SchemaCheck

if TYPE_CHECKING:
    from peerd.plans.mcp_endpoint import McpEndpoint

log = logging.getLogger(__name__)

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


class McpServer:
    """The SDK's server for `endpoint`: `manager.run()` for the endpoint's lifetime,
    `app` the ASGI app that serves `/mcp` within it."""

    def __init__(self, endpoint: McpEndpoint, max_body_bytes: int) -> None:
        self.endpoint = endpoint
        self.server: Server[Any] = Server("peerd", version=__version__,
                                          on_list_tools=self._list_tools,
                                          on_call_tool=self._call_tool)
        # stateless: every request stands alone, so the tool list is always the ledger's;
        # JSON answers, not SSE; no DNS-rebinding check: the bearer token is the guard
        self.manager = StreamableHTTPSessionManager(self.server, stateless=True,
                                                    json_response=True,
                                                    max_request_body_size=max_body_bytes)
        self.app = StreamableHTTPASGIApp(self.manager)

    # ---- the handlers ---------------------------------------------------------------

    async def _list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None
                          ) -> types.ListToolsResult:
        planning = self.endpoint.plan is not None
        specs = list((await self.endpoint.tools.specs()).values())
        listed = [types.Tool(name=s.name, description=s.description or None,
                             input_schema=s.input_schema, output_schema=s.output_schema)
                  for s in specs if not (planning and s.name == PLAN_TOOL.name)]
        if planning:
            listed.append(PLAN_TOOL)
        return types.ListToolsResult(tools=listed)

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams
                         ) -> types.CallToolResult:
        ep = self.endpoint
        arguments = params.arguments or {}
        if ep.plan is not None and params.name == PLAN_TOOL.name:
            return await self._plan(arguments)
        listed = (await ep.tools.specs([params.name])).get(params.name)  # as tools/list
        schema = listed.schema if listed is not None else ""  # showed it: its peers first
        (done,) = await ep.tools.dispatch([Call(params.name, arguments, schema=schema)],
                                          ep.policy)
        ep.calls.labels(done.code).inc()
        if isinstance(done.outcome, ToolFailure) or done.outcome is None:
            by = done.outcome.by if done.outcome is not None else "caller"
            return error(f"{done.code} ({by}): {done.message}")
        return answer(done.outcome.value)

    async def _plan(self, arguments: dict[str, Any]) -> types.CallToolResult:
        ep = self.endpoint
        assert ep.plan is not None
        try:
            goal = PLAN_INPUT(arguments)["goal"]
        except Invalid as exc:
            ep.calls.labels("invalid_arguments").inc()
            return error(f"invalid_arguments (caller): arguments of plan: {exc}")
        try:
            planned = await ep.plan(goal)
        except CannotPlan as exc:  # no model here, the planner not up yet: in its words
            ep.calls.labels("refused").inc()
            return error(f"refused (callee): {exc}")
        except Exception as exc:  # the planner's bug: say so, keep serving
            log.exception("plan over /mcp failed")
            ep.calls.labels("tool_error").inc()
            return error(f"tool_error (callee): the planner failed ({type(exc).__name__})")
        if not planned.ok:
            ep.calls.labels("plan_failed").inc()
            return error(f"plan_failed (callee): {planned.answer} (plan {planned.plan_id})")
        ep.calls.labels("ok").inc()
        return answer({"answer": planned.answer, "plan_id": planned.plan_id})


def answer(value: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(value, ensure_ascii=False))],
        structured_content=value)


def error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)],
                                is_error=True)
