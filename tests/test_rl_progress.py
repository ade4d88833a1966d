"""The trainer's rule on a sampler's behaviour log-probs, pure."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from peerd.rl.progress import judge, mean_abs, to_check
from peerd.rl.run import RunSpec
from peerd.rl.training import Run
from peerd.rl.types import Rollout


def rollout(sampler: str, claimed: tuple[float, ...]) -> Rollout:
    return Rollout(run_id="r", prompt_index=0, group_id="g", prompt_ids=(1,),
                   completion_ids=tuple(range(len(claimed))), behaviour_logprobs=claimed,
                   version=0, sampler=sampler, text="")


def test_a_claim_off_by_more_than_the_tolerance_on_average_is_a_lie() -> None:
    ours = [[-1.0, -2.0], [-1.0, -2.0]]
    honest = [rollout("a", (-1.0, -2.01)), rollout("a", (-1.0, -2.0))]
    liar = [rollout("b", (-0.5, -1.0)), rollout("b", (-1.0, -2.0))]  # off by 0.75
    slight = [rollout("c", (-1.0, -2.15)), rollout("c", (-1.0, -2.0))]  # off by 0.075
    liars, worst = judge([(honest, ours), (liar, ours), (slight, ours)], tolerance=lambda _: 0.1)
    assert liars == {"b"}  # within the tolerance on average: honest enough
    assert math.isclose(worst["a"], 0.005) and math.isclose(worst["b"], 0.75)


def test_a_claim_of_another_length_is_never_honest() -> None:
    assert mean_abs([-1.0, -2.0], (-1.0,)) == 0.0  # ours may be padded past the end
    assert mean_abs([-1.0], (-1.0, -2.0)) == math.inf
    liars, _ = judge([([rollout("x", (-1.0, -1.0))], [[-1.0]])], tolerance=lambda _: 10.0)
    assert liars == {"x"}


def test_each_sampler_has_its_own_tolerance() -> None:
    ours = [[-1.0, -2.0]]
    claims = [(rollout(p, (-1.0, -2.1)),) for p in ("f32", "bf16")]  # both off by 0.05
    liars, _ = judge([(c, ours) for c in claims],
                     tolerance=lambda peer: 0.15 if peer == "bf16" else 0.001)
    assert liars == {"f32"}


def test_a_run_is_not_done_until_its_summary_is_written(tmp_path: Path) -> None:
    """The API says "finishing" while the trainer is done but the run has not ended
    (summary and plot being written): a client that sees "done" may start the next
    run at once, and it must not be refused as "still going"."""

    class Trained:
        def to_json(self) -> dict[str, Any]:
            return {"state": "done", "step": 3}

    run = Run(RunSpec(model="m", run_id="r"), tmp_path)
    run.trainer = Trained()  # type: ignore[assignment]
    run.state = "running"
    assert run.to_json()["state"] == "finishing"
    run.state = "done"
    assert run.to_json()["state"] == "done"


def group(sampler: str, version: int, *rewards: float) -> tuple[Rollout, ...]:
    return tuple(Rollout(run_id="r", prompt_index=0, group_id=f"{sampler}{version}",
                         prompt_ids=(1,), completion_ids=(2,), behaviour_logprobs=(-1.0,),
                         version=version, sampler=sampler, text="", reward=r)
                 for r in rewards)


def test_the_groups_that_train_are_checked_and_every_sampler_at_least_once() -> None:
    rng = random.Random(0)
    groups = [group("a", 3, 0, 1), group("a", 3, 0, 0), group("b", 3, 1, 1),
              group("b", 3, 0, 0), group("c", 3, 0, 0.1), group("a", 2, 0, 1)]
    now, old = to_check(groups, 3, 0, rng)
    # a's and c's groups that train; b trains nothing this step: its first group
    assert now == [0, 2, 4]
    assert old == []
    # everything idle: one group a sampler
    idle = [group("a", 3, 0, 0), group("a", 3, 1, 1), group("b", 3, 0, 0)]
    assert to_check(idle, 3, 0, rng) == ([0, 2], [])


def test_older_groups_are_sampled_those_that_train_first() -> None:
    groups = [group("a", 1, 0, 0), group("a", 1, 0, 1), group("b", 2, 0, 0),
              group("b", 2, 1, 0), group("a", 3, 0, 0)]
    now, old = to_check(groups, 3, 2, random.Random(0))
    assert now == [4] and old == [1, 3]  # the two older groups that train
    assert to_check(groups, 3, 3, random.Random(0))[1] in ([0, 1, 3], [1, 2, 3])
    assert to_check(groups, 3, 9, random.Random(0))[1] == [0, 1, 2, 3]
    assert to_check(groups, 3, 0, random.Random(0))[1] == []
