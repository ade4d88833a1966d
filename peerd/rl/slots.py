"""Prompt slots: which prompts go out, at which policy version, and which a step trains.

Slot k is the k-th prompt of a run: its problem and its sampling seed are functions
of (run seed, k), so a slot re-issued after a failure asks exactly the same thing.
Step t trains slots [t*B, (t+1)*B): the lowest B slots not yet trained, whatever
order their rollouts arrive in. A slot's rollouts are trained at version t (the
trainer's version at step t), so they are admissible when generated at version
>= t - S. Slots are handed out in order, lowest first (given-back slots before new
ones), and never beyond step t + S while the trainer is at step t (in sync mode S is
0 for this purpose: nothing runs ahead), nor beyond the run's last step (a group for a
step that will never train is compute thrown away). Hence:

- sync mode, and async mode with staleness 0, generate and train the same slots at
  the same versions with the same seeds: the same rollouts, the same updates;
- no rollout is generated that could be too stale when its step comes, unless a
  sampler was behind (then it is refused at training time and its slot re-issued);
- a slot whose rollouts were refused or whose sampler failed is given back and goes
  out again before any new slot: no prompt is lost, no step trains a different set.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping

from protocols import rollout as wire


class Slots:
    def __init__(self, batch: int, ahead: int, *, next_slot: int = 0,
                 steps: int | None = None) -> None:
        self.batch = batch
        self.ahead = ahead  # steps a slot may be handed out before its own
        self.end = None if steps is None else steps * batch  # the run's slots end here
        self.step = next_slot // batch  # the step the trainer is on
        self._next = next_slot  # the lowest slot never handed out
        self._back: list[int] = []  # given back, to go out again first (a heap)

    def step_of(self, slot: int) -> int:
        return slot // self.batch

    def min_version(self, slots: list[int], staleness: int) -> int:
        """The oldest policy version that may generate `slots`: each is trained at its
        step's version; a generator older than step - S would be refused."""
        return max(0, min(self.step_of(s) for s in slots) - staleness)

    @property
    def limit(self) -> int:
        """Slots below this may be handed out now."""
        ahead = (self.step + 1 + self.ahead) * self.batch
        return ahead if self.end is None else min(ahead, self.end)

    def hand_out(self, n: int) -> list[int]:
        """Up to n slots, lowest first; fewer (maybe none) at the run-ahead limit."""
        out: list[int] = []
        while len(out) < n and self._back and self._back[0] < self.limit:
            out.append(heapq.heappop(self._back))
        while len(out) < n and self._next < self.limit:
            out.append(self._next)
            self._next += 1
        return out

    def give_back(self, slots: list[int]) -> None:
        for s in slots:
            if s >= self.step * self.batch:  # a slot already trained is not re-issued
                heapq.heappush(self._back, s)

    def current(self) -> range:
        """The slots the current step trains."""
        return range(self.step * self.batch, (self.step + 1) * self.batch)

    def advance(self) -> None:
        """The current step is trained: the next may hand out one more step's slots."""
        self.step += 1

    @property
    def outstanding_back(self) -> int:
        return len(self._back)


def request_size(batch: int, group: int, max_tokens: int, fraction: float) -> int:
    """Slots in one request to a sampler: its `fraction` of a step (share_of), to the
    nearest slot (two samplers a few percent apart take half each, not 5 and 3 of 8),
    within the wire's caps on one request (at least one: a single prompt over the caps
    is the request's own error)."""
    share = math.floor(batch * min(1.0, max(0.0, fraction)) + 0.5)
    return max(1, min(share, wire.MAX_PROMPTS, wire.MAX_ROLLOUTS // group,
                      wire.MAX_WORK_TOKENS // (group * max_tokens)))


def share_of(rates: Mapping[str, float], peer: str, asking: Collection[str]) -> float:
    """The fraction of a step that `peer` takes in one request, among the samplers
    `asking` (itself included): in proportion to the prompts a second each has
    delivered (`rates`), so a slow sampler does not hold back a step that a fast one
    could have finished; one not measured yet counts as the mean of those measured;
    none measured: equal shares."""
    asking = set(asking) | {peer}
    known = [rates[p] for p in asking if rates.get(p, 0.0) > 0.0]
    if not known:
        return 1.0 / len(asking)
    mean = sum(known) / len(known)
    rate = {p: rates[p] if rates.get(p, 0.0) > 0.0 else mean for p in asking}
    return rate[peer] / sum(rate.values())
