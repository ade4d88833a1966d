"""The trainer's rule on a sampler's behaviour log-probs, pure."""

from __future__ import annotations

import math

from peerd.rl.progress import judge, mean_abs
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
