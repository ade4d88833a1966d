"""The step format: what the planner's model writes at each ReAct step, and its parse.

One JSON object a step (docs/plans.md, the contract the grammar also builds on):

    {"thought": "...", "calls": [{"tool": NAME, "arguments": {...}}, ...]}   1..8 calls
    {"thought": "...", "answer": "..."}

`parse_step(text, checks)` reads a model's text into a `Step` or raises `Unparsed`
with the kind of failure (`not_json`, `bad_step`, `bad_call`) and words a model can act
on. It is lenient where that costs nothing: a ```json fence and text after the object
are ignored, a thought or an answer over its length is cut. It is strict where a call
would go wrong: each call names an offered tool and its arguments pass that tool's
inputSchema (`checks`), before anything is dispatched. Under constrained decoding the
output always parses; without it, a failure is an observation for the next step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from peerd.plans.schema import Invalid

MAX_THOUGHT_CHARS = 300
MAX_ANSWER_CHARS = 500
MAX_CALLS = 8
MAX_STEP_CHARS = 16 * 1024  # a step's text: more is not a step

NOT_JSON, BAD_STEP, BAD_CALL = "not_json", "bad_step", "bad_call"
PARSED = "ok"

Checks = Mapping[str, Callable[[Any], Any]]  # offered tool -> its inputSchema's check


@dataclass(frozen=True, slots=True)
class StepCall:
    tool: str
    arguments: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"tool": self.tool, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class Step:
    thought: str
    calls: tuple[StepCall, ...] = ()
    answer: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.answer is not None:
            return {"thought": self.thought, "answer": self.answer}
        return {"thought": self.thought, "calls": [c.to_json() for c in self.calls]}

    def text(self) -> str:
        """The step as the contract writes it (what a transcript shows)."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(", ", ": "))


class Unparsed(ValueError):
    """A step that does not parse; `kind` is not_json, bad_step or bad_call."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


SHAPE = ('one JSON object: {"thought": "...", "calls": [{"tool": "NAME", "arguments": '
         '{...}}]} or {"thought": "...", "answer": "..."}')


def parse_step(text: str, checks: Checks) -> Step:
    """The step in `text`; Unparsed naming what is wrong."""
    value = _first_object(text)
    if not isinstance(value, dict):
        raise Unparsed(BAD_STEP, f"the step must be {SHAPE}")
    unknown = sorted(set(value) - {"thought", "calls", "answer"})
    if unknown:
        raise Unparsed(BAD_STEP, f"unknown key {unknown[0]!r:.40}; the step is {SHAPE}")
    thought = value.get("thought", "")
    if not isinstance(thought, str):
        raise Unparsed(BAD_STEP, '"thought" must be a string')
    thought = thought[:MAX_THOUGHT_CHARS]
    has_calls, has_answer = "calls" in value, "answer" in value
    if has_calls == has_answer:
        raise Unparsed(BAD_STEP, 'a step has either "calls" or "answer", one of them')
    if has_answer:
        answer = value["answer"]
        if not isinstance(answer, str | int | float) or isinstance(answer, bool):
            raise Unparsed(BAD_STEP, '"answer" must be a string')
        return Step(thought, answer=str(answer)[:MAX_ANSWER_CHARS])
    raw = value["calls"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CALLS:
        raise Unparsed(BAD_STEP, f'"calls" must be a list of 1..{MAX_CALLS} calls')
    return Step(thought, calls=tuple(_call(i, c, checks) for i, c in enumerate(raw, 1)))


def _first_object(text: str) -> Any:
    if len(text) > MAX_STEP_CHARS:
        raise Unparsed(NOT_JSON, f"the step is over {MAX_STEP_CHARS} characters")
    start = text.find("{")
    if start < 0:
        raise Unparsed(NOT_JSON, f"no JSON object in the step; write {SHAPE}")
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError) as exc:
        what = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep"
        raise Unparsed(NOT_JSON, f"the step is not valid JSON ({what}); write {SHAPE}"
                       ) from None
    return value


def _call(i: int, raw: Any, checks: Checks) -> StepCall:
    if not isinstance(raw, dict) or set(raw) - {"tool", "arguments"} or "tool" not in raw:
        raise Unparsed(BAD_STEP, f'call {i} must be {{"tool": "NAME", "arguments": {{...}}}}')
    tool, arguments = raw["tool"], raw.get("arguments", {})
    if not isinstance(tool, str) or tool not in checks:
        raise Unparsed(BAD_CALL, f"call {i} names no offered tool ({str(tool)!r:.60}); the "
                       f"tools are {', '.join(sorted(checks))}")
    if not isinstance(arguments, dict):
        raise Unparsed(BAD_CALL, f'call {i} ({tool}): "arguments" must be an object')
    try:
        checks[tool](arguments)
    except Invalid as exc:
        raise Unparsed(BAD_CALL, f"call {i} ({tool}): {exc}") from None
    return StepCall(tool, arguments)
