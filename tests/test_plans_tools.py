"""The built-in tools that reach the swarm's model, `ask` and `vote` (plans/asking.py),
over a fake model and a fake Symphony: their answers, their refusals in words, and when
a peer offers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from peerd.agents.record import TaskRecord, TaskSpec, Vote
from peerd.agents.requester import NoWorkers
from peerd.config import ConfigError, load_config
from peerd.inference.face import Completion, LanguageModel, ModelUnavailable
from peerd.inference.request import GenerationStats
from peerd.plans import asking, builtins
from peerd.plans.toolbox import Toolbox
from protocols import tool as wire
from protocols.tool import ToolCall

THEM = "QmThem"


class FakeModel:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.asked: list[Any] = []

    async def chat(self, messages: Any, params: Any) -> Completion:
        if self.broken:
            raise ModelUnavailable("loading", "the model is still loading")
        self.asked.append((messages, params.max_tokens))
        return Completion("Paris", GenerationStats(completion_tokens=2))


def call(name: str, arguments: dict[str, Any], box: Toolbox) -> ToolCall:
    return ToolCall(call_id="c1", tool=name, schema=box.tools[name].schema,
                    arguments=arguments, deadline_s=5.0)


async def test_ask_answers_with_the_model_and_refuses_in_words() -> None:
    model = FakeModel()
    box = Toolbox("QmMe", [asking.ask(lambda: cast(LanguageModel, model))])
    got = await box.execute(call("ask", {"prompt": "Capital of France?",
                                         "max_tokens": 8}, box), THEM)
    assert got.outcome == wire.OK and got.result == {"text": "Paris", "tokens": 2}
    assert model.asked[0][1] == 8
    too_many = await box.execute(call("ask", {"prompt": "x", "max_tokens": 100_000}, box),
                                 THEM)
    assert too_many.outcome == wire.INVALID_ARGUMENTS
    model.broken = True
    refused = await box.execute(call("ask", {"prompt": "x"}, box), THEM)
    assert refused.outcome == wire.TOOL_ERROR and "still loading" in refused.message


async def test_vote_settles_a_question_through_symphony() -> None:
    asked: list[TaskSpec] = []

    async def run_task(spec: TaskSpec) -> TaskRecord:
        asked.append(spec)
        if spec.question == "nobody":
            raise NoWorkers("nobody bid")
        record = TaskRecord("t1", spec, status="done", answer="4")
        record.votes = [cast(Vote, type("V", (), {
            "seat": 0, "peer_id": "QmA", "answer": "4", "confidence": 0.9,
            "weight": 0.5}))]
        return record

    box = Toolbox("QmMe", [asking.vote(run_task)])
    got = await box.execute(call("vote", {"question": "2+2?", "answer_format": "number"},
                                 box), THEM)
    assert got.outcome == wire.OK, got.message
    assert got.result == {"answer": "4", "votes": [
        {"peer_id": "QmA", "answer": "4", "confidence": 0.9, "weight": 0.5}]}
    assert asked[0].answer_format == "number" and asked[0].workers == 3
    none = await box.execute(call("vote", {"question": "nobody"}, box), THEM)
    assert none.outcome == wire.TOOL_ERROR and "nobody bid" in none.message


def test_ask_and_vote_are_offered_only_with_a_model(tmp_path: Path) -> None:
    default = load_config({"data_dir": str(tmp_path)}, environ={})
    names = [t.name for t in builtins.offered(default.tool_choices, None, lambda: None)]
    assert names == ["calculator", "memory_search"]

    async def run_task(spec: TaskSpec) -> TaskRecord:
        raise AssertionError

    with_model = builtins.offered(default.tool_choices, None, lambda: None,
                                  model=lambda: cast(LanguageModel, FakeModel()),
                                  run_task=run_task)
    assert [(t.name, t.capacity) for t in with_model] == [
        ("calculator", 16), ("memory_search", 4), ("ask", 2), ("vote", 1)]
    with pytest.raises(ConfigError, match="needs --model"):
        load_config({"data_dir": str(tmp_path), "tools": "calculator,ask"}, environ={})
