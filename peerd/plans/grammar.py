"""Grammars of JSON text that a model's output must follow: `JsonGrammar` for one JSON
Schema, `StepGrammar` for a planner's step over the tools offered (the contract's
step format). Character level and pure: `start()` gives the automaton's state
(automaton.py), which says what may come next (`step` a character: dead when it may
not), whether the text is whole (`complete`, `finished`) and how many characters
would complete it (`shortest`). constrain.py lifts this to tokens.

The compact JSON a grammar admits always parses; it satisfies the schema where the
schema stays inside the subset nodes.py understands, and `check` validates it with
jsonschema in any case.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema

from peerd.plans.automaton import State
from peerd.plans.nodes import AnyOf, Array, Literal, Node, Object, compile_schema, dump

THOUGHT_CHARS = 300
ANSWER_CHARS = 500
MAX_CALLS = 8


class ToolSpecLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def input_schema(self) -> dict[str, Any]: ...


class GrammarViolation(ValueError):
    """Text that the grammar's schema refuses (it does not parse, or does not validate)."""


@dataclass(frozen=True, eq=False)
class JsonGrammar:
    """Compact JSON text of one value of `schema`."""

    schema: dict[str, Any]
    node: Node

    @classmethod
    def for_schema(cls, schema: dict[str, Any], *, string_cap: int | None = None
                   ) -> JsonGrammar:
        caps = {} if string_cap is None else {"string_cap": string_cap}
        return cls(schema, compile_schema(schema, **caps))

    def start(self) -> State:
        return State.begin(self.node)

    def accepts(self, text: str) -> bool:
        """`text` is a whole value of the grammar."""
        return self.start().advance(text).complete

    def check(self, text: str) -> Any:
        """The value `text` stands for; GrammarViolation if it does not parse or
        validate."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise GrammarViolation(f"not JSON: {exc}") from None
        self._validate(value)
        return value

    def _validate(self, value: Any) -> None:
        try:
            jsonschema.validate(value, self.schema)
        except jsonschema.ValidationError as exc:
            raise GrammarViolation(f"does not fit the schema: {exc.message}") from None


def step_schema(tools: Sequence[ToolSpecLike]) -> dict[str, Any]:
    """The step format as a JSON Schema, each call's arguments by its tool's schema."""
    return _step_schema([(t.name, t.input_schema) for t in tools])


def _step_schema(tools: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    thought = {"type": "string", "maxLength": THOUGHT_CHARS}
    calls = [{"type": "object", "additionalProperties": False,
              "required": ["tool", "arguments"],
              "properties": {"tool": {"const": name}, "arguments": schema}}
             for name, schema in tools]
    answer: dict[str, Any] = {
        "type": "object", "additionalProperties": False, "required": ["thought", "answer"],
        "properties": {"thought": thought,
                       "answer": {"type": "string", "maxLength": ANSWER_CHARS}}}
    if not calls:
        return answer
    acting = {"type": "object", "additionalProperties": False,
              "required": ["thought", "calls"],
              "properties": {"thought": thought,
                             "calls": {"type": "array", "minItems": 1, "maxItems": MAX_CALLS,
                                       "items": {"anyOf": calls}}}}
    return {"anyOf": [acting, answer]}


@dataclass(frozen=True, eq=False)
class StepGrammar(JsonGrammar):
    """One ReAct step: {"thought", "calls": [{"tool", "arguments"}, ...]} or
    {"thought", "answer"}; each call names an offered tool and its arguments follow
    that tool's inputSchema (its local $refs resolved within it)."""

    tools: tuple[ToolSpecLike, ...] = ()

    @classmethod
    def for_tools(cls, tools: Sequence[ToolSpecLike]) -> StepGrammar:  # type: ignore[override]
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"tools offered twice: {twice}")
        # each tool's schema is compiled against itself (its $refs point into it)
        args = {t.name: compile_schema(t.input_schema) for t in tools}
        schema = step_schema(tools)
        thought = compile_schema({"type": "string", "maxLength": THOUGHT_CHARS})
        answer = Object((dump("thought"), dump("answer")),
                        (thought, compile_schema({"type": "string",
                                                  "maxLength": ANSWER_CHARS})), (True, True))
        if not tools:
            return cls(schema, answer, ())
        call = AnyOf(tuple(Object((dump("tool"), dump("arguments")),
                                  (Literal((dump(n),)), args[n]), (True, True))
                           for n in names))
        acting = Object((dump("thought"), dump("calls")),
                        (thought, Array(call, 1, MAX_CALLS)), (True, True))
        return cls(schema, AnyOf((acting, answer)), tuple(tools))

    def _validate(self, value: Any) -> None:
        # the step's shape, then each call against its own tool's schema (so that a
        # tool's local $refs resolve)
        shape = _step_schema([(t.name, {"type": "object"}) for t in self.tools])
        try:
            jsonschema.validate(value, shape)
        except jsonschema.ValidationError as exc:
            raise GrammarViolation(f"not a step: {exc.message}") from None
        by_name = {t.name: t for t in self.tools}
        for call in value.get("calls", ()):
            try:
                jsonschema.validate(call["arguments"], by_name[call["tool"]].input_schema)
            except jsonschema.ValidationError as exc:
                raise GrammarViolation(f"{call['tool']}: {exc.message}") from None

