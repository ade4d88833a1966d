"""The swarm's typed tools over HTTP (peerd/plans/).

`GET /v1/tools`: every tool in the live ledger, one row per peer and tool:
    [{"peer_id", "peer_name", "tool", "schema", "capacity", "self"}]
`GET /v1/tools?peer=P` (a peer id or name): that peer's tools in full, asked of it over
`/peerd/tool/1.0.0`:
    {"peer_id", "tools": [{"name", "description", "inputSchema", "outputSchema",
                           "schema", "capacity"}]}
`POST /v1/tools/call` {"tool", "arguments" (an object, default {}), "peer" (optional:
an id or a name; default the best peer offering the tool), "deadline_s" (default 30,
at most 60)}: 200 with the call's outcome, which a failed call is too:
    {"ok": true, "peer", "tool", "call_id", "result", "elapsed_s"}
    {"ok": false, "peer", "tool", "call_id", "error": {"code", "message", "by"}}
`POST /v1/tools/dispatch` {"calls": [{"tool", "arguments"}] (1..64), "deadline_s" (each
attempt's, default 30), "max_attempts" (1..10, default 3)}: the calls at once across the
peers offering each tool (plans/dispatch.py), 200 with every call's end in order:
    {"results": [{"ok", "tool", "call_id", "peer", "attempts": [...], "elapsed_s",
                  "result" | "error": {"code", "message", "by", "peers"}}]}
Errors of the request itself (a bad body, arguments over 64 KiB of JSON or not plain
JSON, a tool nobody offers, an unknown peer) use OpenAI's error shape; in a batch they
name the call ("calls[3].arguments").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peerd.api.errors import ApiError, answering, json_object, read_json
from peerd.plans.caller import ToolFailure, not_json
from peerd.plans.dispatch import Call
from peerd.plans.retry import RetryPolicy
from peerd.plans.schema import canonical_json
from peerd.plans.service import NoOffer
from protocols.tool import MAX_ARGUMENTS_BYTES, MAX_DEADLINE_S, NAME

if TYPE_CHECKING:
    from peerd.plans.service import Tools

FIELDS = {"tool", "arguments", "peer", "deadline_s"}
MAX_BODY_BYTES = MAX_ARGUMENTS_BYTES + 4096


def parse_call(body: Any, where: str = "") -> tuple[str, dict[str, Any], str | None, float]:
    """(tool, arguments, peer, deadline_s) of a POST /v1/tools/call body; ApiError(400).
    `where`: the call's place in a batch ("calls[3]."), which the errors name."""
    body = json_object(body, FIELDS)
    tool = body.get("tool")
    if not isinstance(tool, str) or not NAME.fullmatch(tool):
        raise ApiError(400, f"'{where}tool' must be a tool's name (`peerd tools` lists "
                       "them)", param=f"{where}tool")
    param = f"{where}arguments"
    arguments = _arguments(body.get("arguments", {}), param)
    peer = body.get("peer")
    if peer is not None and (not isinstance(peer, str) or not 0 < len(peer) <= 128):
        raise ApiError(400, "'peer' must be a peer id or name", param="peer")
    deadline = body.get("deadline_s", 30.0)
    # the range test first: math.isfinite overflows on a huge JSON integer
    if isinstance(deadline, bool) or not isinstance(deadline, int | float) \
            or not 0 < deadline <= MAX_DEADLINE_S or not math.isfinite(deadline):
        raise ApiError(400, f"'deadline_s' must be a number of seconds in (0, "
                       f"{MAX_DEADLINE_S:g}]", param="deadline_s")
    return tool, arguments, peer, float(deadline)


