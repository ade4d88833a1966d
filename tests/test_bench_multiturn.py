"""The pure parts of scripts/bench_plans.py multiturn: BFCL's multi_turn_base cases, the
class -> tools mapping and the placement, a plan's record read as BFCL's decoded calls,
BFCL's own checker on them (the ground truth's calls -> success, a wrong call ->
failure), and one BFCL class served over MCP by bfcl_mcp_server.py (in-process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench_plans_multiturn import (
    CLASSES,
    PLACEMENT,
    Case,
    call_text,
    case_tools,
    class_docs,
    class_tools,
    executed_steps,
    goal_of,
    ground_truth_calls,
    load_cases,
    new_instance,
    peer_of,
    peer_texts,
    plan_step_counts,
    replayed,
    reset_tool,
    same_result,
    score,
    step_parses,
)
from bench_plans_multiturn_swarm import peer_args


def case(case_id: str = "multi_turn_base_0") -> Case:
    return next(c for c in load_cases(0, 27) if c.id == case_id)


def record_of(steps: list[list[tuple[str, dict[str, Any], str]]],
              status: str = "answered", unparsed: frozenset[int] = frozenset()
              ) -> dict[str, Any]:
    """A plan record as GET /v1/plans/{id} gives it, with (tool, arguments, code) calls;
    the steps numbered in `unparsed` did not parse."""
    return {"status": status, "steps": [
        {"step": i + 1, "thought": "t", "parsed": i + 1 not in unparsed, "calls": [
            {"call_id": f"{i + 1}.{j + 1}", "tool": tool, "arguments": args, "code": code,
             "ok": code == "ok", "peer": "P",
             "observation": json.dumps({"call": f"{i + 1}.{j + 1}", "tool": tool,
                                        "result": {"text": "r"}})}
            for j, (tool, args, code) in enumerate(calls)]}
        for i, calls in enumerate(steps)]}


def test_cases_load_with_their_turns_classes_and_ground_truth() -> None:
    cases = load_cases(0, 27)
    assert len(cases) == 200
    drawn = load_cases(3, 27)
    assert len(drawn) == 3 and drawn == load_cases(3, 27) and drawn != load_cases(3, 28)
    c = case()
    assert c.involved_classes == ("TwitterAPI", "GorillaFileSystem")
    assert len(c.turns) == len(c.ground_truth) == 4
    assert c.turns[0].startswith("Move 'final_report.pdf'")
    assert c.ground_truth[0][0] == "cd(folder='document')"
    assert "GorillaFileSystem" in c.initial_config


def test_each_class_maps_to_its_documented_methods_and_one_peer() -> None:
    assert sorted(c for held in PLACEMENT for c in held) == sorted(CLASSES)
    assert PLACEMENT[0] == ("MathAPI",)  # the planner's peer: the rest are remote
    for name in CLASSES:
        tools = class_tools(name)
        instance = new_instance(name, {})
        assert tools and all(callable(getattr(instance, t)) for t in tools)
        assert reset_tool(name) not in tools
    assert len({t for c in CLASSES for t in class_tools(c)}) == sum(
        len(class_tools(c)) for c in CLASSES)  # no method name in two classes
    c = case()
    assert case_tools(c) == class_tools("TwitterAPI") + class_tools("GorillaFileSystem")
    assert peer_of("GorillaFileSystem") == 1 and peer_of("MathAPI") == 0
    args = peer_args("py", "smollm2", 2)
    assert "--model" in args[0] and all("--model" not in a for a in args[1:])
    assert sum(a.count("--mcp") for a in args) == len(CLASSES)


def test_goal_carries_the_earlier_turns_within_the_limit() -> None:
    c = case()
    assert goal_of(c, 0) == f"Now do this: {c.turns[0]}"
    assert c.turns[0] in goal_of(c, 2) and goal_of(c, 2).endswith(c.turns[2])
    short = goal_of(c, 3, limit=400)
    assert len(short) <= 400 and short.endswith(c.turns[3]) and c.turns[0] not in short


def test_a_record_reads_as_bfcls_decoded_calls() -> None:
    assert call_text("mv", {"source": "a'b", "n": [1, True, None]}) == \
        "mv(source=\"a'b\", n=[1, True, None])"
    rec = record_of([[("cd", {"folder": "x"}, "ok"), ("ls", {"a": 1}, "invalid_arguments")],
                     [("ls", {}, "busy")], []])
    assert executed_steps(rec) == [["cd(folder='x')"]]
    assert peer_texts([rec]) == ["r"]
    assert step_parses(rec) == (3, 3)  # the last, with no calls, is the answer
    # a step whose calls a budget cut parsed: it has no calls, and counts
    assert step_parses(rec | {"status": "failed"}) == (3, 3)
    assert step_parses(record_of([[], []], status="failed",
                                 unparsed=frozenset({1}))) == (1, 2)


def ground_truth_records(c: Case) -> list[dict[str, Any]]:
    return [record_of([[(tool, args, "ok") for tool, args in turn]])
            for turn in ground_truth_calls(c)]


def test_bfcls_checker_passes_the_ground_truths_own_calls() -> None:
    for case_id in ("multi_turn_base_0", "multi_turn_base_1"):
        c = case(case_id)
        turns = [executed_steps(r) for r in ground_truth_records(c)]
        assert score(c, turns) == {"valid": True}
        assert score(c, turns) == {"valid": True}  # scored again: fresh instances


def test_bfcls_checker_fails_a_wrong_call_and_a_missing_turn() -> None:
    c = case()
    turns = [executed_steps(r) for r in ground_truth_records(c)]
    wrong = [[["cd(folder='document')", "mkdir(dir_name='tmp')",
               "mv(source='final_report.pdf', destination='tmp')"]], *turns[1:]]
    got = score(c, wrong)
    assert got["valid"] is False and got["error_type"] == \
        "multi_turn:instance_state_mismatch"
    got = score(c, turns[:2])  # the plans of turns 3 and 4 executed nothing
    assert got["valid"] is False and got["error_type"] == \
        "multi_turn:empty_turn_model_response"


def test_local_replay_gives_what_a_peer_returns() -> None:
    c = case()
    turns = [[["cd(folder='document')", "ls()"]]]
    got = replayed(c, turns)
    assert json.loads(got[0]) == {"current_working_directory": "document"}
    assert "final_report.pdf" in json.loads(got[1])["current_directory_content"]


def test_a_peers_result_matches_by_json_value_else_by_text() -> None:
    assert same_result('{"b": 1, "a": [2]}', '{"a": [2], "b": 1}')  # keys sorted on the wire
    assert not same_result('{"a": 1}', '{"a": 2}')
    assert same_result("None", "None") and not same_result("None", "none")


def test_plan_step_counts_from_metrics() -> None:
    text = ('# HELP peerd_plan_steps_total x\npeerd_plan_steps_total{constrained="no",'
            'parse="ok"} 3.0\npeerd_plan_steps_total{constrained="no",parse="not_json"} 2.0\n'
            'peerd_plan_steps_created{constrained="no",parse="ok"} 1.7e9\n')
    assert plan_step_counts(text) == {"ok/no": 3.0, "not_json/no": 2.0}


def test_the_mcp_server_offers_a_class_with_bfcls_schemas_and_a_reset() -> None:
    import bfcl_mcp_server
    from mcp_types import CallToolResult, TextContent

    c = case()

    async def main() -> None:
        server = bfcl_mcp_server.build("GorillaFileSystem")
        tools = {t.name: t for t in await server.list_tools()}
        assert set(tools) == {*class_tools("GorillaFileSystem"), "GorillaFileSystem.reset"}
        doc = next(d for d in class_docs("GorillaFileSystem") if d["name"] == "mv")
        schema = tools["mv"].input_schema
        jsonschema.Draft202012Validator.check_schema(schema)
        assert set(schema["properties"]) == set(doc["parameters"]["properties"])
        description = tools["mv"].description or ""
        assert description.startswith("Move a file or directory")
        assert doc["description"].endswith(description)
        await server.call_tool("GorillaFileSystem.reset",
                               {"config": c.initial_config["GorillaFileSystem"]})
        texts = []
        for name, args in (("cd", {"folder": "document"}), ("ls", {}),
                           ("cd", {"folder": "nowhere"})):
            got = await server.call_tool(name, args)
            assert isinstance(got, CallToolResult) and isinstance(got.content[0], TextContent)
            texts.append(got.content[0].text)
        assert texts == replayed(c, [[["cd(folder='document')", "ls()",
                                       "cd(folder='nowhere')"]]])

    anyio.run(main)


def test_every_ground_truth_passes_as_the_planners_calls() -> None:
    """All 200 cases: the ground truth turned into (tool, keyword arguments), as a plan
    records calls, and read back as BFCL's strings, is what BFCL's checker accepts."""
    for c in load_cases(0, 27):
        turns = [executed_steps(r) for r in ground_truth_records(c)]
        assert score(c, turns) == {"valid": True}, c.id
