"""Reputation: what a requester has seen of each worker, and what others report.

Pure: no I/O, time passed in. After each task the requester scores every worker it
elected with

    outcome = 0.7 * agreed + 0.3 * punctual        (agreed, punctual in {0, 1})

(agreed: its answer was the accepted one; punctual: it answered, validly, before its
deadline; a worker that timed out, crashed or sent a forged or oversized answer
scores 0) and folds it into an exponentially weighted record,

    score <- (1 - ALPHA) * score + ALPHA * outcome,   starting from PRIOR = 0.5.

With ALPHA = 0.2, ten tasks take an always-wrong but punctual peer from 0.5 to 0.32
and an always-right one to 0.95.

Each requester publishes its scores in its own ledger entry (`reputation`), and
reads everyone else's. Its view of a subject combines its own score (PRIOR if it has
none) with the others' reports, its own weighted twice as much:

    view = (2 * own + 1 * others) / 3     (own alone when nobody else reports)

where `others` is the mean of the reports, each weighted by the requester's own view
of the reporter (a peer caught lying loses its say about others too). A peer's
report about itself never counts, nor does any report in our own entry (that is our
own score already).

A no-show (a worker elected that neither answered nor refused: silent past its
deadline, or gone) is also remembered on its own, in `NoShows`: for NO_SHOW_S, or until
it delivers a seat of ours again, the election ranks its bids after every other
bidder's (election.py), whatever it claims. The score alone is too slow for that: one
no-show takes a peer from 0.5 to 0.4, and a bid claiming a perfect match at 0.4 still
outranks an honest newcomer's matching less than 0.6 at 0.5, while every seat held in
silence costs the requester a whole deadline.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ALPHA = 0.2
PRIOR = 0.5
AGREEMENT_SHARE = 0.7
OWN_WEIGHT = 2.0
OTHERS_WEIGHT = 1.0
MAX_PUBLISHED = 256  # peers in our ledger entry: ~60 bytes each on the wire
MAX_RECORDS = 4096  # peers remembered; the longest unseen is forgotten first
NO_SHOW_S = 600.0  # a no-show ranks last this long, unless it delivers a seat first
MAX_NO_SHOWS = 4096  # no-shows remembered; the oldest is forgotten first


def outcome(*, agreed: bool, punctual: bool) -> float:
    return AGREEMENT_SHARE * float(agreed) + (1.0 - AGREEMENT_SHARE) * float(punctual)


@dataclass(slots=True)
class Record:
    score: float
    tasks: int
    updated: float  # unix seconds of the last observation


class ReputationBook:
    """One requester's own observations, by peer id."""

    def __init__(self, owner: str, records: Mapping[str, Record] | None = None) -> None:
        self.owner = owner
        self.records: dict[str, Record] = dict(records or {})

    def observe(self, peer: str, *, agreed: bool, punctual: bool, now: float) -> float:
        """Fold one task's outcome into `peer`'s record; its new score. Our own peer is
        never scored: that would be a claim about ourselves."""
        if peer == self.owner:
            return PRIOR
        held = self.records.get(peer) or Record(PRIOR, 0, now)
        held.score = (1.0 - ALPHA) * held.score + ALPHA * outcome(agreed=agreed,
                                                                  punctual=punctual)
        held.tasks += 1
        held.updated = now
        self.records[peer] = held
        if len(self.records) > MAX_RECORDS:
            del self.records[min(self.records, key=lambda p: self.records[p].updated)]
        return held.score

    def own(self) -> dict[str, float]:
        return {peer: r.score for peer, r in self.records.items()}

    def published(self) -> dict[str, float]:
        """What goes in our ledger entry: the most recently observed peers."""
        recent = sorted(self.records.items(), key=lambda kv: (-kv[1].updated, kv[0]))
        return {peer: round(r.score, 4) for peer, r in recent[:MAX_PUBLISHED]}

    def to_json(self) -> dict[str, Any]:
        return {peer: [r.score, r.tasks, r.updated] for peer, r in self.records.items()}

    @classmethod
    def from_json(cls, owner: str, data: Any) -> ReputationBook:
        """Tolerant: a damaged file costs the bad rows, not the book."""
        records: dict[str, Record] = {}
        if isinstance(data, dict):
            for peer, row in data.items():
                try:  # (a number like 1e400 reads as inf, and int(inf) overflows)
                    score, tasks, updated = float(row[0]), int(row[1]), float(row[2])
                except (TypeError, ValueError, IndexError, KeyError, OverflowError):
                    continue
                if isinstance(peer, str) and 0.0 <= score <= 1.0 and peer != owner \
                        and tasks >= 0 and math.isfinite(updated):
                    records[peer] = Record(score, tasks, updated)
        return cls(owner, records)


