"""The planner's rules (plans/planner.py, step.py) without a network: a scripted thinker,
an explicit clock, and the driver (plans/run.py) over trio's autojumping clock with a
scripted dispatcher."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from peerd.plans import builtins
from peerd.plans.planner import (
    ASYNC,
    SYNC,
    Budget,
    Dispatch,
    Finished,
    Planner,
    Think,
    Transcript,
    Wait,
)
from peerd.plans.run import Attempted, Ended, run_plan
from peerd.plans.step import BAD_CALL, NOT_JSON, PARSED, Unparsed, parse_step
from peerd.plans.thinker import ScriptedThinker, messages_of
from peerd.plans.tool import Tool

CALC = builtins.calculator()
TOOLS: list[Tool] = [CALC]


def calls(*exprs: str, thought: str = "compute") -> str:
    return json.dumps({"thought": thought, "calls": [
        {"tool": "calculator", "arguments": {"expression": e}} for e in exprs]})


def answer(text: str) -> str:
    return json.dumps({"thought": "done", "answer": text})


def planner(mode: str = SYNC, budget: Budget | None = None, **kw: Any) -> Planner:
    return Planner("p1", "add things", TOOLS, budget or Budget(), mode, 0.0, 1000.0, **kw)


def kinds(p: Planner) -> list[str]:
    return [k for k, _ in p.take_events()]


# ---- the step format ----------------------------------------------------------------

def test_a_step_parses_or_says_why() -> None:
    checks = {"calculator": CALC.arguments}
    step = parse_step('```json\n' + calls("1 + 1") + '\n``` trailing', checks)
    assert step.calls[0].arguments == {"expression": "1 + 1"}
    assert parse_step(answer("2"), checks).answer == "2"
    for text, kind, words in [
            ("no json here", NOT_JSON, "no JSON object"),
            ('{"thought": "x", "calls": [', NOT_JSON, "not valid JSON"),
            ('{"thought": "x"}', "bad_step", "either"),
            ('{"thought": "x", "calls": []}', "bad_step", "1..8"),
            ('{"thought": "x", "calls": [{"tool": "shell", "arguments": {}}]}', BAD_CALL,
             "no offered tool"),
            ('{"thought": "x", "calls": [{"tool": "calculator", "arguments": {"expression":'
             ' 7}}]}', BAD_CALL, "expression")]:
        with pytest.raises(Unparsed, match=words) as info:
            parse_step(text, checks)
        assert info.value.kind == kind


# ---- the state machine --------------------------------------------------------------

def test_an_answer_in_one_step() -> None:
    p = planner()
    assert isinstance(p.next(0.0), Think)
    assert p.stepped(answer("42"), 7, 1.0) == PARSED
    done = p.next(1.0)
    assert done == Finished("answered", "42", "")
    assert kinds(p) == ["plan.created", "plan.thought", "plan.answer"]
    rec = p.record(1.0)
    assert rec["status"] == "answered" and rec["used"] == {
        "steps": 1, "tokens": 7, "wall_s": 1.0, "calls": 0}
    assert rec["finished"] == 1001.0


def test_a_steps_calls_go_out_together_and_sync_waits_for_all() -> None:
    p = planner()
    p.next(0.0)
    p.stepped(calls("1 + 1", "2 * 3"), 10, 1.0)
    action = p.next(1.0)
    assert isinstance(action, Dispatch) and [c.call_id for c in action.calls] == ["1.1", "1.2"]
    assert isinstance(p.next(1.0), Wait)
    p.ended("1.1", ok=True, code="ok", peer="A", elapsed_s=0.1, attempts=1,
            result={"value": "2"})
    assert isinstance(p.next(1.1), Wait)  # sync: the other call first
    p.ended("1.2", ok=True, code="ok", peer="B", elapsed_s=0.2, attempts=1,
            result={"value": "6"})
    think = p.next(1.2)
    assert isinstance(think, Think)
    (turn,) = think.transcript.turns
    assert [json.loads(o)["result"] for o in turn.observations] == [
        {"value": "2"}, {"value": "6"}]


def test_a_failed_call_is_an_observation_and_a_replan() -> None:
    p = planner()
    p.next(0.0)
    p.stepped(calls("1 / 0"), 10, 0.0)
    p.next(0.0)
    p.attempted("1.1", "A", "busy", "full")
    p.ended("1.1", ok=False, code="tool_error", peer="B", elapsed_s=0.1, attempts=2,
            message="division by zero")
    assert kinds(p)[-4:] == ["plan.call", "plan.retry", "plan.result", "plan.replan"]
    think = p.next(0.2)
    assert isinstance(think, Think)
    assert "tool_error: division by zero" in think.transcript.turns[-1].observations[0]
    p.stepped(answer("undefined"), 5, 0.3)
    assert p.next(0.3).status == "answered"  # type: ignore[union-attr]


def test_a_step_that_does_not_parse_is_an_observation() -> None:
    p = planner()
    p.next(0.0)
    assert p.stepped("I think the answer is 4", 12, 0.0) == NOT_JSON
    assert kinds(p)[-2:] == ["plan.thought", "plan.replan"]
    think = p.next(0.0)
    assert isinstance(think, Think)
    assert "did not parse" in think.transcript.turns[-1].observations[0]
    assert p.stepped(calls("x + 1"), 5, 0.0) == PARSED  # the callee judges the expression
    assert [s["parsed"] for s in p.record(0.0)["steps"]] == [False, True]


@pytest.mark.parametrize(("budget", "script", "reason"), [
    (Budget(steps=2), [calls("1 + 1"), calls("2 + 2")], "budget_steps"),
    (Budget(tokens=15), [calls("1 + 1"), calls("2 + 2")], "budget_tokens"),
    (Budget(calls=3), [calls("1 + 1", "2 + 2"), calls("3 + 3", "4 + 4")], "budget_calls"),
])
def test_each_budget_running_out_fails_the_plan(budget: Budget, script: list[str],
                                                reason: str) -> None:
    p = planner(budget=budget)
    now = 0.0
    for text in [*script, answer("never")]:
        action = p.next(now)
        if isinstance(action, Finished):
            break
        assert isinstance(action, Think)
        p.stepped(text, 10, now)
        action = p.next(now)
        if isinstance(action, Dispatch):
            for c in action.calls:
                p.ended(c.call_id, ok=True, code="ok", peer="A", elapsed_s=0, attempts=1,
                        result={"value": "1"})
        now += 1
    assert p.next(now) == Finished("failed", None, reason)
    assert kinds(p)[-1] == "plan.failed"
    assert all(s["parsed"] for s in p.record(0.0)["steps"])  # a cut step parsed all the same


def test_the_wall_budget_fails_the_plan_and_cancels_running_calls() -> None:
    p = planner(budget=Budget(wall_s=5))
    p.next(0.0)
    p.stepped(calls("1 + 1"), 1, 1.0)
    p.next(1.0)
    wait = p.next(1.0)
    assert wait == Wait(5.0)
    assert p.next(5.0) == Finished("failed", None, "budget_wall")
    assert p.record(5.0)["steps"][0]["calls"][0]["code"] == "cancelled"
    p.ended("1.1", ok=True, code="ok", peer="A", elapsed_s=5, attempts=1, result={})
    assert kinds(p)[-1] == "plan.failed"  # a result after the end is dropped


def test_async_folds_a_late_result_into_a_later_step_exactly_once() -> None:
    p = planner(ASYNC, async_wait_s=2.0)
    p.next(0.0)
    p.stepped(calls("1 + 1", "2 + 2"), 1, 0.0)
    p.next(0.0)
    assert p.next(0.5) == Wait(2.0)
    p.ended("1.1", ok=True, code="ok", peer="A", elapsed_s=0.6, attempts=1,
            result={"value": "2"})
    think = p.next(0.6)  # the first result is in: go on
    assert isinstance(think, Think) and think.transcript.running == ("1.2 calculator",)
    p.stepped(answer("too soon"), 1, 0.7)  # refused: 1.2 still runs
    assert p.status == "running" and isinstance(p.next(10.0), Wait)
    p.ended("1.2", ok=True, code="ok", peer="B", elapsed_s=11, attempts=1,
            result={"value": "4"})
    think = p.next(11.0)
    assert isinstance(think, Think)
    seen = [o for t in think.transcript.turns for o in t.observations]
    assert sum('"call": "1.1"' in o for o in seen) == 1
    assert sum('"call": "1.2"' in o for o in seen) == 1
    assert think.transcript.turns[0].observations[0].startswith('{"call": "1.1"')
    p.stepped(answer("6"), 1, 11.0)
    assert p.next(11.0) == Finished("answered", "6", "")


def test_async_goes_on_after_a_short_wait_without_results() -> None:
    p = planner(ASYNC, async_wait_s=2.0)
    p.next(0.0)
    p.stepped(calls("1 + 1"), 1, 0.0)
    p.next(0.0)
    assert isinstance(p.next(1.0), Wait)
    assert isinstance(p.next(2.0), Think)


def test_the_prompt_lists_the_tools_goal_steps_and_observations() -> None:
    p = planner()
    p.next(0.0)
    p.stepped(calls("1 + 1"), 1, 0.0)
    p.next(0.0)
    p.ended("1.1", ok=True, code="ok", peer="A", elapsed_s=0, attempts=1,
            result={"value": "2"})
    think = p.next(0.0)
    assert isinstance(think, Think)
    msgs = messages_of(think.transcript)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "calculator" in msgs[0]["content"] and '"title"' not in msgs[0]["content"]
    assert msgs[1]["content"] == "Goal: add things"
    assert '"value": "2"' in msgs[3]["content"]


# ---- the driver on trio's clock -----------------------------------------------------

Script = dict[str, tuple[float, Sequence[tuple[str, str]], bool, Any]]


def scripted_dispatch(script: Callable[[str], tuple[float, list[str], Any]]) -> Any:
    """Each call: (seconds, failed attempts' codes, result or None for a failure)."""

    async def dispatch(planned: Sequence[Any], attempted: Attempted, ended: Ended) -> None:
        async def one(c: Any) -> None:
            seconds, failures, result = script(c.arguments["expression"])
            for code in failures:
                await trio.sleep(seconds)
                attempted(c.call_id, "peerA", code, "no")
            await trio.sleep(seconds)
            attempted(c.call_id, "peerB", "ok" if result is not None else "tool_error", "")
            ended(c.call_id, ok=result is not None, code="ok" if result is not None
                  else "tool_error", peer="peerB", elapsed_s=seconds,
                  attempts=len(failures) + 1, result=result, message="broke")

        async with trio.open_nursery() as nursery:
            for c in planned:
                nursery.start_soon(one, c)

    return dispatch


async def drive(p: Planner, thinker: ScriptedThinker, dispatch: Any) -> list[str]:
    seen: list[str] = []
    await run_plan(p, thinker, dispatch, lambda kind, data: seen.append(kind))
    return seen


def test_the_driver_runs_a_plan_with_retries_and_a_replan() -> None:
    def script(expr: str) -> tuple[float, list[str], Any]:
        return {"1 + 1": (0.5, ["busy"], {"value": "2"}),
                "1 / 0": (0.2, [], None)}.get(expr, (0.1, [], {"value": "0"}))

    thinker = ScriptedThinker([calls("1 + 1", "1 / 0"), answer("2")])

    async def main() -> None:
        p = planner()
        seen = await drive(p, thinker, scripted_dispatch(script))
        assert seen[:3] == ["plan.created", "plan.thought", "plan.call"]
        assert "plan.retry" in seen and "plan.replan" in seen and seen[-1] == "plan.answer"
        rec = p.record(trio.current_time())
        assert rec["status"] == "answered" and rec["used"]["calls"] == 2
        assert rec["steps"][0]["calls"][0]["attempts"] == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_driver_in_async_mode_folds_a_long_call_in_later() -> None:
    def script(expr: str) -> tuple[float, list[str], Any]:
        return (30.0, [], {"value": "slow"}) if expr == "9 * 9" else \
            (0.1, [], {"value": "fast"})

    def third(t: Transcript) -> str:
        return answer("81") if not t.running else answer("not yet")  # refused: 1.1 runs

    thinker = ScriptedThinker([calls("9 * 9", "1 + 1"), calls("2 + 2"), third, third,
                               third])

    async def main() -> None:
        p = planner(ASYNC, budget=Budget(wall_s=100))
        await drive(p, thinker, scripted_dispatch(script))
        assert p.record(0)["answer"] == "81", p.record(0)
        assert len(thinker.seen) == 4 and trio.current_time() >= 30
        everything = [o for t in thinker.seen[-1].turns for o in t.observations]
        assert sum('"slow"' in o for o in everything) == 1
        assert thinker.seen[1].running == ("1.1 calculator",)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_driver_fails_the_plan_when_the_wall_budget_ends_mid_call() -> None:
    def script(expr: str) -> tuple[float, list[str], Any]:
        return 1000.0, [], {"value": "late"}

    async def main() -> None:
        p = planner(budget=Budget(wall_s=10))
        seen = await drive(p, ScriptedThinker([calls("1 + 1")]), scripted_dispatch(script))
        assert seen[-1] == "plan.failed" and p.reason == "budget_wall"
        assert trio.current_time() < 11

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
