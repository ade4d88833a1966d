"""The controller: SEDM's pure rules for using, weighing and forgetting memory items.

No I/O, no clock: every rule takes `now` (unix seconds), so tests drive it with a fake
one. The service applies what these functions decide and logs it.

**Effective weight.** For an item with admission utility u0, n scored uses whose
deltas (score - the domain's no-memory baseline) sum to D, last used at time t_l:

    w(now) = (n0 * u0 + D) / (n0 + n)  *  2 ** (-max(0, now - t_l) / half_life)

The first factor is the mean delta with the admission replay as a prior worth n0 uses:
a young item leans on what its admission measured, an old one on what its uses did. The
second decays it toward zero while nobody uses it (a use resets the clock; a clock
behind t_l does not inflate it). `ItemStats.weight` holds the first factor as of t_l
(so `w(t_l)`), rewritten by every rule that changes the counts; the rules recompute it
from the counts, so a changed n0 applies to every item at once.

**Retrieval.** score = cosine similarity * w(now); an item with w <= 0 or a similarity
under the minimum is never retrieved.

**Consolidation.** Near-duplicates in a domain merge into the better item, their counts
combined; then items with w(now) under the floor are pruned; then, above the cap, the
least useful are evicted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar

from peerd.memory.item import ItemStats, Record

BASELINE_WINDOW = 200


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    # A 135M model's prompt has room for a few notes, and every note costs the prompt
    # tokens the admission rule charges for: the usual few-shot count.
    top_k: int = 3
    # The admission replay judges an item over a handful of tasks: worth about as many
    # uses, so its utility leads until the item's own uses outnumber that evidence.
    n0: float = 4.0
    # Cosine (all-MiniLM-L6-v2) under which texts are on other subjects: an item that
    # far from the task is noise in the prompt whatever its weight.
    min_similarity: float = 0.3
    # Tight rewordings of one text merge; worked examples that differ only in their
    # numbers embed just below this and stay distinct items.
    merge_threshold: float = 0.92
    # An item nobody's task has retrieved for a week is half as trusted; one admitted at
    # 0.1 and never used falls under the floor in a little over three weeks.
    half_life_s: float = 7 * 86_400.0
    # A hundredth of a score point: an item expected to gain less is not worth its place
    # in a prompt (the tokens it costs) nor in the store.
    prune_floor: float = 0.01
    # Keeps a consolidation pass (linear in the items) and the store's disk bounded;
    # search stays fast well past it.
    size_cap: int = 10_000
    # Each pending candidate costs two replays per judged task; past this many, a new
    # candidate is refused at once rather than judged long after it was offered.
    queue_cap: int = 64
    # A candidate refused for no gain, offered again word for word in its domain within
    # this long, is refused at once: its replay would cost two model runs a task to
    # measure what was just measured (and a peer re-offering one text would burn them).
    # After it, the memory and the model may have moved enough to judge it again.
    refusal_memory_s: float = 86_400.0
    # The no-memory baseline is a plain mean for this many runs, then a moving average
    # over about as many: the model (and an RL policy) changes, and its baseline with it.
    baseline_window: int = BASELINE_WINDOW

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value):
                raise ValueError(f"memory setting {f.name} = {value}: not a finite number")
        problems = [
            (self.top_k >= 1, "top_k", "at least 1"),
            (self.n0 > 0, "n0", "positive (the prior's strength in uses)"),
            (0 < self.min_similarity <= 1, "min_similarity", "in (0, 1]"),
            (0 < self.merge_threshold <= 1, "merge_threshold", "in (0, 1]"),
            (self.half_life_s > 0, "half_life_s", "positive"),
            (self.prune_floor >= 0, "prune_floor", "at least 0"),
            (self.size_cap >= 1, "size_cap", "at least 1"),
            (self.queue_cap >= 1, "queue_cap", "at least 1"),
            (self.refusal_memory_s >= 0, "refusal_memory_s", "at least 0"),
            (self.baseline_window >= 1, "baseline_window", "at least 1"),
        ]
        for ok, name, want in problems:
            if not ok:
                raise ValueError(f"memory setting {name} = {getattr(self, name)}: must be "
                                 f"{want}")


# ---- the effective weight ---------------------------------------------------------------


def mean_utility(stats: ItemStats, settings: ControllerSettings) -> float:
    """The undecayed weight: the mean delta, with the admission utility worth n0 uses."""
    n0 = settings.n0
    return (n0 * stats.admitted_utility + stats.delta_sum) / (n0 + stats.uses)


def decay(age_s: float, settings: ControllerSettings) -> float:
    return float(2.0 ** (-max(0.0, age_s) / settings.half_life_s))


def effective_weight(stats: ItemStats, now: float, settings: ControllerSettings) -> float:
    return mean_utility(stats, settings) * decay(now - stats.last_used, settings)


def admission_stats(utility: float, now: float, settings: ControllerSettings, *,
                    source: str = "local") -> ItemStats:
    """A newly admitted item's statistics: its measured utility is its first weight."""
    _finite("utility", utility)
    stats = ItemStats(weight=0.0, admitted_utility=utility, last_used=now, admitted_at=now,
                      source=source)
    return replace(stats, weight=mean_utility(stats, settings))


