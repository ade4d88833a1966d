"""Plans over HTTP (peerd/plans/planning.py).

`POST /v1/plans` {"goal", "tools"? (names; default every tool in the live ledger),
"budget"? {"steps", "tokens", "wall_s", "calls"} (each optional), "mode"? ("sync" |
"async", default "sync")} -> 200 {"id", "status": "running"}; the plan runs in the
background. 400 for a bad body (an unknown field, an empty goal, a budget out of range,
a tool nobody offers), 503 on a peer without a model to plan with.
`GET /v1/plans`: recent plans, newest first: [{"id", "goal", "status", "created"}].
`GET /v1/plans/{id}`: the plan's record (docs/plans.md).
`GET /v1/plans/{id}/events`: Server-Sent Events of the plan, from its first event, then
live, ending after `plan.answer` or `plan.failed` (the same lines as `/events`).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from peerd.api.errors import ApiError, answering, json_object, read_json
from peerd.plans.planner import MODES, Budget
from peerd.plans.planning import MAX_GOAL_CHARS, CannotPlan, LivePlan, PlanSpec
from protocols.tool import MAX_TOOLS, NAME

if TYPE_CHECKING:
    from peerd.plans.planning import Plans

FIELDS = {"goal", "tools", "budget", "mode", "constrained"}
MAX_BODY_BYTES = 64 * 1024
KEEPALIVE_S = 15.0


def parse(body: Any, default: Budget) -> PlanSpec:
    """The plan a POST /v1/plans body asks for; ApiError(400) naming what is wrong."""
    body = json_object(body, FIELDS)
    goal = body.get("goal")
    if not isinstance(goal, str) or not goal.strip() or len(goal) > MAX_GOAL_CHARS:
        raise ApiError(400, f"'goal' must be a non-empty string of at most {MAX_GOAL_CHARS}"
                       " characters", param="goal")
    tools = body.get("tools")
    if tools is not None and (
            not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS
            or not all(isinstance(t, str) and NAME.fullmatch(t) for t in tools)):
        raise ApiError(400, f"'tools' must be a list of 1..{MAX_TOOLS} tool names "
                       "(`peerd tools` lists them)", param="tools")
    mode = body.get("mode", "sync")
    if mode not in MODES:
        raise ApiError(400, f"'mode' must be one of {', '.join(MODES)}", param="mode")
    constrained = body.get("constrained", True)
    if not isinstance(constrained, bool):
        raise ApiError(400, "'constrained' must be true or false", param="constrained")
    return PlanSpec(goal.strip(), None if tools is None else tuple(dict.fromkeys(tools)),
                    _budget(body.get("budget"), default), mode, constrained)


def _budget(raw: Any, default: Budget) -> Budget:
    if raw is None:
        return default
    raw = json_object(raw, set(Budget.LIMITS)) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise ApiError(400, "'budget' must be an object {steps, tokens, wall_s, calls}",
                       param="budget")
    values = default.to_json()
    for name, (lo, hi) in Budget.LIMITS.items():
        v = raw.get(name, values[name])
        whole = name != "wall_s"
        if isinstance(v, bool) or not isinstance(v, int | float) or (whole and not
                isinstance(v, int)) or not math.isfinite(v) or not lo <= v <= hi:
            kind = "an integer" if whole else "a number of seconds"
            raise ApiError(400, f"'budget.{name}' must be {kind} in {lo}..{hi}",
                           param=f"budget.{name}")
        values[name] = v
    return Budget(**values)


def routes(plans: Plans) -> list[Route]:
    @answering
    async def create(request: Request) -> Response:
        spec = parse(await read_json(request, MAX_BODY_BYTES), plans.budget)
        try:
            plan_id = await plans.start(spec)
        except CannotPlan as exc:
            code = "no_model" if exc.status == 503 else None
            raise ApiError(exc.status, str(exc), "service_unavailable" if exc.status == 503
                           else "invalid_request_error", param=exc.param, code=code) from None
        return JSONResponse({"id": plan_id, "status": "running"})

    async def recent(request: Request) -> Response:
        return JSONResponse(plans.recent())

    async def show(request: Request) -> Response:
        record = plans.record(request.path_params["plan_id"])
        if record is None:
            return _not_found()
        return JSONResponse(record)

    async def events(request: Request) -> Response:
        plan = plans.events(request.path_params["plan_id"])
        if plan is None:
            return _not_found()
        return StreamingResponse(_sse(plan), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return [
        Route("/v1/plans", create, methods=["POST"]),
        Route("/v1/plans", recent, methods=["GET"]),
        Route("/v1/plans/{plan_id}", show),
        Route("/v1/plans/{plan_id}/events", events),
    ]


def _not_found() -> Response:
    return ApiError(404, "no such plan on this peer (a peer keeps the plans asked of it, "
                    "the latest 1000)", code="plan_not_found").response()


async def _sse(plan: LivePlan | list[dict[str, Any]]) -> AsyncIterator[str]:
    yield ": peerd plan events\n\n"
    i = 0
    while True:
        events = plan.events if isinstance(plan, LivePlan) else plan
        while i < len(events):
            event = events[i]
            i += 1
            yield (f"id: {event.get('id', 0)}\nevent: {event.get('type', '')}\n"
                   f"data: {json.dumps(event, separators=(',', ':'), default=str)}\n\n")
        if not isinstance(plan, LivePlan) or plan.done:
            return
        changed = plan.changed
        with trio.move_on_after(KEEPALIVE_S) as waited:
            await changed.wait()
        if waited.cancelled_caught:
            yield ": keep-alive\n\n"
