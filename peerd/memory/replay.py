"""Run a scorable task on a `LanguageModel` with given memory, and replay an SCEC.

A run puts the memory into the prompt (prompting.py, the one layout), decodes with the
sampling asked (greedy unless it says otherwise; its seed passed through, so a seeded
sampled run is reproducible too) and scores the output. Replaying an SCEC runs its
prompt, memory and sampling again on the same model and version: greedy (or seeded)
decoding reproduces the recorded output exactly. Another model, or another version of
it, would answer something else: such a replay is refused, not run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from peerd.inference.face import LanguageModel
from peerd.inference.options import SamplingParams
from peerd.memory import prompting, scoring
from peerd.memory.scec import Task, build, params_of, task_of
from protocols.memory import ScecMsg

GREEDY = SamplingParams(max_tokens=256, temperature=0.0)


class ReplayRefused(Exception):
    """An SCEC this model cannot reproduce: recorded under another model or version, or
    sampled without a seed."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run of a task gave."""

    output: str
    score: float  # the task's scorer on the output, in [0, 1]
    latency_s: float  # wall time from the prompt's preparation to the last token
    prompt_tokens: int  # memory and chat template included
    completion_tokens: int


async def run_task(model: LanguageModel, task: Task, memory: Sequence[str],
                   params: SamplingParams = GREEDY) -> Outcome:
    """Run `task` with the item texts `memory` in its prompt and score it. ValueError
    for an unknown scorer (before anything runs); the face's Refused and
    SwarmUnavailable as they come."""
    judge = scoring.scorer(task.scorer)
    began = time.perf_counter()
    completion = await model.chat(prompting.messages(task.prompt, memory), params)
    latency_s = time.perf_counter() - began
    return Outcome(output=completion.text, score=judge(completion.text, task.answer),
                   latency_s=latency_s, prompt_tokens=completion.stats.prompt_tokens,
                   completion_tokens=completion.stats.completion_tokens)


async def record(model: LanguageModel, task: Task, memory: Sequence[str],
                 params: SamplingParams = GREEDY, *, version: str = "",
                 memory_ids: Sequence[str] = ()) -> tuple[Outcome, ScecMsg]:
    """Run `task` as run_task does and build its SCEC; `version`: the model's policy
    version ("" for the base model), which the face does not know. WireError when the
    run cannot be kept as an SCEC (a field out of bounds)."""
    outcome = await run_task(model, task, memory, params)
    scec = build(task, model=model.model_id, version=version, params=params, memory=memory,
                 memory_ids=memory_ids, output=outcome.output, score=outcome.score,
                 prompt_tokens=outcome.prompt_tokens, latency_s=outcome.latency_s)
    return outcome, scec


async def replay(model: LanguageModel, scec: ScecMsg, *, version: str = "") -> Outcome:
    """Run `scec` again as it was run: the same prompt, memory and sampling. `model` at
    `version` must be what it was recorded under (ReplayRefused otherwise)."""
    check_replayable(scec, model.model_id, version)
    return await run_task(model, task_of(scec), scec.memory, params_of(scec))


def check_replayable(scec: ScecMsg, model_id: str, version: str) -> None:
    if scec.model != model_id:
        raise ReplayRefused(f"the SCEC was recorded on model {scec.model!r:.80}; this "
                            f"peer runs {model_id!r:.80}, which would answer otherwise")
    if scec.version != version:
        raise ReplayRefused(f"the SCEC was recorded on version {scec.version or 'base'!r:.40}"
                            f" of {model_id!r:.80}; this is version {version or 'base'!r:.40}")
    if scec.temperature > 0 and scec.seed is None:
        raise ReplayRefused("the SCEC was sampled without a seed: no replay reproduces it")
