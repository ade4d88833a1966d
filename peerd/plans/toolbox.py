"""The tools a peer offers, and running one call of them: no network, no signing.

`Toolbox.execute(call, caller)` is the callee's whole rule for a call, in order:
the tool must be offered here; the caller's schema hash must be the tool's (else it
validated against another contract); the arguments must pass the inputSchema; the tool
must have a free slot of its capacity (else "busy", at once: a call is never queued);
the tool runs under the call's deadline; its result must be at most MAX_RESULT_BYTES
and pass the outputSchema. Every way out is a `CallResult` with an outcome and words,
never an exception: a bad call is an observation for whoever made it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import trio

from peerd.plans.nodes import GrammarTooLarge, grammar_size
from peerd.plans.schema import BadTool, Invalid, canonical_json
from peerd.plans.tool import Tool, ToolError, dump
from protocols import tool as wire
from protocols.tool import CallResult, ToolCall

log = logging.getLogger(__name__)


class Capacity:
    """At most `limit` calls of one tool at once; `try_enter` never waits. `peak` is the
    most ever held at once (the tests count it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.peak = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1  # no await between the test and this: one trio loop
        self.peak = max(self.peak, self.in_flight)
        return True

    def leave(self) -> None:
        assert self.in_flight > 0, "left a capacity never entered"
        self.in_flight -= 1


class Toolbox:
    def __init__(self, peer: str, tools: Iterable[Tool] = ()) -> None:
        self.peer = peer  # ours: the executing peer named in every result
        self.tools: dict[str, Tool] = {}
        self.capacity: dict[str, Capacity] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Offer `tool` (a tool of the same name is replaced; its calls in flight finish
        under the old capacity's count). BadTool for an inputSchema whose grammar passes
        MAX_NODES: every planner would refuse it, and count it against us."""
        if tool.name not in self.tools and len(self.tools) >= wire.MAX_TOOLS:
            raise ValueError(f"a peer offers at most {wire.MAX_TOOLS} tools")
        try:
            grammar_size(tool.input_schema)
        except GrammarTooLarge as exc:
            raise BadTool(f"{tool.name}: inputSchema: {exc}") from None
        self.tools[tool.name] = tool
        self.capacity[tool.name] = Capacity(tool.capacity)

    def withdraw(self, name: str) -> None:
        """Stop offering `name` (its calls in flight finish and leave their capacity)."""
        self.tools.pop(name, None)
        self.capacity.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self.tools)

    async def execute(self, call: ToolCall, caller: str) -> CallResult:
        started = time.monotonic()

        def answer(outcome: str, message: str = "", result: dict[str, object] | None = None,
                   schema: str = "") -> CallResult:
            return CallResult(call_id=call.call_id, caller=caller, peer=self.peer,
                              tool=call.tool, schema=schema, outcome=outcome,
                              result=result or {}, message=message[:wire.MAX_MESSAGE_CHARS],
                              elapsed_s=round(time.monotonic() - started, 6))

        tool = self.tools.get(call.tool)
        if tool is None:
            offered = ", ".join(self.names()) or "none"
            return answer(wire.UNKNOWN_TOOL, f"this peer offers no tool {call.tool!r:.80}; it "
                          f"offers: {offered}")
        if call.schema != tool.schema:
            return answer(wire.SCHEMA_MISMATCH, f"{tool.name} here has schema "
                          f"{tool.schema[:12]}…, not {call.schema[:12]}…: list this peer's "
                          "tools again and validate against the new schema",
                          schema=tool.schema)
        try:
            arguments = tool.arguments(call.arguments)
        except Invalid as exc:
            return answer(wire.INVALID_ARGUMENTS, f"arguments of {tool.name}: {exc}",
                          schema=tool.schema)
        capacity = self.capacity[tool.name]
        if not capacity.try_enter():
            return answer(wire.BUSY, f"{tool.name} is at its capacity ({capacity.limit} calls "
                          "at once) on this peer; try another peer or later",
                          schema=tool.schema)
        try:
            with trio.move_on_after(call.deadline_s) as scope:
                value = await tool.run(arguments)
        except ToolError as exc:
            return answer(wire.TOOL_ERROR, str(exc), schema=tool.schema)
        except Exception as exc:  # the tool's bug: say so, keep its insides to our log
            log.exception("tool %s raised", tool.name)
            return answer(wire.TOOL_ERROR, f"{tool.name} failed ({type(exc).__name__}); "
                          "see the executing peer's log", schema=tool.schema)
        finally:
            capacity.leave()
        if scope.cancelled_caught:
            return answer(wire.DEADLINE, f"{tool.name} did not finish within the call's "
                          f"deadline of {call.deadline_s:g} s", schema=tool.schema)
        outcome, message, result = _checked_result(tool, value)
        return answer(outcome, message, result, schema=tool.schema)


def _checked_result(tool: Tool, value: object) -> tuple[str, str, dict[str, object] | None]:
    """(outcome, message, result) for what the tool returned."""
    data = dump(value)
    try:
        size = len(canonical_json(data))
    except (TypeError, ValueError) as exc:
        return wire.INVALID_RESULT, f"{tool.name} returned no JSON: {exc}", None
    if size > wire.MAX_RESULT_BYTES:
        return (wire.OVERSIZED_RESULT, f"{tool.name}'s result is {size} bytes of JSON; at "
                f"most {wire.MAX_RESULT_BYTES} travel: ask for less", None)
    try:
        tool.result(data)
    except Invalid as exc:
        return wire.INVALID_RESULT, f"{tool.name}'s result breaks its outputSchema: {exc}", None
    return wire.OK, "", data
