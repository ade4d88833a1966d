"""The pure parts of scripts/bench_plans.py: BFCL's function docs as JSON Schema, the
model's text read as BFCL's model-output format, the fan-out workload and its ideal
makespan, and the callee's count of executions against capacity."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench_plans_bfcl import (
    BadDoc,
    bfcl_schema,
    call_list_schema,
    parse_calls,
)
from bench_plans_schedule import CapacityMeter, Workload

DOC: dict[str, Any] = {
    "name": "geo.route",
    "description": "A route.",
    "parameters": {
        "type": "dict",
        "properties": {
            "start": {"type": "tuple", "items": {"type": "float"}, "description": "x, y"},
            "mode": {"type": "string", "enum": ["car", "bike"], "default": "car"},
            "stops": {"type": "integer", "optional": True, "maximum": 5},
            "extra": {"type": "any"},
            "avoid": {"type": "array", "items": {"type": "dict", "properties": {
                "kind": {"type": "string"}}, "required": ["kind"]}},
            "labels": {"type": "dict", "description": "free-form"},
            "fast": {"type": "boolean"},
        },
        "required": ["start", "ghost"],
    },
}


def valid(schema: dict[str, Any], value: Any) -> bool:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def test_bfcl_types_become_json_schema() -> None:
    got = bfcl_schema(DOC["parameters"])
    props = got["properties"]
    assert got["type"] == "object" and got["additionalProperties"] is False
    assert got["required"] == ["start"]  # "ghost" names no property: dropped
    assert props["start"] == {"type": "array", "items": {"type": "number"},
                              "description": "x, y"}
    assert props["mode"] == {"type": "string", "enum": ["car", "bike"]}  # no default
    assert props["stops"] == {"type": "integer", "maximum": 5}  # no "optional"
    assert props["extra"] == {"type": "string"}  # BFCL checks "any" as a str
    assert props["avoid"]["items"] == {"type": "object", "properties": {
        "kind": {"type": "string"}}, "required": ["kind"], "additionalProperties": False}
    assert props["labels"] == {"type": "object", "description": "free-form"}
    assert props["fast"] == {"type": "boolean"}
    for bad in ({"type": "complex"}, {"description": "no type"}):
        with pytest.raises(BadDoc):
            bfcl_schema(bad)


def test_the_call_list_schema_takes_valid_calls_only() -> None:
    other = {"name": "ping", "description": "", "parameters": {
        "type": "dict", "properties": {}, "required": []}}
    schema = call_list_schema([DOC, other], max_calls=2)
    call = {"function": "geo.route", "parameters": {"start": [1, 2.5], "labels": {"a": 1}}}
    assert valid(schema, [call, {"function": "ping", "parameters": {}}])
    assert not valid(schema, [])  # at least one call
    assert not valid(schema, [call] * 3)  # at most max_calls
    assert not valid(schema, [{"function": "nope", "parameters": {}}])
    assert not valid(schema, [{"function": "geo.route", "parameters": {}}])  # start
    assert not valid(schema, [{"function": "geo.route", "parameters": {
        "start": [1], "stops": 1.5}}])  # an integer
    assert not valid(schema, [{"function": "geo.route", "parameters": {
        "start": [1], "speed": 3}}])  # no such parameter
    assert not valid(schema, [call | {"why": "x"}])
    single = call_list_schema([other])
    assert "anyOf" not in single["items"] and valid(single, [{"function": "ping",
                                                             "parameters": {}}])


def test_the_models_text_is_read_as_bfcl_calls() -> None:
    calls = [{"function": "f", "parameters": {"a": 1}},
             {"function": "g.h", "parameters": {"b": [1, "x"], "c": {"d": None}}}]
    want = [{"f": {"a": 1}}, {"g.h": {"b": [1, "x"], "c": {"d": None}}}]
    text = json.dumps(calls)
    assert parse_calls(text) == want
    assert parse_calls(f"```json\n{text}\n```") == want
    assert parse_calls(f"Sure! Here you go: {text} Hope it helps.") == want
    assert parse_calls('{"function": "f", "parameters": {"a": 1}}') == want[:1]
    assert parse_calls('[{"name": "f", "arguments": {"a": 1}}]') == want[:1]
    # a brace before the calls that is not JSON is skipped
    assert parse_calls("use {braces} like " + text) == want
    for bad in ("", "I cannot help with that.", "[]", "[f(a=1)]", '[{"function": "f"}]',
                '[{"function": "f", "parameters": [1]}]', '[{"function": 3, '
                '"parameters": {}}]', '[{"function": "f", "parameters": {"a": 1}', "[1, 2]"):
        assert parse_calls(bad) is None, bad


def test_bfcl_checker_scores_parsed_calls() -> None:
    pytest.importorskip("bfcl_eval")
    from bench_plans_bfcl import Question, check, load_questions, system_prompt

    q = Question("simple_python_0", "simple",
                 ({"role": "user", "content": "Area of a triangle, base 10, height 5."},),
                 ({"name": "calculate_triangle_area", "description": "Area.",
                   "parameters": {"type": "dict", "properties": {
                       "base": {"type": "integer"}, "height": {"type": "integer"},
                       "unit": {"type": "string"}}, "required": ["base", "height"]}},),
                 ({"calculate_triangle_area": {"base": [10], "height": [5],
                                               "unit": ["units", ""]}},))
    right = parse_calls('[{"function": "calculate_triangle_area", '
                        '"parameters": {"base": 10, "height": 5}}]')
    wrong = parse_calls('[{"function": "calculate_triangle_area", '
                        '"parameters": {"base": 10, "height": 6}}]')
    assert right is not None and wrong is not None
    assert check(q, right)["valid"] is True
    assert check(q, wrong)["valid"] is False
    assert "calculate_triangle_area" in system_prompt(q) and '"function"' in system_prompt(q)
    drawn = load_questions("parallel", 5, seed=1)
    assert len(drawn) == 5 and drawn == load_questions("parallel", 5, seed=1)
    assert all(q.id.startswith("parallel_") and q.answer for q in drawn)


def test_the_workload_is_drawn_from_its_seed() -> None:
    w = Workload.draw(40, 0.5, 2.0, seed=27)
    assert len(w.durations) == 40 and w == Workload.draw(40, 0.5, 2.0, seed=27)
    assert w != Workload.draw(40, 0.5, 2.0, seed=28)
    assert all(0.5 <= d <= 2.0 for d in w.durations)
    with pytest.raises(ValueError):
        Workload.draw(0, 0.5, 2.0, seed=1)


def test_the_ideal_makespan_and_list_scheduling() -> None:
    w = Workload((2.0, 1.0, 1.0, 1.0, 1.0))
    assert w.total_s == 6.0 and w.longest_s == 2.0
    assert w.ideal_s(1) == 6.0
    assert w.ideal_s(2) == 3.0  # the work spread over two slots
    assert w.ideal_s(8) == 2.0  # never under the longest call
    # in order: slot A 2.0; slot B 1+1+1 = 3.0, then the last 1.0 on A: 3.0
    assert w.list_schedule_s(2) == 3.0
    assert Workload((1.0, 1.0, 2.0)).list_schedule_s(2) == 3.0  # the long one last
    assert w.list_schedule_s(1) == 6.0
    with pytest.raises(ValueError):
        w.ideal_s(0)


def test_the_capacity_meter_counts_violations() -> None:
    meter = CapacityMeter()
    meter.declare("p1", "work", 2)
    meter.declare("p2", "work", 1)
    meter.enter("p1", "work")
    meter.enter("p1", "work")
    meter.enter("p2", "work")
    assert meter.violations == 0
    meter.enter("p1", "work")  # a third on a capacity of 2
    meter.leave("p1", "work")
    meter.leave("p1", "work")
    meter.enter("p1", "work")  # back to 2: within
    assert meter.violations == 1 and meter.peak[("p1", "work")] == 3
    got = meter.to_json()
    assert got["violations"] == 1 and got["peak_over_capacity"] == 1
    assert got["executions"] == 5
    meter.leave("p2", "work")
    with pytest.raises(AssertionError):
        meter.leave("p2", "work")


async def test_the_constrained_arm_hands_each_question_its_grammar(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The arm's wiring against the grammar slice's contract (JsonGrammar.for_schema,
    GrammarConstraint(grammar, vocab), complete(..., constraint=)), with stand-ins."""
    pytest.importorskip("bfcl_eval")
    import types
    from dataclasses import dataclass

    from bench_plans_bfcl import NOT_AVAILABLE, answer_all, constraint_support, load_questions

    @dataclass
    class Stats:
        completion_tokens: int = 7
        prompt_tokens: int = 100
        steps: int = 8

    @dataclass
    class Done:
        text: str
        stats: Stats

    class Face:
        tokenizer = "tok"

        def __init__(self) -> None:
            self.constraints: list[Any] = []

        async def prepare_chat(self, messages: Any, params: Any, speculative: Any) -> Any:
            assert messages[0]["role"] == "system" and not speculative.enabled
            return messages

        async def complete(self, request: Any, *, constraint: Any = None) -> Done:
            self.constraints.append(constraint)
            return Done('[{"function": "nope", "parameters": {}}]', Stats())

    class OldFace(Face):
        async def complete(self, request: Any) -> Done:  # type: ignore[override]
            raise AssertionError

    grammar = types.ModuleType("peerd.plans.grammar")
    grammar.JsonGrammar = types.SimpleNamespace(  # type: ignore[attr-defined]
        for_schema=lambda schema: ("grammar", schema["type"]))
    constrain = types.ModuleType("peerd.plans.constrain")
    constrain.Vocab = types.SimpleNamespace(  # type: ignore[attr-defined]
        from_tokenizer=lambda tok: ("vocab", tok))
    constrain.GrammarConstraint = lambda g, v: (g, v)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "peerd.plans.grammar", grammar)
    monkeypatch.setitem(sys.modules, "peerd.plans.constrain", constrain)
    assert isinstance(constraint_support(OldFace()), str)
    face = Face()
    maker = constraint_support(face)
    assert callable(maker)
    questions = load_questions("simple", 2, seed=3)
    arm = await answer_all(face, questions, "constrained", 32, maker, progress=lambda s: None)
    assert face.constraints == [(("grammar", "array"), ("vocab", "tok"))] * 2
    s = arm.summary()
    assert (s["n"], s["parsed"], s["correct"], s["mean_tokens"]) == (2, 2, 0, 7)
    monkeypatch.setitem(sys.modules, "peerd.plans.grammar", None)  # import fails
    assert constraint_support(face) == NOT_AVAILABLE
