"""Prompt slots and run settings: the pure rules of the trainer's loop."""

from __future__ import annotations

import pytest

from peerd.rl.run import RunSpec, SpecError
from peerd.rl.slots import Slots, request_size, share_of
from protocols.rollout import MAX_PROMPTS, MAX_ROLLOUTS, MAX_WORK_TOKENS


def test_sync_hands_out_only_the_current_step() -> None:
    slots = Slots(batch=4, ahead=0)
    assert slots.hand_out(10) == [0, 1, 2, 3]
    assert slots.hand_out(1) == []  # nothing beyond the step
    slots.advance()
    assert slots.hand_out(2) == [4, 5] and list(slots.current()) == [4, 5, 6, 7]


def test_async_runs_ahead_by_the_staleness_bound_only() -> None:
    slots = Slots(batch=2, ahead=2)
    assert slots.hand_out(100) == [0, 1, 2, 3, 4, 5]  # steps 0, 1 and 2
    slots.advance()
    assert slots.hand_out(100) == [6, 7]


def test_a_slot_given_back_goes_out_again_first_and_a_trained_one_never() -> None:
    slots = Slots(batch=2, ahead=1)
    assert slots.hand_out(3) == [0, 1, 2]
    slots.give_back([2, 0])
    assert slots.hand_out(2) == [0, 2]
    slots.advance()  # step 0 (slots 0, 1) is trained
    slots.give_back([1])  # too late: not re-issued
    assert slots.hand_out(5) == [3, 4, 5]


def test_min_version_lets_a_slot_be_generated_up_to_s_versions_before_its_step() -> None:
    slots = Slots(batch=4, ahead=2)
    assert slots.min_version([9], staleness=2) == 0  # step 2 - 2
    assert slots.min_version([13, 20], staleness=1) == 2  # the oldest slot: step 3 - 1
    assert slots.min_version([1], staleness=3) == 0  # never below 0


def test_nothing_is_handed_out_past_the_runs_last_step() -> None:
    slots = Slots(batch=2, ahead=1, steps=2)  # the run trains slots 0..3
    assert slots.hand_out(10) == [0, 1, 2, 3]  # step 1 is ahead; step 2 never trains
    slots.advance()
    assert slots.hand_out(10) == []
    slots.give_back([3])  # a refused group of the last step still goes out again
    assert slots.hand_out(10) == [3]
    resumed = Slots(batch=2, ahead=0, next_slot=2, steps=2)
    assert resumed.hand_out(10) == [2, 3]


def test_a_resumed_run_starts_at_its_step() -> None:
    slots = Slots(batch=3, ahead=0, next_slot=9)
    assert slots.step == 3 and slots.hand_out(5) == [9, 10, 11]


def test_run_settings_are_checked_and_name_the_bad_one() -> None:
    spec = RunSpec.parse({"model": "smollm2", "mode": "async", "staleness": 2, "lr": 1e-5})
    assert spec.mode == "async" and spec.staleness == 2
    for body, name in (({}, "model"), ({"model": "m", "mode": "fast"}, "mode"),
                       ({"model": "m", "group": 1}, "group"),
                       ({"model": "m", "steps": "5"}, "steps"),
                       ({"model": "m", "lr": float("nan")}, "lr"),
                       ({"model": "m", "resume": 1}, "resume"),
                       ({"model": "m", "run_id": "../x"}, "run_id"),
                       ({"model": "m", "bogus": 1}, "bogus"), ([], "body")):
        with pytest.raises(SpecError) as err:
            RunSpec.parse(body)
        assert err.value.name == name


def test_numbers_too_large_for_a_setting_are_refused_by_name() -> None:
    for body, name in (({"model": "m", "steps": 2**70}, "steps"),
                       ({"model": "m", "lr": 10**400}, "lr")):
        with pytest.raises(SpecError) as err:
            RunSpec.parse(body)
        assert err.value.name == name


def test_a_request_carries_a_samplers_share_of_a_step_within_the_caps() -> None:
    assert request_size(8, 4, 16, 0.5) == 4  # two samplers: half a step each
    assert request_size(8, 4, 16, 1 / 3) == 3  # to the nearest: the last asks for the rest
    assert request_size(8, 4, 16, 0.52) == request_size(8, 4, 16, 0.48) == 4
    assert request_size(8, 4, 16, 1.0) == 8
    assert request_size(2, 4, 16, 1 / 8) == 1  # more samplers than prompts
    assert request_size(8, 4, 16, 0.0) == 1
    assert request_size(512, 1, 1, 1.0) == MAX_PROMPTS
    assert request_size(512, 32, 1, 1.0) == MAX_ROLLOUTS // 32
    assert request_size(512, 4, 2048, 1.0) == MAX_WORK_TOKENS // (4 * 2048)
    assert request_size(8, 64, 2048, 1.0) == 1  # one prompt over the caps: its own error


def test_shares_follow_the_prompts_a_second_each_sampler_delivered() -> None:
    both = {"A", "B"}
    assert share_of({}, "A", both) == 0.5  # none measured: equal shares
    assert share_of({}, "A", set()) == 1.0  # the asker always counts itself
    assert share_of({"A": 3.0, "B": 1.0}, "A", both) == 0.75
    assert share_of({"A": 3.0, "B": 1.0}, "B", both) == 0.25
    # a sampler not measured yet counts as the mean of those that are
    assert share_of({"A": 3.0, "B": 1.0}, "C", both | {"C"}) == pytest.approx(1 / 3)
    # a measured sampler that is no longer asking takes no share
    assert share_of({"A": 3.0, "B": 1.0}, "B", {"B"}) == 1.0
    # the fast one's and the slow one's requests cover a step of 8 between them
    fast = request_size(8, 4, 16, share_of({"A": 3.0, "B": 1.0}, "A", both))
    slow = request_size(8, 4, 16, share_of({"A": 3.0, "B": 1.0}, "B", both))
    assert (fast, slow) == (6, 2)
