"""The caller's side of `/peerd/tool/1.0.0`: list a peer's tools, call one.

Neither function raises for anything the callee does: a refusal, a forged or tampered
result, garbage, silence and a dead peer all come back as a typed `ToolFailure`, which
a planner can take as an observation. A result is believed only when it is signed by
the peer we called and answers our call (our call id, us as the caller, the tool we
named); anything else is counted against that peer as an offence.

`by` on a failure says whose word it is: "callee" (its signed outcome) or "caller"
(what we saw: unreachable, timeout, refused, malformed, forged). A stream that ends
without an answer because the peer's connection is closing (it left mid-call) is
`unreachable`, not an offence.

A peer's word travels on as JSON (the API's answers, the planner's observations, the
plan store), so a schema or a result that is not plain JSON (a NaN, bytes, a key that
is not a string: msgpack carries all three) is malformed, counted like any other lie.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import trio

from peerd.agents.sealing import unseal
from peerd.node import Node
from peerd.plans.schema import canonical_json, schema_hash
from peerd.rpc import call
from protocols import tool as wire
from protocols.errors import PeerError, RemoteError
from protocols.tool import CallResult, ToolCall, ToolReply, ToolRequest, ToolSpec

REPLY_MARGIN_S = 5.0  # past the call's deadline, for the callee's "deadline" answer
LIST_TIMEOUT_S = 10.0

# what the caller saw (the callee's outcomes are protocols.tool.OUTCOMES)
UNREACHABLE = "unreachable"  # no stream to the peer
TIMEOUT = "timeout"  # no answer within the deadline and the margin
REFUSED = "refused"  # the peer's stream layer refused the request (ErrorReply)
MALFORMED = "malformed"  # an answer that does not decode, or lies about its schemas
FORGED = "forged"  # not signed by the peer we called, or not an answer to our call


@dataclass(frozen=True, slots=True)
class ToolResult:
    peer: str
    tool: str
    call_id: str
    value: dict[str, Any]  # checked against the tool's outputSchema by the callee
    elapsed_s: float  # the callee's time running it
    ok = True

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "peer": self.peer, "tool": self.tool, "call_id": self.call_id,
                "result": self.value, "elapsed_s": self.elapsed_s}


@dataclass(frozen=True, slots=True)
class ToolFailure:
    peer: str
    tool: str
    call_id: str
    code: str  # a protocols.tool outcome (by the callee) or one of the above (by us)
    message: str
    by: str  # "callee" | "caller"
    schema: str = ""  # with schema_mismatch: the callee's current schema hash
    ok = False

    def to_json(self) -> dict[str, Any]:
        return {"ok": False, "peer": self.peer, "tool": self.tool, "call_id": self.call_id,
                "error": {"code": self.code, "message": self.message, "by": self.by,
                          **({"schema": self.schema} if self.schema else {})}}


Outcome = ToolResult | ToolFailure


def new_call_id() -> str:
    return uuid.uuid4().hex


def not_json(value: Any) -> str:
    """Why `value` is not plain JSON ("" when it is): a value the JSON it writes reads
    back as, with finite numbers, string keys and no bytes."""
    try:
        same = json.loads(canonical_json(value)) == value
    except (TypeError, ValueError, RecursionError) as exc:
        return f"{exc}"[:200] or type(exc).__name__
    return "" if same else "a key that is not a string"


async def call_tool(node: Node, peer: str, tool: str, schema: str, arguments: dict[str, Any],
                    *, deadline_s: float, call_id: str | None = None) -> Outcome:
    """Call `tool` on `peer` with `arguments`, validated against the schema `schema`
    names. ValueError only for a call we must not send (our bug or our user's: a bad
    name, hash or deadline, arguments over the size cap)."""
    call_id = call_id or new_call_id()
    request = ToolRequest(method=wire.CALL, call=ToolCall(
        call_id=call_id, tool=tool, schema=schema, arguments=arguments, deadline_s=deadline_s))
    try:
        request.check()
    except PeerError as exc:
        raise ValueError(f"not a call to send: {exc}") from None
    problem = not_json(arguments)
    if problem:
        raise ValueError(f"not a call to send: the arguments are not plain JSON ({problem})")
    size = len(canonical_json(arguments))
    if size > wire.MAX_ARGUMENTS_BYTES:
        raise ValueError(f"arguments are {size} bytes of JSON; at most "
                         f"{wire.MAX_ARGUMENTS_BYTES}")

    def failed(code: str, message: str) -> ToolFailure:
        return ToolFailure(peer, tool, call_id, code, message, "caller")

    reply = await _exchange(node, peer, request, deadline_s + REPLY_MARGIN_S)
    if isinstance(reply, tuple):
        return failed(*reply)
    if reply.result is None or reply.tools:
        node.offence(peer, "malformed", "a tools/call answered without one result")
        return failed(MALFORMED, "the peer answered the call without a result")
    try:
        result = unseal(reply.result.body, reply.result.sig, CallResult, lambda r: r.peer)
        result.check()
    except PeerError as exc:
        code = FORGED if exc.reason in ("bad_signature", "bad_peer_id") else MALFORMED
        node.offence(peer, f"tool_{code}", str(exc))
        return failed(code, f"the result does not verify: {exc}")
    problem = _not_ours(result, peer, node.peer_id, call_id, tool)
    if problem:
        node.offence(peer, "tool_forged", problem)
        return failed(FORGED, problem)
    if result.outcome == wire.OK:
        problem = not_json(result.result)
        if problem:
            node.offence(peer, f"tool_{MALFORMED}", f"a result that is not JSON: {problem}")
            return failed(MALFORMED, f"the result is not plain JSON ({problem})")
        return ToolResult(peer, tool, call_id, result.result, result.elapsed_s)
    return ToolFailure(peer, tool, call_id, result.outcome, result.message, "callee",
                       result.schema)


def _not_ours(result: CallResult, peer: str, caller: str, call_id: str, tool: str) -> str:
    """Why a verified result is no answer from `peer` to our call ("" if it is one)."""
    if result.peer != peer:
        return f"the result is signed by {result.peer[-8:]}, not by the peer called"
    if result.call_id != call_id or result.caller != caller:
        return "the result answers another call (call id or caller differ)"
    if result.tool != tool:
        return f"the result is of tool {result.tool!r:.80}, not {tool!r}"
    return ""


async def list_tools(node: Node, peer: str, timeout_s: float = LIST_TIMEOUT_S
                     ) -> list[ToolSpec] | ToolFailure:
    """`peer`'s tools in full; every spec's schema hash is recomputed here, and a peer
    whose schemas are not plain JSON, or whose hashes do not match them, is answered as
    malformed (none of its tools is taken)."""
    reply = await _exchange(node, peer, ToolRequest(method=wire.LIST), timeout_s)
    if isinstance(reply, tuple):
        return ToolFailure(peer, "", "", *reply, "caller")
    for spec in reply.tools:
        problem = not_json([spec.input_schema, spec.output_schema])
        if problem:
            problem = f"its schemas are not plain JSON ({problem})"
        elif schema_hash(spec.name, spec.input_schema, spec.output_schema) != spec.schema:
            problem = "its schema hash does not match its schemas"
        if problem:
            node.offence(peer, "malformed", f"tool {spec.name!r:.80}: {problem}")
            return ToolFailure(peer, spec.name, "", MALFORMED, f"the peer's tool "
                               f"{spec.name!r:.80}: {problem}", "caller")
    return list(reply.tools[:wire.MAX_TOOLS])


async def _exchange(node: Node, peer: str, request: ToolRequest, timeout_s: float
                    ) -> ToolReply | tuple[str, str]:
    """The peer's reply, or (code, message) for what went wrong on the way."""
    try:
        reply: ToolReply = await call(node.host, peer, wire.TOOL, request, timeout_s,
                                      dial=node.new_stream)
        return reply
    except trio.TooSlowError:
        return TIMEOUT, f"no answer within {timeout_s:g} s"
    except RemoteError as exc:  # its stream layer's refusal: too many streams from us...
        code = wire.BUSY if exc.code == "busy" else REFUSED
        return code, f"the peer refused the request ({exc.code}): {exc.message}"
    except PeerError as exc:
        if not node.link_up(peer):  # its streams ended with its connection: it left
            return UNREACHABLE, f"the peer's connection closed during the call ({exc})"
        node.offence(peer, exc.reason, str(exc))
        return MALFORMED, f"the peer answered garbage: {exc}"
    except Exception as exc:  # the transport's many errors: the peer is not there
        return UNREACHABLE, f"cannot reach the peer ({type(exc).__name__}: {exc})"[:300]
