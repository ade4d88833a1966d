"""Plans over HTTP (peerd/plans/planning.py).

`POST /v1/plans` {"goal", "tools"? (names; default every tool in the live ledger),
"budget"? {"steps", "tokens", "wall_s", "calls"} (each optional), "mode"? ("sync" |
"async", default "sync"), "constrained"? (default true), "memory"? (true or {"k",
"domain"}: the memory's notes for the goal, which the planner sees before it), and for
a plan with a checkable answer "reference"? (the expected answer), "scorer"? (default
"number") and "domain"? (default the notes' domain, else "plans")} -> 200 {"id",
"status": "running", "memory"? (the notes given)}; the plan runs in the background. A
scored plan's record adds "reference", "scorer", "domain", "score" and "scec" (its
run's hash in the memory, null when none kept it; plans/scored.py). 400 for a bad body
(an unknown field, an empty goal, a budget out of range, a tool nobody offers, a
reference the scorer cannot read, `memory` on a peer that keeps none), 503 on a peer
without a model to plan with, 429 (with Retry-After) while the peer runs as many plans
as it takes at once (planning.MAX_RUNNING).
`GET /v1/plans`: recent plans, newest first: [{"id", "goal", "status", "created"}].
`GET /v1/plans/{id}`: the plan's record (docs/plans.md).
`GET /v1/plans/{id}/events`: Server-Sent Events of the plan, from its first event, then
live, ending after `plan.answer` or `plan.failed` (the same lines as `/events`); a HEAD
gets the headers alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peerd.api.app import event_stream
from peerd.api.errors import ApiError, answering, json_object, read_json
from peerd.api.openai_request import notes_for, parse_memory
from peerd.api.recall import Note, Recall
from peerd.api.tasks import scoring
from peerd.plans.planner import MODES, Budget
from peerd.plans.planning import MAX_GOAL_CHARS, CannotPlan, LivePlan, PlanSpec
from peerd.plans.scored import PLANS_DOMAIN
from protocols.tool import MAX_TOOLS, NAME

if TYPE_CHECKING:
    from peerd.plans.planning import Plans

FIELDS = {"goal", "tools", "budget", "mode", "constrained", "memory", "reference", "scorer",
          "domain"}
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
    reference, scorer, domain = scoring(body, PLANS_DOMAIN)
    return PlanSpec(goal.strip(), None if tools is None else tuple(dict.fromkeys(tools)),
                    _budget(body.get("budget"), default), mode, constrained,
                    reference=reference, scorer=scorer, domain=domain)


async def with_memory(recall: Recall | None, body: dict[str, Any], spec: PlanSpec
                      ) -> tuple[PlanSpec, list[Note] | None]:
    """The plan with the memory's notes for its goal (the planner sees them before it),
    and the notes; the plan as asked without a `memory` option."""
    ask = parse_memory(body.get("memory"))
    if ask is None:
        return spec, None
    notes = await notes_for(recall, ask, spec.goal)
    return replace(spec, memory=tuple(n.text for n in notes),
                   memory_ids=tuple(n.id for n in notes)), notes


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
        # the range test first: math.isfinite overflows on a huge JSON integer
        if isinstance(v, bool) or not isinstance(v, int | float) or (whole and not
                isinstance(v, int)) or not lo <= v <= hi or not math.isfinite(v):
            kind = "an integer" if whole else "a number of seconds"
            raise ApiError(400, f"'budget.{name}' must be {kind} in {lo}..{hi}",
                           param=f"budget.{name}")
        values[name] = v
    return Budget(**values)


def routes(plans: Plans) -> list[Route]:
    @answering
    async def create(request: Request) -> Response:
        body = await read_json(request, MAX_BODY_BYTES)
        spec, notes = await with_memory(plans.recall, body, parse(body, plans.budget))
        try:
            plan_id = await plans.start(spec)
        except CannotPlan as exc:
            type_, code = _KINDS.get(exc.status, _KINDS[400])
            raise ApiError(exc.status, str(exc), type_, param=exc.param, code=code,
                           retry_after_s=exc.retry_after_s) from None
        out: dict[str, Any] = {"id": plan_id, "status": "running"}
        if notes is not None:
            out["memory"] = [n.to_json() for n in notes]
        return JSONResponse(out)

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
        return event_stream(request, _sse(plan))

    return [
        Route("/v1/plans", create, methods=["POST"]),
        Route("/v1/plans", recent, methods=["GET"]),
        Route("/v1/plans/{plan_id}", show),
        Route("/v1/plans/{plan_id}/events", events),
    ]


# a refusal's (type, code) by its status
_KINDS = {400: ("invalid_request_error", None), 503: ("service_unavailable", "no_model"),
          429: ("rate_limit_error", "too_many_plans")}


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
