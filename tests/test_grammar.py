"""The JSON Schema grammar (peerd/plans/grammar.py, nodes.py, automaton.py): pure, no
model. What it admits parses and validates; what it refuses is refused as early as a
prefix shows it; the shortest completion is exact; a random walk under the grammar
always ends in a valid value."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

from peerd.plans.grammar import (
    ANSWER_CHARS,
    MAX_CALLS,
    THOUGHT_CHARS,
    GrammarViolation,
    JsonGrammar,
    StepGrammar,
)


def alive(grammar: JsonGrammar, text: str) -> bool:
    return not grammar.start().advance(text).dead


PERSON = {
    "type": "object", "additionalProperties": False, "required": ["name", "age"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "nick": {"type": "string", "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", 3, None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                 "minItems": 1, "maxItems": 2},
        "home": {"type": "object", "properties": {"x": {"type": "number"},
                                                  "ok": {"type": "boolean"}},
                 "required": ["x"], "additionalProperties": False},
    },
}


@pytest.mark.parametrize("text", [
    '{"name":"Al","age":3}',
    '{"name":"Al","nick":"","age":130,"role":"admin"}',
    '{"name":"A\\"b\\\\c\\n","age":0,"role":null,"tags":["x","yz"]}',
    '{"name":"é","age":7,"role":3,"home":{"x":-0.5e3,"ok":true}}',
    '{"name":"x","age":42,"home":{"x":0}}',
])
def test_valid_values_are_admitted_and_validate(text: str) -> None:
    grammar = JsonGrammar.for_schema(PERSON)
    state = grammar.start().advance(text)
    assert state.complete and state.finished and state.shortest() == 0
    jsonschema.validate(grammar.check(text), PERSON)
    for i in range(len(text)):  # every prefix is alive and not yet whole
        assert alive(grammar, text[:i]) and not grammar.start().advance(text[:i]).complete


@pytest.mark.parametrize(("text", "why"), [
    ('{ ', "whitespace"),
    ('{"a', "required name skipped"),
    ('{"name":"Al","age":3,"n', "properties out of schema order"),
    ('{"name":""', "minLength"),
    ('{"name":"12345678901', "maxLength"),
    ('{"name":"a\\u', "\\u escapes are refused"),
    ('{"name":"a\\x', "a bad escape"),
    ('{"name":"a\n', "a raw control character"),
    ('{"name":"a","age":131', "above maximum"),
    ('{"name":"a","age":-', "below minimum"),
    ('{"name":"a","age":01', "a leading zero"),
    ('{"name":"a","age":1.', "a fraction in an integer"),
    ('{"name":"a","age":1,"role":"adm1', "not an enum value"),
    ('{"name":"a","age":1,"tags":[]', "minItems"),
    ('{"name":"a","age":1,"tags":["a","b",', "maxItems"),
    ('{"name":"a","age":1,"home":{"o', "required x skipped"),
    ('{"name":"a","age":1,"e', "an undeclared property"),
    ('{"name":"a","age":1}}', "text after the value"),
    ('{"name":"a","age":1,}', "a trailing comma"),
])
def test_invalid_text_is_refused_at_the_first_wrong_character(text: str, why: str) -> None:
    grammar = JsonGrammar.for_schema(PERSON)
    assert not alive(grammar, text), why
    assert alive(grammar, text[:-1]), why


@pytest.mark.parametrize(("schema", "good", "bad"), [
    ({"type": "number"}, ["-0.5e3", "0", "12.25", "1E+2", "-7"], ["01", "1.", "-", ".5", "1e"]),
    ({"type": "integer", "exclusiveMinimum": 5, "maximum": 12}, ["6", "9", "12"],
     ["5", "13", "0", "-6"]),
    ({"type": "integer", "minimum": -20, "maximum": -10}, ["-10", "-20", "-15"],
     ["-9", "-21", "10", "-1"]),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, ["7", "null"], ["true", '"7"']),
    ({"type": ["string", "boolean"]}, ['"x"', "false"], ["null", "1"]),
    ({"const": {"a": [1, 2]}}, ['{"a":[1,2]}'], ['{"a":[1]}', '{"a":[1,2,3]}']),
    ({"enum": [1, 12]}, ["1", "12"], ["2", "123"]),
    ({"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}, ["[]", '["a","b","a"]'],
     ['["c"]', '["a","a","a","a"]']),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, ["{}", '{"k":1,"j":2}'],
     ['{"k":"1"}']),
    ({"type": "object", "properties": {}, "additionalProperties": False}, ["{}"], ['{"a":1}']),
    ({"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     ['{"a":1}', '{"b":"x"}'], ['{"a":"x"}', '{"b":1}', "{}"]),
])
def test_numbers_bounds_enums_arrays_any_of(schema: dict[str, Any], good: list[str],
                                            bad: list[str]) -> None:
    grammar = JsonGrammar.for_schema(schema)
    for text in good:
        assert grammar.accepts(text), text
        grammar.check(text)
    for text in bad:
        assert not grammar.accepts(text), text


def test_what_it_does_not_understand_is_any_bounded_value_checked_afterwards() -> None:
    grammar = JsonGrammar.for_schema({"type": "string", "pattern": "^a+$"})
    assert grammar.accepts('"abc"')  # the pattern is not enforced while decoding...
    with pytest.raises(GrammarViolation):
        grammar.check('"abc"')  # ...but validated
    anything = JsonGrammar.for_schema({"not": {"type": "string"}})
    for text in ['"x"', "1", '{"a":[true,null]}', "[]"]:
        assert anything.accepts(text), text
    assert not anything.accepts('{"a" : 1}')


@pytest.mark.parametrize(("schema", "prefix", "shortest"), [
    (PERSON, "", len('{"name":"x","age":0}')),
    (PERSON, '{"name":"Al', len('","age":0}')),
    (PERSON, '{"name":"Al","nick":"', len('","age":0}')),
    (PERSON, '{"name":"Al","age":1', 1),
    (PERSON, '{"name":"Al","age":1,"home":{"x":', len('0}}')),
    (PERSON, '{"name":"Al","age":1,"role":"ad', len('min"}')),
    (PERSON, '{"name":"Al","age":1,"tags":[', len('""]}')),
    (PERSON, '{"name":"\\', len('n","age":0}')),
    ({"type": "integer", "minimum": 100}, "", 3),
    ({"type": "integer", "minimum": 100}, "5", 2),
    ({"type": "integer", "maximum": -100}, "", 4),
    ({"type": "number"}, "-1.", 1),
    ({"type": "array", "items": {"type": "boolean"}, "minItems": 2}, "[", len("true,true]")),
])
def test_shortest_completion(schema: dict[str, Any], prefix: str, shortest: int) -> None:
    assert JsonGrammar.for_schema(schema).start().advance(prefix).shortest() == shortest


# ---- the step format ---------------------------------------------------------------------

class Unit(BaseModel):
    name: str = Field(max_length=8)
    factor: float = 1.0


class ConvertArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int = Field(ge=-1000, le=1000)
    to: Unit  # a $ref into the schema's $defs
    exact: bool | None = None


@dataclass(frozen=True)
class Spec:
    name: str
    input_schema: dict[str, Any]


TOOLS = [
    Spec("calculator", {"type": "object", "additionalProperties": False,
                        "required": ["expression"],
                        "properties": {"expression": {"type": "string", "minLength": 1,
                                                      "maxLength": 40}}}),
    Spec("convert", ConvertArgs.model_json_schema()),
    Spec("search", {"type": "object", "properties": {
        "query": {"type": "string"}, "k": {"type": "integer", "minimum": 1, "maximum": 5},
        "mode": {"enum": ["fast", "deep"]}}, "required": ["query"]}),
]


def test_a_step_calls_offered_tools_with_typed_arguments() -> None:
    grammar = StepGrammar.for_tools(TOOLS)
    step = ('{"thought":"Two things at once.","calls":[{"tool":"calculator","arguments":'
            '{"expression":"2*(3+4)"}},{"tool":"convert","arguments":{"value":-5,"to":'
            '{"name":"km","factor":0.001},"exact":null}},{"tool":"search","arguments":'
            '{"query":"peerd","mode":"deep"}}]}')
    assert grammar.accepts(step)
    assert [c["tool"] for c in grammar.check(step)["calls"]] == ["calculator", "convert",
                                                                "search"]
    answer = '{"thought":"Done.","answer":"14"}'
    assert grammar.accepts(answer) and grammar.check(answer)["answer"] == "14"
    for bad in ['{"thought":"x","calls":[{"tool":"shell"',  # no such tool
                '{"thought":"x","calls":[]',  # at least one call
                '{"thought":"x","calls":[{"tool":"convert","arguments":{"value":"5"',
                '{"thought":"x","calls":[{"tool":"convert","arguments":{"value":1001',
                '{"thought":"x","calls":[{"tool":"search","arguments":{"query":"q","mode":"slow',
                '{"calls"',  # thought first
                '{"thought":"x","answer":"y","calls"']:
        assert not alive(grammar, bad), bad
    calls = ",".join(['{"tool":"calculator","arguments":{"expression":"1"}}'] * (MAX_CALLS + 1))
    assert not grammar.accepts('{"thought":"","calls":[' + calls + "]}")
    assert not alive(grammar, '{"thought":"' + "x" * (THOUGHT_CHARS + 1))
    assert not alive(grammar, '{"thought":"","answer":"' + "x" * (ANSWER_CHARS + 1))
    with pytest.raises(ValueError, match="twice"):
        StepGrammar.for_tools([TOOLS[0], TOOLS[0]])


def test_the_forced_text_is_what_no_choice_can_change() -> None:
    """State.forced: the characters that must come next, up to the first choice."""
    one = StepGrammar.for_tools(TOOLS[:1])
    at = one.start()
    assert at.forced(64) == '{"thought":"'
    assert at.forced(3) == '{"t'  # at most the limit
    at = at.advance('{"thought":"Sum."')  # then calls or an answer: ',"' before the choice
    assert at.forced(64) == ',"'
    # a lone tool's name is forced too, up to its arguments' free value
    assert at.advance(',"c').forced(64) == 'alls":[{"tool":"calculator","arguments":{"expression":"'
    assert StepGrammar.for_tools(TOOLS).start().advance(
        '{"thought":"","calls":[{"tool":"').forced(64) == ""  # three tools: a choice
    assert at.advance(',"answer":"42"').forced(64) == "}"
    assert at.advance(',"answer":"42"}').forced(64) == ""  # complete: nothing more
    # every forced prefix is alive, and a different character there is refused
    text = '{"thought":"Sum.","c'
    forced = one.start().advance(text).forced(64)
    for i, c in enumerate(forced):
        assert one.start().advance(text + forced[:i] + ("x" if c != "x" else "y")).dead


def test_without_tools_a_step_is_an_answer() -> None:
    grammar = StepGrammar.for_tools([])
    assert grammar.accepts('{"thought":"","answer":""}')
    assert not alive(grammar, '{"thought":"","c')


# ---- random walks ---------------------------------------------------------------------------

POOL = [*'abz Z09-+.eE"\\/ntu:,{}[]é', "\u4e2d"]


def random_text(grammar: JsonGrammar, rng: random.Random, budget: int) -> str:
    """Characters chosen at random among those the grammar allows, closing in time:
    a character is taken only if the value can still be completed within the budget."""
    state, text = grammar.start(), ""
    while not state.finished:
        if state.complete and rng.random() < 0.2:
            break
        chars = state.next_chars()
        options = [c for c in (POOL if chars is None else sorted(chars))
                   if not (after := state.step(c)).dead
                   and after.shortest() <= budget - len(text) - 1]
        assert options, (text, budget)
        c = rng.choice(options)
        state, text = state.step(c), text + c
    assert state.complete and len(text) <= budget
    return text


@pytest.mark.parametrize("seed", range(40))
def test_random_walks_always_end_in_valid_values(seed: int) -> None:
    rng = random.Random(seed)
    step = StepGrammar.for_tools(TOOLS)
    text = random_text(step, rng, 260)
    value = step.check(text)  # parses and validates, each call against its tool
    assert value["thought"] is not None
    person = JsonGrammar.for_schema(PERSON)
    jsonschema.validate(json.loads(random_text(person, rng, 120)), PERSON)
