"""The trainer's replay buffer under a staleness bound S, and the admission rule.

A group (the G rollouts of one prompt, one version) is admitted when the trainer's
version is at most S ahead of the group's, checked twice: when it arrives, and again
when it is taken for training, because a group ages while it waits. Every group that
is not trained on is counted under a reason; nothing is dropped silently. The unit of
every count here is the group (its rollouts share one version: a histogram of rollouts
is this one times G).

Choices:
- take() serves the oldest version first (arrival order among equals): the group
  closest to expiring is used before it expires, so fewer sampled groups are wasted,
  and the staleness of what is trained on stays bounded by S anyway. At S = 0 every
  admissible group has the current version, so the order cannot differ from sync mode.
- A full buffer first lets go of the groups that are already too old to be trained on
  (counted "stale_at_train": they aged out in the queue), then refuses the newcomer
  ("full") rather than dropping the oldest: the refusal travels back to the sampler
  as back-pressure (it waits instead of burning compute on groups nobody will train
  on), and a waiting group is never thrown away while it is still admissible.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from peerd.rl.types import Group

Reason = Literal[
    "stale",  # trainer_version - rollout_version > S on arrival
    "future",  # a version the trainer has not published
    "bad_version",  # a negative version
    "partial",  # fewer than G rollouts (or none) and partial groups not allowed
    "oversized",  # more than G rollouts
    "mixed",  # rollouts of different groups, versions, runs or prompts
    "wrong_run",  # another run's rollouts
    "malformed",  # log-probs not one per token, not finite, or above 0
    "duplicate",  # a group_id already admitted
    "full",  # no room, even after letting go of the groups gone stale
    "stale_at_train",  # aged past S while waiting
    "future_at_train",  # the trainer went back (restored an older version)
    "restart",  # waiting when the trainer stopped; the queue does not survive it
]
STATE_FORMAT = 1
# A log-prob may come out a hair above 0 in float arithmetic; more is a lie or a bug.
LOGPROB_SLACK = 1e-4
# How many admitted group_ids are remembered to refuse duplicates.
SEEN_CAP = 1 << 16


def admit(trainer_version: int, rollout_version: int, staleness: int) -> Reason | None:
    """None when a rollout of rollout_version may train the policy at trainer_version
    under the staleness bound S, else the reason it may not."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if rollout_version < 0:
        return "bad_version"
    if rollout_version > trainer_version:
        return "future"
    if trainer_version - rollout_version > staleness:
        return "stale"
    return None


