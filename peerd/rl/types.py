"""The records the RL parts exchange. Torch-free: the CLI and protocols import them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rollout:
    """One completion of one prompt, as the trainer consumes it. The G completions of
    a prompt share a group_id and travel together (a Group)."""

    run_id: str
    prompt_index: int  # index of the prompt in its request
    group_id: str  # same for the G completions of one prompt
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]  # one per completion token, as sampled
    version: int  # the policy version that generated it
    sampler: str  # peer id
    text: str  # the decoded completion
    reward: float | None = None  # filled by the trainer


# All G rollouts of one prompt, generated together by one sampler at one version.
Group = tuple[Rollout, ...]
