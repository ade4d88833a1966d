"""A run's progress as the trainer keeps it, and the check of a sampler's claims.

`Progress` is what `GET /v1/rl/runs/ID` shows while a run goes on (the trainer adds
its buffer's counts). `judge` is the trainer's rule on a sampler's behaviour
log-probs, pure: a rollout whose mean absolute difference a token from the trainer's
own exceeds the sampler's tolerance is a lie. `to_check` says which groups of a step
are checked: re-scoring costs a forward pass of the policy a rollout, about what the
step's training costs, so the groups that train nothing are checked by sample.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peerd.rl.grpo import is_degenerate
from peerd.rl.types import Rollout


class NoSamplers(Exception):
    """The run has had no sampler for too long; the message says what was looked for."""


@dataclass
class Progress:
    """What `GET /v1/rl/runs/ID` shows while the run goes on."""

    state: str = "starting"  # starting | waiting | training | done | failed | stopped
    step: int = 0
    version: int = 0
    started: float = field(default_factory=time.time)
    error: str = ""
    waiting_for: str = ""  # why the run cannot go on now, when it cannot
    samples: int = 0  # completions trained on
    refused: Counter[str] = field(default_factory=Counter)  # groups, by the trainer's
    # reasons (the buffer counts its own)
    skipped_groups: int = 0  # all-equal rewards: no signal
    verified_old: int = 0  # groups of older versions re-scored under their version
    # steps the training forward refused (the fused check caught a rollout over its
    # tolerance: nothing trained; the step waited for other samplers' groups)
    refused_steps: int = 0
    trainer_idle_s: float = 0.0
    train_s: float = 0.0
    sync_s: float = 0.0  # the trainer's side: export and publish
    verify_s: float = 0.0  # re-scoring rollouts to check their behaviour log-probs
    last: dict[str, Any] = field(default_factory=dict)  # the last step's metrics

    ended: float = 0.0  # when the run stopped training (0: it goes on)

    def to_json(self) -> dict[str, Any]:
        elapsed = (self.ended or time.time()) - self.started
        return {"state": self.state, "step": self.step, "version": self.version,
                "elapsed_s": round(elapsed, 2), "error": self.error,
                "waiting_for": self.waiting_for,
                "samples": self.samples,
                "samples_per_s": round(self.samples / elapsed, 3) if elapsed > 0 else 0.0,
                "skipped_groups": self.skipped_groups, "verified_old": self.verified_old,
                "refused_steps": self.refused_steps,
                "trainer_idle_s": round(self.trainer_idle_s, 2),
                "train_s": round(self.train_s, 2), "sync_s": round(self.sync_s, 3),
                "verify_s": round(self.verify_s, 2), "last": self.last}


def mean_abs(ours: Sequence[float] | torch.Tensor, theirs: Sequence[float]) -> float:
    """Mean |ours - theirs| a token; infinite when the lengths differ."""
    a = torch.as_tensor(ours, dtype=torch.float64)[: len(theirs)]
    b = torch.tensor(list(theirs), dtype=torch.float64)
    if a.numel() != b.numel():
        return math.inf
    return float((a - b).abs().mean())


def judge(checks: Sequence[tuple[Sequence[Rollout], Sequence[Sequence[float]]]],
          tolerance: Callable[[str], float]) -> tuple[set[str], dict[str, float]]:
    """(the samplers caught lying, the worst deviation seen of each sampler) from
    groups of rollouts and the trainer's log-probs of their tokens; `tolerance(peer)`
    is the deviation allowed to that sampler (it depends on the dtype it computes in)."""
    return judge_deviations([(group, [mean_abs(lp, r.behaviour_logprobs)
                                      for r, lp in zip(group, ours, strict=True)])
                             for group, ours in checks], tolerance)


def judge_deviations(checks: Sequence[tuple[Sequence[Rollout], Sequence[float]]],
                     tolerance: Callable[[str], float]) -> tuple[set[str], dict[str, float]]:
    """`judge` on deviations measured already (mean |ours - behaviour| a token, one a
    rollout: the training forward's fused check measures them)."""
    liars: set[str] = set()
    worst: dict[str, float] = {}
    for group, devs in checks:
        for r, dev in zip(group, devs, strict=True):
            worst[r.sampler] = max(worst.get(r.sampler, 0.0), dev)
            if dev > tolerance(r.sampler):
                liars.add(r.sampler)
    return liars, worst



def to_check(groups: Sequence[Sequence[Rollout]], version: int, verify_old: int,
             rng: random.Random) -> tuple[list[int], list[int]]:
    """Which of a step's groups to re-score (indices into `groups`): (of the trainer's
    current `version`, of older versions).

    - Current version: every group that trains (its rewards differ: its log-probs enter
      the update), and of the groups that train nothing (equal rewards: skipped, so a
      lie in them moves nothing) one of each sampler that has no group training this
      step, so that every sampler of the step is checked.
    - Older versions (async): a sample of `verify_old`, groups that train first.
    """
    current = [i for i, g in enumerate(groups) if g[0].version == version]
    trains = {i for i in range(len(groups)) if _trains(groups[i])}
    checked = [i for i in current if i in trains]
    seen = {groups[i][0].sampler for i in checked}
    for i in current:
        sampler = groups[i][0].sampler
        if sampler not in seen:
            seen.add(sampler)
            checked.append(i)
    older = [i for i, g in enumerate(groups) if g[0].version != version]
    old_trains = [i for i in older if i in trains]
    old_idle = [i for i in older if i not in trains]
    sample = rng.sample(old_trains, min(verify_old, len(old_trains)))
    sample += rng.sample(old_idle, min(verify_old - len(sample), len(old_idle)))
    return sorted(checked), sorted(sample)


def _trains(group: Sequence[Rollout]) -> bool:
    return not is_degenerate(torch.tensor([r.reward or 0.0 for r in group],
                                          dtype=torch.float32))