class NoShows:
    """The workers that left a seat of ours unanswered lately (time passed in)."""

    def __init__(self) -> None:
        self._at: OrderedDict[str, float] = OrderedDict()  # peer -> its last no-show

    def missed(self, peer: str, now: float) -> None:
        self._at.pop(peer, None)
        self._at[peer] = now
        while len(self._at) > MAX_NO_SHOWS:
            self._at.popitem(last=False)

    def delivered(self, peer: str) -> None:
        self._at.pop(peer, None)

    def recent(self, peer: str, now: float) -> bool:
        """Did `peer` leave a seat unanswered within NO_SHOW_S, and deliver none since?"""
        at = self._at.get(peer)
        return at is not None and now - at < NO_SHOW_S

    def to_json(self) -> dict[str, float]:
        """For a file: meaningful across a restart only with a wall clock's times."""
        return dict(self._at)

    @classmethod
    def from_json(cls, data: Any, now: float) -> NoShows:
        """Tolerant, as ReputationBook.from_json; entries already over are left out."""
        shows = cls()
        if isinstance(data, dict):
            rows = [(at, peer) for peer, at in data.items() if isinstance(peer, str)
                    and isinstance(at, int | float) and not isinstance(at, bool)
                    and math.isfinite(at) and now - at < NO_SHOW_S]
            for at, peer in sorted(rows)[-MAX_NO_SHOWS:]:
                shows._at[peer] = float(at)
        return shows


def _report(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def view(subject: str, owner: str, own: Mapping[str, float],
         reports: Mapping[str, Mapping[str, float]]) -> float:
    """The owner's reputation of `subject`, combining its own score with `reports`
    (observer peer id -> that observer's published scores)."""
    mine = own.get(subject, PRIOR)
    total = 0.0
    trust_sum = 0.0
    for observer, scores in reports.items():
        if observer in (subject, owner):
            continue
        reported = _report(scores.get(subject))
        if reported is None:
            continue
        trust = own.get(observer, PRIOR)
        total += trust * reported
        trust_sum += trust
    if trust_sum <= 0.0:
        return mine
    others = total / trust_sum
    return (OWN_WEIGHT * mine + OTHERS_WEIGHT * others) / (OWN_WEIGHT + OTHERS_WEIGHT)


def views(subjects: Iterable[str], owner: str, own: Mapping[str, float],
          reports: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`view` of each of `subjects`, from one walk of `reports`: each observer's scores
    are read once (or only the subjects', when fewer), never once per subject, so a
    book of thousands of entries costs what their reports hold. Each subject's sums run
    in the observers' order, as `view`'s do: the same numbers."""
    wanted = set(subjects)
    total = dict.fromkeys(wanted, 0.0)
    trust_sum = dict.fromkeys(wanted, 0.0)
    for observer, scores in reports.items():
        if observer == owner:
            continue
        trust = own.get(observer, PRIOR)
        named = ((s, scores.get(s)) for s in wanted) if len(wanted) <= len(scores) else \
            ((s, v) for s, v in scores.items() if s in wanted)
        for subject, value in named:
            reported = None if subject == observer else _report(value)
            if reported is not None:
                total[subject] += trust * reported
                trust_sum[subject] += trust
    out = {}
    for subject in wanted:
        mine = own.get(subject, PRIOR)
        if trust_sum[subject] <= 0.0:
            out[subject] = mine
        else:
            others = total[subject] / trust_sum[subject]
            out[subject] = ((OWN_WEIGHT * mine + OTHERS_WEIGHT * others)
                            / (OWN_WEIGHT + OTHERS_WEIGHT))
    return out
