"""A plan with a reference answer: its answer scored, and the run kept by this peer's
memory as a self-contained execution context (SCEC, docs/sedm.md). Pure.

The SCEC describes the plan as its asker saw it, as a Symphony task's does
(agents/scored.py): its prompt is the goal (the memory's notes, which the planner got
before it, are its `memory`, by id), its output the plan's answer (empty when the plan
failed: a failure scores 0), scored against the reference; its model the one that wrote
the steps. It is an admission task, not a reproduction: a plan's answer also depends on
what its tools returned, so an admission replay asks the bare goal of one model, as
every admission replay does (admission.py), greedily, with the most tokens one step may
write (planner.STEP_TOKENS: an answer is one step's). The items the plan was given move
by its score against the domain's no-memory baseline; plans are kept in a domain of
their own by default ("plans"), so that baseline is a plan's, not a bare question's.
"""

from __future__ import annotations

from peerd.memory.scoring import score
from peerd.plans.planner import STEP_TOKENS
from protocols.memory import MAX_LATENCY_S, ScecMsg

UNKNOWN_MODEL = "unknown"  # a thinker that is no served model (a test's script)
PLANS_DOMAIN = "plans"  # where a scored plan is kept when its request names no domain


def plan_score(scorer: str, answer: str | None, reference: str) -> float:
    """The plan's answer against the reference; 0 for a plan that gave none."""
    return 0.0 if answer is None else score(scorer, answer, reference)


def plan_scec(goal: str, *, domain: str, model: str, reference: str, scorer: str,
              answer: str | None, memory: tuple[str, ...], memory_ids: tuple[str, ...],
              wall_s: float) -> ScecMsg:
    """The SCEC of a finished plan. WireError when a field is out of bounds (a goal
    longer than an SCEC keeps): the run is then not kept."""
    scec = ScecMsg(
        prompt=goal, domain=domain, model=model or UNKNOWN_MODEL, version="",
        max_tokens=STEP_TOKENS, temperature=0.0, top_p=1.0, seed=None, stop=(),
        memory=memory, memory_ids=memory_ids, answer=reference, scorer=scorer,
        output=answer or "", score=plan_score(scorer, answer, reference), prompt_tokens=0,
        latency_s=min(max(0.0, wall_s), MAX_LATENCY_S))
    scec.check()
    return scec
