"""A scored plan's SCEC (peerd/plans/scored.py): pure."""

from __future__ import annotations

import pytest

from peerd.plans.planner import STEP_TOKENS
from peerd.plans.scored import UNKNOWN_MODEL, plan_scec, plan_score
from protocols.errors import WireError
from protocols.memory import MAX_LATENCY_S


def test_a_plan_is_kept_as_an_admission_task_on_its_goal() -> None:
    scec = plan_scec("What is 6 * 7?", domain="plans", model="smollm2", reference="42",
                     scorer="number", answer="6 * 7 = 42", memory=("Multiply.",),
                     memory_ids=("a" * 64,), wall_s=3.5)
    assert (scec.prompt, scec.domain, scec.model, scec.version) == (
        "What is 6 * 7?", "plans", "smollm2", "")
    # an admission replay asks the goal greedily, with one step's tokens
    assert (scec.temperature, scec.top_p, scec.seed, scec.max_tokens) == (
        0.0, 1.0, None, STEP_TOKENS)
    assert (scec.output, scec.answer, scec.score, scec.latency_s) == (
        "6 * 7 = 42", "42", 1.0, 3.5)
    assert scec.memory == ("Multiply.",) and scec.memory_ids == ("a" * 64,)


def test_a_failed_plan_scores_zero_and_an_unnamed_model_is_unknown() -> None:
    assert plan_score("number", None, "42") == 0.0
    assert plan_score("exact", "42", "42") == 1.0
    scec = plan_scec("g", domain="plans", model="", reference="42", scorer="number",
                     answer=None, memory=(), memory_ids=(), wall_s=1e9)
    assert (scec.output, scec.score, scec.model) == ("", 0.0, UNKNOWN_MODEL)
    assert scec.latency_s == MAX_LATENCY_S


def test_a_plan_the_memory_cannot_keep_is_refused_in_words() -> None:
    with pytest.raises(WireError):
        plan_scec("g", domain="Not A Domain", model="m", reference="42", scorer="number",
                  answer="42", memory=(), memory_ids=(), wall_s=1.0)
