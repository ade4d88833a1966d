"""The records the RL parts hand each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rollout:
    run_id: str
    prompt_index: int  # index of the prompt in its request
    group_id: str  # same for the G completions of one prompt
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]  # one per completion token
    version: int
    sampler: str  # peer id
    text: str  # the decoded completion
    reward: float | None = None  # filled by the trainer
