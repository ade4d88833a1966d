"""Replay-verified admission: the utility rule (pure) and the A/B judge.

A candidate item is judged on tasks (SCECs) similar to its origin. Each task is
replayed greedily twice on the model served now, with the same sampling and seed:
(A) with the memory the controller would give it now, (B) with the candidate added
first. Over the tasks, with mean score s, mean wall latency t (seconds) and mean
prompt tokens p:

    utility = (s_B - s_A) - λ_latency · (t_B - t_A) - λ_tokens · (p_B - p_A)

and the item is admitted when utility > min_gain; the utility becomes its first
weight. Both arms run on the model served now, whatever model recorded the tasks:
the judge compares memories, not reproductions (replay.py reproduces).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from statistics import fmean

from peerd.inference.face import LanguageModel
from peerd.memory.replay import Outcome, run_task
from peerd.memory.scec import params_of, scec_hash, task_of
from protocols.memory import ScecMsg

# The memory the controller would give a task now, in prompt order (the store is
# async, so this is too).
MemoryFor = Callable[[ScecMsg], Awaitable[Sequence[str]]]


@dataclass(frozen=True, slots=True)
class Weights:
    """What latency and prompt tokens cost, in score units (a task's score is in [0, 1]).

    λ_latency is 0 by default: a replay's wall time moves by tens of milliseconds with
    whatever else the machine runs, as much as an item's real cost, so charging it
    would admit or refuse by noise. Prompt tokens are the deterministic measure of the
    same cost (an item's tokens are prefilled on every run it is given to), so they are
    charged instead: at 1e-3 an item of 100 tokens must gain 0.1 in mean score, one
    task in ten, and an item that changes nothing is refused. Latency is still
    measured and reported (`Utility.d_latency`); set λ_latency only where timing is
    stable (a dedicated peer), and small enough that its noise (measure it: replay the
    same tasks twice) times λ_latency stays well under min_gain.
    """

    lambda_latency: float = 0.0  # per second
    lambda_tokens: float = 1e-3  # per prompt token

    def __post_init__(self) -> None:
        if not (self.lambda_latency >= 0 and self.lambda_tokens >= 0):
            raise ValueError("λ_latency and λ_tokens must be non-negative")


@dataclass(frozen=True, slots=True)
class Utility:
    d_score: float  # mean score with the candidate less without it
    d_latency: float  # the same of wall latency, in seconds
    d_tokens: float  # the same of prompt tokens
    total: float  # d_score - λ_latency·d_latency - λ_tokens·d_tokens


@dataclass(frozen=True, slots=True)
class TaskOutcomes:
    task: str  # the SCEC's hash
    without: Outcome  # A: the memory the controller gives it now
    with_: Outcome  # B: the candidate first, then that memory


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    utility: Utility
    tasks: tuple[TaskOutcomes, ...]


def utility(without: Sequence[Outcome], with_: Sequence[Outcome],
            weights: Weights = Weights()) -> Utility:
    """The utility of the memory `with_` ran with over the one `without` ran with, on the
    same tasks in the same order. ValueError when there are none, or not as many."""
    if not without or len(without) != len(with_):
        raise ValueError(f"utility needs the same tasks with and without: {len(without)} "
                         f"and {len(with_)} outcomes")
    d_score = fmean(o.score for o in with_) - fmean(o.score for o in without)
    d_latency = fmean(o.latency_s for o in with_) - fmean(o.latency_s for o in without)
    d_tokens = fmean(o.prompt_tokens for o in with_) - fmean(o.prompt_tokens for o in without)
    total = d_score - weights.lambda_latency * d_latency - weights.lambda_tokens * d_tokens
    return Utility(d_score=d_score, d_latency=d_latency, d_tokens=d_tokens, total=total)


def admit(gain: Utility, min_gain: float = 0.0) -> bool:
    """Strictly more than min_gain: an item that changes nothing is not admitted."""
    return gain.total > min_gain


class BaselineCache:
    """The A arm's outcomes, by (model, task, the memory given): candidates judged on the
    same runs against the same memory replay the same greedy A arm, so it runs once. An
    entry lives `ttl_s` at most, since a peer following an RL run changes its weights
    under the same model id; a cached outcome keeps the latency measured when it ran."""

    def __init__(self, size: int = 4096, ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._entries: OrderedDict[tuple[str, str, tuple[str, ...]],
                                   tuple[float, Outcome]] = OrderedDict()
        self.hits = 0

    def get(self, key: tuple[str, str, tuple[str, ...]]) -> Outcome | None:
        found = self._entries.get(key)
        if found is None or self.clock() - found[0] > self.ttl_s:
            return None
        self.hits += 1
        return found[1]

    def put(self, key: tuple[str, str, tuple[str, ...]], outcome: Outcome) -> None:
        self._entries[key] = (self.clock(), outcome)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


async def judge(model: LanguageModel, candidate: str, tasks: Sequence[ScecMsg],
                memory_for: MemoryFor, weights: Weights = Weights(),
                min_gain: float = 0.0, cache: BaselineCache | None = None) -> Verdict:
    """Replay each task greedily without (A) and with (B) the candidate text and rule on
    it. The arms of a task share sampling and seed; which runs first alternates from
    task to task, so warm-up and drift fall on both arms alike (an A arm found in
    `cache` is not run again). ValueError when there are no tasks (or a task names an
    unknown scorer); the face's Refused and SwarmUnavailable as they come (a prompt the
    candidate makes too long is refused: no verdict, the caller logs why)."""
    if not tasks:
        raise ValueError("admission needs at least one task to replay")
    judged: list[TaskOutcomes] = []
    for i, scec in enumerate(tasks):
        given = list(await memory_for(scec))
        arms = {"A": given, "B": [candidate, *(text for text in given if text != candidate)]}
        task, params = task_of(scec), params_of(scec, greedy=True)
        key = (model.model_id, scec_hash(scec), tuple(given))
        outcomes: dict[str, Outcome] = {}
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            outcomes["A"] = cached
        for arm in (("A", "B") if i % 2 == 0 else ("B", "A")):
            if arm not in outcomes:
                outcomes[arm] = await run_task(model, task, arms[arm], params)
        if cache is not None and cached is None:
            cache.put(key, outcomes["A"])
        judged.append(TaskOutcomes(scec_hash(scec), without=outcomes["A"],
                                   with_=outcomes["B"]))
    gain = utility([t.without for t in judged], [t.with_ for t in judged], weights)
    return Verdict(admitted=admit(gain, min_gain), utility=gain, tasks=tuple(judged))
