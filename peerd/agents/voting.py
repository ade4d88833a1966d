"""Weighted chain-of-thought voting. Pure: ballots in, a tally out.

Each worker's chain reached one (normalised) answer. Its weight is

    weight = reputation * (0.75 + 0.25 * confidence) * (0.75 + 0.25 * match)

with reputation, confidence and match in [0, 1] (reputation floored at
MIN_REPUTATION so a newcomer's chain still counts). Confidence and match are the
worker's own claims, so each may move its weight by at most a third
(0.75 -> 1.0): at equal reputation two agreeing chains always outweigh a third
chain, however sure of itself that one says it is (2 * 0.75 * 0.75 > 1). What a peer
cannot claim for itself, its reputation, is what lets a track record count.

The final answer is the argmax over answers of the summed weights of the chains that
reached it. Ties (within 1e-9) go to the answer more chains reached, then to the
smaller answer string: deterministic, whatever order the ballots came in. Chains
without an answer are shown but carry no vote.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MIN_REPUTATION = 0.05
TIE_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Ballot:
    peer_id: str
    answer: str | None  # normalised; None: the chain reached no answer
    confidence: float  # the worker's claim, [0, 1]
    match: float  # the worker's bid match, [0, 1]
    reputation: float  # the requester's view of the worker, [0, 1]


@dataclass(frozen=True, slots=True)
class Tally:
    answer: str | None  # None when no chain reached an answer
    totals: dict[str, float]  # answer -> summed weight
    counts: dict[str, int]  # answer -> chains
    weights: dict[str, float]  # peer id -> its chain's weight


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x)) if x == x else 0.0  # NaN counts as 0


def weight(b: Ballot) -> float:
    reputation = max(MIN_REPUTATION, _unit(b.reputation))
    return reputation * (0.75 + 0.25 * _unit(b.confidence)) * (0.75 + 0.25 * _unit(b.match))


def tally(ballots: Iterable[Ballot]) -> Tally:
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    weights: dict[str, float] = {}
    for b in ballots:
        if b.peer_id in weights:
            continue  # one chain per worker: a repeated ballot is ignored, not summed
        w = weight(b)
        weights[b.peer_id] = w
        if b.answer is None:
            continue
        totals[b.answer] = totals.get(b.answer, 0.0) + w
        counts[b.answer] = counts.get(b.answer, 0) + 1
    winner = None
    for answer in sorted(totals):  # sorted: the tie-break below sees a fixed order
        if winner is None or _beats(answer, winner, totals, counts):
            winner = answer
    return Tally(winner, totals, counts, weights)


def _beats(a: str, b: str, totals: dict[str, float], counts: dict[str, int]) -> bool:
    if totals[a] > totals[b] + TIE_EPSILON:
        return True
    if totals[a] < totals[b] - TIE_EPSILON:
        return False
    if counts[a] != counts[b]:
        return counts[a] > counts[b]
    return a < b
