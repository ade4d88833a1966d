"""Replay-verified admission: the utility rule with hand-computed values, and the A/B
judge on a real served model.

On a tiny random Llama "helps" and "hurts" are made honest by choosing the references:
the scorer is exact match, and the test searches a fixed list of candidate texts (in
order) for one that changes a greedy output. With the references taken from the
outputs WITH that text, the item provably helps (it turns at least one wrong answer
right and none right wrong); with them taken from the outputs WITHOUT it, it provably
hurts. On SmolLM2-135M-Instruct (slow) a worked example is judged on two `add`
questions, and the test holds the verdict to the outcomes it reports, not to a
hoped-for result."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from peerd.inference.face import LanguageModel
from peerd.inference.options import SamplingParams
from peerd.memory import scoring
from peerd.memory.admission import Utility, Verdict, Weights, admit, judge, utility
from peerd.memory.replay import Outcome, record, run_task
from peerd.memory.scec import Task, scec_hash
from peerd.rl.tasks import AddTask
from protocols.memory import ScecMsg
from tests.models import tiny_llama_dir
from tests.test_inference_model import needs_smollm2
from tests.test_memory_replay import served

PROMPTS = ["What is 2 + 3?", "What is 10 + 7?", "Name a colour.", "Say hello."]
CANDIDATES = ["Q: What is 1 + 1?\nA: 2", "The capital of France is Paris.",
              "def add(a, b): return a + b", "Answer with one word.", "Be brief."]
PARAMS = SamplingParams(max_tokens=12)


def outcome(score: float, latency_s: float, prompt_tokens: int) -> Outcome:
    return Outcome(output="", score=score, latency_s=latency_s, prompt_tokens=prompt_tokens,
                   completion_tokens=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


async def no_memory(scec: ScecMsg) -> Sequence[str]:
    return ()


# ---- the utility rule ------------------------------------------------------------


def test_utility_by_hand() -> None:
    without = [outcome(0.0, 0.5, 20), outcome(1.0, 0.7, 30)]
    with_ = [outcome(1.0, 0.6, 60), outcome(1.0, 0.9, 70)]
    # s: 1.0 - 0.5; t: 0.75 - 0.6; p: 65 - 25
    got = utility(without, with_, Weights(lambda_latency=0.2, lambda_tokens=0.001))
    assert got.d_score == pytest.approx(0.5)
    assert got.d_latency == pytest.approx(0.15)
    assert got.d_tokens == pytest.approx(40.0)
    assert got.total == pytest.approx(0.5 - 0.2 * 0.15 - 0.001 * 40)  # 0.43
    # the defaults charge tokens (1e-3 each), not latency
    assert utility(without, with_).total == pytest.approx(0.5 - 0.04)
    assert admit(got, 0.42) and not admit(got, 0.43 + 1e-9)
    # an item that changes no score but costs tokens and time is refused
    same = utility(without, [outcome(0.0, 0.6, 60), outcome(1.0, 0.8, 70)])
    assert same.d_score == 0.0 and same.total == pytest.approx(-0.04) and not admit(same)
    # nothing gained at no cost: not strictly more than min_gain
    assert not admit(utility(without, without), 0.0)
    # a hurtful item: its score loss counts in full
    hurt = utility(without, [outcome(0.0, 0.5, 20), outcome(0.0, 0.7, 30)], Weights(0.0, 0.0))
    assert hurt == Utility(d_score=-0.5, d_latency=0.0, d_tokens=0.0, total=-0.5)


def test_utility_refuses_unmatched_outcomes() -> None:
    with pytest.raises(ValueError, match="same tasks"):
        utility([], [])
    with pytest.raises(ValueError, match="1 and 2 outcomes"):
        utility([outcome(1.0, 0.1, 1)], [outcome(1.0, 0.1, 1)] * 2)
    with pytest.raises(ValueError, match="non-negative"):
        Weights(lambda_latency=-1.0)


def consistent(verdict: Verdict, weights: Weights, min_gain: float) -> None:
    """The verdict is the rule applied to the outcomes it reports."""
    assert verdict.utility == utility([t.without for t in verdict.tasks],
                                      [t.with_ for t in verdict.tasks], weights)
    assert verdict.admitted == (verdict.utility.total > min_gain)


# ---- the judge on a tiny random Llama --------------------------------------------


async def changing_candidate(face: LanguageModel, baseline: list[str]) -> tuple[str, list[str]]:
    """The first of CANDIDATES that changes the greedy output (as exact match sees it)
    of at least one of PROMPTS, and the outputs with it."""
    for candidate in CANDIDATES:
        outputs = [(await run_task(face, Task(p, "", "exact"), [candidate], PARAMS)).output
                   for p in PROMPTS]
        if any(a.strip() != b.strip() for a, b in zip(outputs, baseline, strict=True)):
            return candidate, outputs
    raise AssertionError("no candidate text changes an output: extend CANDIDATES")


async def origin_scecs(face: LanguageModel, references: Sequence[str]) -> list[ScecMsg]:
    """The tasks as recorded runs without memory, scored by exact match."""
    return [(await record(face, Task(p, ref, "exact", "chat"), [], PARAMS))[1]
            for p, ref in zip(PROMPTS, references, strict=True)]


async def test_a_planted_item_that_helps_is_admitted_and_a_distractor_refused(
        tmp_path: Path, tiny: Path) -> None:
    weights, min_gain = Weights(), 0.0
    async with served(tmp_path, str(tiny)) as face:
        baseline = [(await run_task(face, Task(p, "", "exact"), [], PARAMS)).output
                    for p in PROMPTS]
        candidate, with_it = await changing_candidate(face, baseline)
        changed = [a.strip() != b.strip() for a, b in zip(with_it, baseline, strict=True)]

        # helpful: the references are what the model answers WITH the item
        tasks = await origin_scecs(face, with_it)
        verdict = await judge(face, candidate, tasks, no_memory, weights, min_gain)
        consistent(verdict, weights, min_gain)
        assert [t.task for t in verdict.tasks] == [scec_hash(s) for s in tasks]
        assert [t.with_.score for t in verdict.tasks] == [1.0] * len(PROMPTS)
        assert [t.without.score for t in verdict.tasks] == [float(not c) for c in changed]
        assert [t.without.output for t in verdict.tasks] == [s.output for s in tasks]
        assert verdict.utility.d_score == pytest.approx(sum(changed) / len(PROMPTS))
        assert verdict.utility.d_tokens > 0  # the item is charged for its tokens
        assert verdict.admitted

        # distractor: the references are what the model answers WITHOUT it
        tasks = await origin_scecs(face, baseline)
        assert all(s.score == 1.0 for s in tasks)
        verdict = await judge(face, candidate, tasks, no_memory, weights, min_gain)
        consistent(verdict, weights, min_gain)
        assert [t.with_.score for t in verdict.tasks] == [float(not c) for c in changed]
        assert verdict.utility.d_score == pytest.approx(-sum(changed) / len(PROMPTS))
        assert not verdict.admitted

        # an item the tasks are already given changes nothing, even free of charge:
        # not strictly more than min_gain, refused
        async def already(scec: ScecMsg) -> Sequence[str]:
            return [candidate]

        verdict = await judge(face, candidate, tasks, already, Weights(0.0, 0.0), 0.0)
        assert [t.with_.output for t in verdict.tasks] == with_it
        assert verdict.utility.d_score == verdict.utility.d_tokens == 0.0
        assert not verdict.admitted
        print(f"\ncandidate {candidate!r} changed {sum(changed)} of {len(PROMPTS)} outputs")


async def test_the_candidate_goes_first_over_the_memory_given_now(tmp_path: Path,
                                                                 tiny: Path) -> None:
    given = ["Be brief.", "Say it once."]
    asked: list[str] = []

    async def memory_for(scec: ScecMsg) -> Sequence[str]:
        asked.append(scec.prompt)
        return given

    async with served(tmp_path, str(tiny)) as face:
        tasks = [(await record(face, Task(p, "none", "exact", "chat"), [], PARAMS))[1]
                 for p in PROMPTS[:2]]
        candidate = CANDIDATES[0]
        verdict = await judge(face, candidate, tasks, memory_for)
        assert asked == PROMPTS[:2]  # once per task
        for task, judged in zip(tasks, verdict.tasks, strict=True):
            a = await run_task(face, Task(task.prompt, "none", "exact"), given, PARAMS)
            b = await run_task(face, Task(task.prompt, "none", "exact"),
                               [candidate, *given], PARAMS)
            assert (judged.without.output, judged.without.prompt_tokens) == \
                (a.output, a.prompt_tokens)
            assert (judged.with_.output, judged.with_.prompt_tokens) == \
                (b.output, b.prompt_tokens)
        # a candidate the task is already given is not given twice
        again = await judge(face, given[1], tasks[:1], memory_for)
        b = await run_task(face, Task(tasks[0].prompt, "none", "exact"),
                           [given[1], given[0]], PARAMS)
        assert again.tasks[0].with_.output == b.output
        assert again.tasks[0].with_.prompt_tokens == b.prompt_tokens
        with pytest.raises(ValueError, match="at least one task"):
            await judge(face, candidate, [], memory_for)


# ---- on SmolLM2-135M-Instruct ----------------------------------------------------


@pytest.mark.slow
@needs_smollm2
async def test_a_worked_example_on_smollm2_is_judged_by_its_outcomes(tmp_path: Path) -> None:
    questions = AddTask(seed=0).heldout(2)
    example = "Q: What is 23 + 45? Answer with just the number.\nA: 68"
    params = SamplingParams(max_tokens=16, seed=0)
    weights, min_gain = Weights(), 0.0
    async with served(tmp_path, "smollm2") as face:
        tasks = [(await record(face, Task(q.prompt, q.answer, "number", "arithmetic"), [],
                               params))[1] for q in questions]
        verdict = await judge(face, example, tasks, no_memory, weights, min_gain)
    for q, judged in zip(questions, verdict.tasks, strict=True):
        for arm in (judged.without, judged.with_):
            assert arm.score == scoring.number(arm.output, q.answer)
        print(f"\n{q.prompt!r} ({q.answer}): without {judged.without.output!r} "
              f"({judged.without.prompt_tokens} tokens), with {judged.with_.output!r} "
              f"({judged.with_.prompt_tokens} tokens)")
    # greedy: the no-memory arm is the recorded run again
    assert [t.without.output for t in verdict.tasks] == [s.output for s in tasks]
    consistent(verdict, weights, min_gain)
    print(f"utility {verdict.utility}: {'admitted' if verdict.admitted else 'refused'}")


async def test_the_a_arm_runs_once_per_memory_and_again_when_its_entry_is_old(
        tmp_path: Path, tiny: Path) -> None:
    from peerd.memory.admission import BaselineCache

    now = [0.0]
    cache = BaselineCache(ttl_s=60.0, clock=lambda: now[0])
    async with served(tmp_path, str(tiny)) as face:
        tasks = [(await record(face, Task(p, "none", "exact", "chat"), [], PARAMS))[1]
                 for p in PROMPTS[:2]]
        first = await judge(face, CANDIDATES[0], tasks, no_memory, cache=cache)
        assert cache.hits == 0
        second = await judge(face, CANDIDATES[1], tasks, no_memory, cache=cache)
        assert cache.hits == 2  # both tasks' A arms came from the cache
        assert [t.without for t in second.tasks] == [t.without for t in first.tasks]
        fresh = await judge(face, CANDIDATES[1], tasks, no_memory)
        assert [t.without.output for t in fresh.tasks] == \
            [t.without.output for t in second.tasks]

        async def other_memory(scec: ScecMsg) -> Sequence[str]:
            return ["Be brief."]

        await judge(face, CANDIDATES[1], tasks, other_memory, cache=cache)
        assert cache.hits == 2  # another memory: another A arm
        now[0] = 61.0
        await judge(face, CANDIDATES[2], tasks, no_memory, cache=cache)
        assert cache.hits == 2  # too old: run again