# ---- retrieval --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ranked:
    record: Record
    similarity: float
    weight: float  # effective, at the time of ranking
    score: float  # similarity * weight


def rank(candidates: Sequence[tuple[Record, float]], now: float,
         settings: ControllerSettings, k: int | None = None) -> list[Ranked]:
    """The items to give a task, best first: at most k (the settings' top_k by default).
    Ties go to the more similar, then to the lower id, so the same store and task give
    the same prompt (replays depend on it)."""
    best: dict[str, tuple[Record, float]] = {}
    for rec, sim in candidates:  # an item listed twice counts once, at its best
        seen = best.get(rec.item.id)
        if sim >= settings.min_similarity and (seen is None or sim > seen[1]):
            best[rec.item.id] = (rec, sim)
    ranked = []
    for rec, sim in best.values():
        w = effective_weight(rec.stats, now, settings)
        if w > 0:
            ranked.append(Ranked(record=rec, similarity=sim, weight=w, score=sim * w))
    ranked.sort(key=lambda r: (-r.score, -r.similarity, r.record.item.id))
    return ranked[: settings.top_k if k is None else max(0, k)]


# ---- the no-memory baseline and uses ----------------------------------------------------


class Baseline:
    """The per-domain running score of runs given no memory: a plain mean of the first
    `window` scores, then a moving average over about `window`, so it follows a model
    that changes. A use's delta is its score minus this."""

    def __init__(self, window: int = BASELINE_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"baseline window {window}: must be at least 1")
        self.window = window
        self._means: dict[str, tuple[float, int]] = {}  # domain -> (mean, count)

    def observe(self, domain: str, score: float) -> None:
        _finite("score", score)
        mean, count = self._means.get(domain, (0.0, 0))
        mean += (score - mean) / min(count + 1, self.window)
        self._means[domain] = (mean, count + 1)

    def mean(self, domain: str) -> float | None:
        """None until a no-memory run in this domain has been scored."""
        seen = self._means.get(domain)
        return None if seen is None else seen[0]

    def count(self, domain: str) -> int:
        return self._means.get(domain, (0.0, 0))[1]

    def snapshot(self) -> dict[str, tuple[float, int]]:
        return dict(sorted(self._means.items()))

    @classmethod
    def restore(cls, snapshot: Mapping[str, tuple[float, int]],
                window: int = BASELINE_WINDOW) -> Baseline:
        baseline = cls(window)
        for domain, (mean, count) in snapshot.items():
            _finite("score", mean)
            baseline._means[domain] = (mean, int(count))
        return baseline


def after_use(stats: ItemStats, score: float, baseline: float | None, now: float,
              settings: ControllerSettings) -> ItemStats:
    """An item's statistics once a run it was given scored `score`. With no baseline in
    the domain yet the use measured nothing: counting it as a delta of 0 would drag the
    weight toward 0 on no evidence, and refreshing its last use would let an item that
    is retrieved but never measured escape decay; so nothing changes."""
    _finite("score", score)
    if baseline is None:
        return stats
    _finite("baseline", baseline)
    used = stats.used(score - baseline, stats.weight, now)
    return replace(used, weight=mean_utility(used, settings))


def after_uses(stats: Sequence[ItemStats], score: float, baseline: float | None,
               now: float, settings: ControllerSettings) -> list[ItemStats]:
    """Several items given to one run: each gets the same delta. One run cannot say
    which item earned its score without a leave-one-out replay per item (k more runs per
    use); shared credit is fair in aggregate, since an item that helps lifts the mean of
    every run it is in whatever its companions, and they vary from run to run."""
    return [after_use(s, score, baseline, now, settings) for s in stats]


