"""The trainer's rule on a delivered group's shape (intake.py), branch by branch."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from peerd.rl.intake import group_fault
from peerd.rl.types import Rollout

PEER = "12D3KooWsampler"
PROMPT = (1, 2, 3)


def rollout(**change: Any) -> Rollout:
    base = Rollout(run_id="r", prompt_index=0, group_id="", prompt_ids=PROMPT,
                   completion_ids=(7, 8), behaviour_logprobs=(-0.5, -0.25), version=2,
                   sampler=PEER, text="")
    return dataclasses.replace(base, **change)


def fault(rollouts: list[Rollout], **kw: Any) -> str:
    args: dict[str, Any] = {"peer": PEER, "size": 2, "max_tokens": 4, "version": 3,
                            "prompt_ids": list(PROMPT)}
    args.update(kw)
    return group_fault(rollouts, **args)


def test_a_well_formed_group_passes() -> None:
    assert fault([rollout(), rollout(completion_ids=(9,), behaviour_logprobs=(-1.0,))]) == ""
    assert fault([rollout(version=3), rollout(version=3)]) == ""  # the trainer's own


@pytest.mark.parametrize(("group", "words"), [
    ([rollout()], "1 completions for a group of 2"),
    ([rollout(), rollout(), rollout()], "3 completions"),
    ([rollout(), rollout(version=1)], "several versions"),
    ([rollout(version=4), rollout(version=4)], "version 4 is newer than the trainer's 3"),
    ([rollout(), rollout(sampler="12D3KooWother")], "relayed by"),
    ([rollout(), rollout(prompt_ids=(1, 2))], "tokenisation"),
    ([rollout(), rollout(completion_ids=(), behaviour_logprobs=())], "0 completion tokens"),
    ([rollout(), rollout(completion_ids=(1,) * 5, behaviour_logprobs=(0.0,) * 5)],
     "5 completion tokens (1..4)"),
    ([rollout(), rollout(behaviour_logprobs=(-0.5,))], "one behaviour log-prob a token"),
])
def test_every_misshapen_group_is_named(group: list[Rollout], words: str) -> None:
    assert words in fault(group)