class ReplayBuffer:
    """Groups waiting for the trainer, at most capacity_groups of them.

    Counters (all in groups): admitted (accepted by offer), taken (returned by take),
    refused by reason (at offer, plus "stale_at_train", "future_at_train",
    "restart" and discard()'s reasons for admitted groups never trained on),
    staleness_histogram
    (trainer_version - version of each group taken), waiting (held now). Invariant:
    admitted == taken + waiting + refused[the *_at_train, restart and discard reasons].
    """

    def __init__(self, staleness: int, capacity_groups: int, *, group_size: int,
                 run_id: str | None = None, allow_partial: bool = False) -> None:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if capacity_groups < 1:
            raise ValueError(f"capacity_groups must be >= 1, got {capacity_groups}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.staleness = staleness
        self.capacity_groups = capacity_groups
        self.group_size = group_size
        self.run_id = run_id
        self.allow_partial = allow_partial
        self.admitted = 0
        self.taken = 0
        self.refused: Counter[str] = Counter()
        self.staleness_histogram: Counter[int] = Counter()
        self._queue: list[Group] = []  # arrival order
        self._seen: OrderedDict[str, None] = OrderedDict()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def offer(self, group: Group, trainer_version: int) -> Reason | None:
        """Admit a group arriving while the trainer is at trainer_version, or count and
        return the reason it is refused."""
        reason = self._check(group, trainer_version)
        if reason is None and len(self._queue) >= self.capacity_groups:
            self.prune(trainer_version)
            if len(self._queue) >= self.capacity_groups:
                reason = "full"
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self._queue.append(group)
        self._seen[group[0].group_id] = None
        if len(self._seen) > SEEN_CAP:
            self._seen.popitem(last=False)
        self.admitted += 1
        return None

    def prune(self, trainer_version: int) -> int:
        """Let go of the waiting groups that may no longer train the policy at
        trainer_version (counted under "<reason>_at_train"); returns how many wait."""
        self.expire(trainer_version)
        return len(self._queue)

    def expire(self, trainer_version: int) -> list[Group]:
        """As prune, returning the groups let go (their prompts may be asked again)."""
        keep: list[Group] = []
        gone: list[Group] = []
        for group in self._queue:
            reason = admit(trainer_version, group[0].version, self.staleness)
            if reason is None:
                keep.append(group)
            else:
                self.refused[f"{reason}_at_train"] += 1
                gone.append(group)
        self._queue = keep
        return gone

    def get(self, group_id: str) -> Group | None:
        """The waiting group of that id, left waiting (to check it before taking it)."""
        return next((g for g in self._queue if g[0].group_id == group_id), None)

    def discard(self, group_id: str, reason: str) -> Group | None:
        """Let go of a waiting group found wanting after admission (a sampler's lie),
        counted under reason."""
        group = self.get(group_id)
        if group is not None:
            self._queue.remove(group)
            self.refused[reason] += 1
        return group

    def take_ids(self, group_ids: Sequence[str], trainer_version: int) -> list[Group] | None:
        """The named groups, in that order, once every one of them waits admissible at
        trainer_version; None (and nothing taken) while one is missing. The trainer
        names a step's prompts this way, so the step trains the same prompts whatever
        order their groups arrived in. Call expire() first to learn what aged out."""
        index = {g[0].group_id: i for i, g in enumerate(self._queue)
                 if admit(trainer_version, g[0].version, self.staleness) is None}
        if not all(gid in index for gid in group_ids):
            return None
        out = [self._queue[index[gid]] for gid in group_ids]
        chosen = {index[gid] for gid in group_ids}
        self._queue = [g for i, g in enumerate(self._queue) if i not in chosen]
        for group in out:
            self.staleness_histogram[trainer_version - group[0].version] += 1
        self.taken += len(out)
        return out

    def take(self, n_groups: int, trainer_version: int) -> list[Group]:
        """Up to n_groups groups admissible at trainer_version, oldest version first;
        the ones that aged past S while waiting are dropped and counted first."""
        self.prune(trainer_version)
        queue = self._queue
        pick = sorted(range(len(queue)), key=lambda i: (queue[i][0].version, i))
        pick = pick[:max(n_groups, 0)]
        out = [queue[i] for i in pick]
        chosen = set(pick)
        self._queue = [g for i, g in enumerate(queue) if i not in chosen]
        for group in out:
            self.staleness_histogram[trainer_version - group[0].version] += 1
        self.taken += len(out)
        return out

    def _check(self, group: Group, trainer_version: int) -> Reason | None:
        if not group:
            return "partial"
        first = group[0]
        for r in group:
            if (r.group_id, r.version, r.run_id, r.prompt_ids) != (
                    first.group_id, first.version, first.run_id, first.prompt_ids):
                return "mixed"
            if len(r.behaviour_logprobs) != len(r.completion_ids) or not all(
                    math.isfinite(lp) and lp <= LOGPROB_SLACK for lp in r.behaviour_logprobs):
                return "malformed"
        if self.run_id is not None and first.run_id != self.run_id:
            return "wrong_run"
        if len(group) > self.group_size:
            return "oversized"
        if len(group) < self.group_size and not self.allow_partial:
            return "partial"
        reason = admit(trainer_version, first.version, self.staleness)
        if reason is not None:
            return reason
        if first.group_id in self._seen:
            return "duplicate"
        return None

    def to_json(self) -> dict[str, Any]:
        """The accounting as a JSON-able dict, for the trainer's checkpoint state. The
        waiting groups themselves are not saved: from_json counts them as "restart"."""
        return {
            "format": STATE_FORMAT,
            "admitted": self.admitted,
            "taken": self.taken,
            "refused": dict(self.refused),
            "staleness_histogram": {str(k): v for k, v in self.staleness_histogram.items()},
            "waiting": self.waiting,
        }

    @classmethod
    def from_json(cls, data: object, *, staleness: int, capacity_groups: int,
                  group_size: int, run_id: str | None = None,
                  allow_partial: bool = False) -> ReplayBuffer:
        """A buffer for a resumed run: the saved accounting, an empty queue (the groups
        that waited at the save are counted under "restart"), this run's settings."""
        buf = cls(staleness, capacity_groups, group_size=group_size, run_id=run_id,
                  allow_partial=allow_partial)
        try:
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
                raise ValueError(f"not format {STATE_FORMAT}")
            buf.admitted = _count(data["admitted"])
            buf.taken = _count(data["taken"])
            waiting = _count(data["waiting"])
            refused = data["refused"]
            histogram = data["staleness_histogram"]
            if not isinstance(refused, dict) or not isinstance(histogram, dict):
                raise ValueError("refused and staleness_histogram must be objects")
            buf.refused = Counter({str(k): _count(v) for k, v in refused.items()})
            buf.staleness_histogram = Counter(
                {_count(int(k)): _count(v) for k, v in histogram.items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"replay buffer state: {e!r}") from e
        if waiting:
            buf.refused["restart"] += waiting
        return buf


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a count must be an int >= 0, got {value!r}")
    return value