# ---- consolidation decisions ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Merge:
    action: ClassVar[str] = "merged"
    keep: str  # the item that stays, with `stats`
    drop: str  # the item deleted
    similarity: float
    stats: ItemStats  # the kept item's statistics, the two combined

    def detail(self) -> dict[str, object]:
        return {"keep": self.keep, "drop": self.drop, "similarity": self.similarity,
                "weight": self.stats.weight, "uses": self.stats.uses}

    def __str__(self) -> str:
        return (f"merged {self.drop[:12]} into {self.keep[:12]} (cosine "
                f"{self.similarity:.3g}): weight {self.stats.weight:.3g} over "
                f"{self.stats.uses} uses")


@dataclass(frozen=True, slots=True)
class Prune:
    action: ClassVar[str] = "pruned"
    item_id: str
    weight: float  # effective, when decided
    floor: float

    def detail(self) -> dict[str, object]:
        return {"weight": self.weight, "floor": self.floor}

    def __str__(self) -> str:
        return f"pruned {self.item_id[:12]}: weight {self.weight:.3g} under {self.floor:.3g}"


@dataclass(frozen=True, slots=True)
class Evict:
    action: ClassVar[str] = "evicted"
    item_id: str
    weight: float  # effective, when decided
    cap: int

    def detail(self) -> dict[str, object]:
        return {"weight": self.weight, "cap": self.cap}

    def __str__(self) -> str:
        return (f"evicted {self.item_id[:12]}: weight {self.weight:.3g}, among the least "
                f"useful over the cap of {self.cap}")


Decision = Merge | Prune | Evict


def _merit(rec: Record, now: float, settings: ControllerSettings
           ) -> tuple[float, int, float, str]:
    """Sorts the better item first: higher weight, then more uses, then admitted
    earlier, then the lower id (so every order of the same records agrees)."""
    w = effective_weight(rec.stats, now, settings)
    return (-w, -rec.stats.uses, rec.stats.admitted_at, rec.item.id)


def merge(a: Record, b: Record, similarity: float, now: float,
          settings: ControllerSettings) -> Merge:
    """Merge two near-duplicates into the better one (see `_merit`). Uses and deltas add;
    the admission utilities are averaged weighted by the evidence behind each weight
    (n0 + uses: an unused item's admission replay still counts), so the merged prior
    keeps the strength of one item's, n0; the last use is the later, the admission the
    earlier."""
    if a.item.id == b.item.id:
        raise ValueError(f"item {a.item.id[:12]} cannot be merged with itself")
    if a.item.domain != b.item.domain:  # each domain measures its own utility
        raise ValueError(f"items of {a.item.domain} and {b.item.domain} cannot be merged")
    keep, drop = sorted((a, b), key=lambda r: _merit(r, now, settings))
    k, d = keep.stats, drop.stats
    wk, wd = settings.n0 + k.uses, settings.n0 + d.uses
    combined = replace(k, admitted_utility=(wk * k.admitted_utility
                                            + wd * d.admitted_utility) / (wk + wd),
                       uses=k.uses + d.uses, delta_sum=k.delta_sum + d.delta_sum,
                       last_used=max(k.last_used, d.last_used),
                       admitted_at=min(k.admitted_at, d.admitted_at))
    combined = replace(combined, weight=mean_utility(combined, settings))
    return Merge(keep=keep.item.id, drop=drop.item.id, similarity=similarity, stats=combined)