def _arguments(arguments: Any, param: str) -> dict[str, Any]:
    """A call's arguments as they may be sent: a JSON object, plain JSON (json.loads
    takes NaN), within the wire's cap (caller.call_tool refuses the rest)."""
    if not isinstance(arguments, dict):
        raise ApiError(400, f"'{param}' must be a JSON object of the tool's arguments",
                       param=param)
    problem = not_json(arguments)
    if problem:
        raise ApiError(400, f"'{param}' must be plain JSON (finite numbers): {problem}",
                       param=param)
    size = len(canonical_json(arguments))
    if size > MAX_ARGUMENTS_BYTES:
        raise ApiError(400, f"'{param}' is {size} bytes of JSON; at most "
                       f"{MAX_ARGUMENTS_BYTES}", param=param)
    return arguments


MAX_BATCH = 64
BATCH_FIELDS = {"calls", "deadline_s", "max_attempts"}


def parse_batch(body: Any) -> tuple[list[Call], RetryPolicy]:
    """The calls and policy of a POST /v1/tools/dispatch body; ApiError(400)."""
    body = json_object(body, BATCH_FIELDS)
    raw = body.get("calls")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_BATCH:
        raise ApiError(400, f"'calls' must be a list of 1..{MAX_BATCH} calls "
                       '{"tool", "arguments"}', param="calls")
    calls = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) - {"tool", "arguments"}:
            raise ApiError(400, f'calls[{i}]: each call is {{"tool", "arguments"}}',
                           param=f"calls[{i}]")
        tool, arguments, _, _ = parse_call(item, f"calls[{i}].")
        calls.append(Call(tool, arguments))
    _, _, _, deadline = parse_call({"tool": "t", "deadline_s": body.get("deadline_s", 30.0)})
    attempts = body.get("max_attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
        raise ApiError(400, "'max_attempts' must be an integer in 1..10",
                       param="max_attempts")
    return calls, RetryPolicy(max_attempts=attempts, attempt_deadline_s=deadline)


def routes(tools: Tools) -> list[Route]:
    def peer_id(given: str) -> str:
        found = tools.find_peer(given)
        if found is None:
            raise ApiError(404, f"no live peer {given!r:.80} in the ledger (`peerd tools` "
                           "lists the peers that offer tools)", param="peer",
                           code="peer_not_found")
        return found

    @answering
    async def listing(request: Request) -> Response:
        given = request.query_params.get("peer")
        if given is None:
            own = tools.node.peer_id
            return JSONResponse([
                {"peer_id": o.peer, "peer_name": name, "tool": tool, "schema": o.schema,
                 "capacity": o.capacity, "self": o.peer == own}
                for tool, o, name in sorted(tools.offers(), key=lambda t: (t[0], t[1].peer))])
        peer = peer_id(given)
        specs = await tools.tools_of(peer)
        if isinstance(specs, ToolFailure):
            raise ApiError(502, f"peer {peer[-8:]} did not list its tools: {specs.message}",
                           "upstream_error", code=specs.code)
        return JSONResponse({"peer_id": peer, "tools": [
            {"name": s.name, "description": s.description, "inputSchema": s.input_schema,
             "outputSchema": s.output_schema, "schema": s.schema, "capacity": s.capacity}
            for s in specs]})

    @answering
    async def call(request: Request) -> Response:
        tool, arguments, given, deadline_s = parse_call(await read_json(request,
                                                                        MAX_BODY_BYTES))
        peer = peer_id(given) if given is not None else None
        try:
            outcome = await tools.call(tool, arguments, peer=peer, deadline_s=deadline_s)
        except NoOffer as exc:
            raise ApiError(404, str(exc), param="tool", code="no_offer") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return JSONResponse(outcome.to_json())

    @answering
    async def batch(request: Request) -> Response:
        calls, policy = parse_batch(await read_json(request, MAX_BATCH * MAX_BODY_BYTES))
        done = await tools.dispatch(calls, policy)
        return JSONResponse({"results": [d.to_json() for d in done]})

    return [Route("/v1/tools", listing), Route("/v1/tools/call", call, methods=["POST"]),
            Route("/v1/tools/dispatch", batch, methods=["POST"])]