def plan_consolidation(records: Iterable[Record],
                       neighbours: Mapping[str, Sequence[tuple[str, float]]],
                       now: float, settings: ControllerSettings) -> list[Decision]:
    """What to merge, prune and evict, in the order to apply them. `neighbours` maps an
    item id to ids found near it with their cosine (the index's answer; one direction of
    a pair is enough, unknown ids are ignored).

    1. Merges: pairs in one domain at or above the merge threshold, the most similar
       first. An item merged away is not merged again; a kept item goes on absorbing with
       its combined statistics. A merge that would leave the kept item under the floor
       is not made: each item is then judged on its own below (so no item is both merged
       and pruned, and a harmful twin does not drag a good item down with it).
    2. Prunes: what remains with an effective weight under the floor, the lowest first.
    3. Evictions: while more remain than the cap, the least useful (`_merit`'s last).
    The result does not depend on the order of `records` or of the neighbour lists."""
    live: dict[str, Record] = {}
    for rec in records:
        if rec.item.id in live:
            raise ValueError(f"item {rec.item.id[:12]} given twice to consolidate")
        live[rec.item.id] = rec

    pairs: dict[tuple[str, str], float] = {}
    for a_id, near in neighbours.items():
        for b_id, sim in near:
            a, b = live.get(a_id), live.get(b_id)
            if (a is None or b is None or a_id == b_id or a.item.domain != b.item.domain
                    or not sim >= settings.merge_threshold):
                continue
            pair = (min(a_id, b_id), max(a_id, b_id))
            pairs[pair] = max(sim, pairs.get(pair, sim))  # either direction, the same

    decisions: list[Decision] = []
    for (a_id, b_id), sim in sorted(pairs.items(), key=lambda p: (-p[1], p[0])):
        a, b = live.get(a_id), live.get(b_id)
        if a is None or b is None:  # merged away already
            continue
        m = merge(a, b, sim, now, settings)
        if effective_weight(m.stats, now, settings) < settings.prune_floor:
            continue
        decisions.append(m)
        live[m.keep] = replace(live[m.keep], stats=m.stats)
        del live[m.drop]

    weak = [(effective_weight(r.stats, now, settings), r.item.id) for r in live.values()]
    for w, item_id in sorted(p for p in weak if p[0] < settings.prune_floor):
        decisions.append(Prune(item_id=item_id, weight=w, floor=settings.prune_floor))
        del live[item_id]

    excess = len(live) - settings.size_cap
    if excess > 0:
        worst_first = sorted(live.values(), key=lambda r: _merit(r, now, settings),
                             reverse=True)
        for rec in worst_first[:excess]:
            decisions.append(Evict(item_id=rec.item.id,
                                   weight=effective_weight(rec.stats, now, settings),
                                   cap=settings.size_cap))
    return decisions


# ---- the gate before an admission replay ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Precheck:
    replay: bool  # spend an admission replay on the candidate
    reason: str  # "novel", "duplicate", "refused_before" or "queue_full"
    item_id: str  # the nearest existing item, or "" when there is none
    similarity: float  # to that item (0.0 when none)
    message: str  # for the user, the log and the event


@dataclass(frozen=True, slots=True)
class EarlierRefusal:
    """The same candidate (text and domain) refused for no gain before."""

    age_s: float  # since that decision
    utility: float  # what its replay measured
    tasks: int  # over how many tasks


def precheck(similarities: Sequence[tuple[str, float]], queue_length: int,
             settings: ControllerSettings, earlier: EarlierRefusal | None = None
             ) -> Precheck:
    """The cheap gate before a replay. `similarities`: the candidate's cosine to existing
    items of its domain (an insight entering another domain is not a duplicate there:
    it must prove itself again). `earlier`: the last time this very candidate was
    refused for no gain, if ever; within `refusal_memory_s` that measurement stands.
    A near-duplicate is refused, naming the item, rather than reinforcing it: a
    candidate's existence is no measurement, and reinforcing would let a peer pump an
    item's weight by offering rewordings of it; the existing item is measured on its
    every use anyway. A duplicate is reported before an earlier refusal, and both before
    a full queue: it never would be admitted, whatever the queue."""
    if queue_length < 0:
        raise ValueError(f"queue length {queue_length}: not a length")
    near = [(s, i) for i, s in similarities if not math.isnan(s)]
    sim, item_id = min(near, key=lambda p: (-p[0], p[1])) if near else (0.0, "")
    if item_id and sim >= settings.merge_threshold:
        return Precheck(replay=False, reason="duplicate", item_id=item_id, similarity=sim,
                        message=f"a near-duplicate of item {item_id[:12]} (cosine "
                                f"{sim:.3g} >= {settings.merge_threshold:.3g})")
    if earlier is not None and 0 <= earlier.age_s < settings.refusal_memory_s:
        return Precheck(replay=False, reason="refused_before", item_id=item_id,
                        similarity=sim,
                        message=f"the same text was refused in this domain "
                                f"{earlier.age_s / 3600:.3g} h ago (utility "
                                f"{earlier.utility:.3g} over {earlier.tasks} tasks); it is "
                                f"judged again after {settings.refusal_memory_s / 3600:.3g} h")
    if queue_length >= settings.queue_cap:
        return Precheck(replay=False, reason="queue_full", item_id=item_id, similarity=sim,
                        message=f"{queue_length} candidates already wait for a replay "
                                f"(at most {settings.queue_cap})")
    nearest = f"nearest {item_id[:12]} at cosine {sim:.3g}" if item_id else "no items yet"
    return Precheck(replay=True, reason="novel", item_id=item_id, similarity=sim,
                    message=f"no item within cosine {settings.merge_threshold:.3g} "
                            f"({nearest})")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} {value} is not a finite number")
