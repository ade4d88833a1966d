"""Weighted chain-of-thought voting. Pure: ballots in, a tally out.

Each worker's chain reached one (normalised) answer. Its weight is

    weight = reputation * certainty * (0.75 + 0.25 * match)

with reputation and match in [0, 1] (reputation floored at MIN_REPUTATION so a
newcomer's chain still counts). Match is the worker's own claim, so it moves a weight
by at most a third. What a peer cannot claim for itself, its reputation, is what lets a
track record count.

Certainty is how sure the model is of the chain, relative to the task's surest chain:

    certainty = max(FLOOR, (measured / best) ** SHARPNESS)

where `measured` is the chain's confidence as the requester measured it with its own
model (solver.py: the chain's likelihood under the prompt its worker was given) and
`best` the highest of those among the task's chains. A small model's chains scatter
over many answers, and the chain it is surest of is right far more often than the
plurality (DeepConf, Fu et al. 2025, weights votes by the same signal). SHARPNESS
says how much surer counts; FLOOR bounds it: at equal reputation, four agreeing chains
always win against one (a tie goes to more chains), however sure the model is of that
one and whatever match it claims. A measurement is the requester's own, so a worker
cannot raise its weight by saying it is sure; it could only write a chain the model
finds likely.

When the requester could not measure every chain (it serves no model of its own), the
workers' claimed confidences stand in, bounded as match is: certainty = 0.75 + 0.25 *
confidence, so two agreeing chains outweigh a third whatever it claims
(2 * 0.75 * 0.75 > 1).

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
# How much surer counts: the sharpest exponent that still gained right answers on a
# development draw, never the benchmark's questions (the draw and its figures:
# bench/README.md, Symphony).
SHARPNESS = 16.0
# A measured chain's least certainty. With the least match term (0.75), four agreeing
# chains at the floor weigh what the surest chain claiming a perfect match does, and the
# tie goes to more chains: one liar never outvotes four honest workers.
FLOOR = 1 / 3


@dataclass(frozen=True, slots=True)
class Ballot:
    peer_id: str
    answer: str | None  # normalised; None: the chain reached no answer
    confidence: float  # the worker's claim, [0, 1]
    match: float  # the worker's bid match, [0, 1]
    reputation: float  # the requester's view of the worker, [0, 1]
    measured: float | None = None  # the requester's measure of the chain, [0, 1]


@dataclass(frozen=True, slots=True)
class Tally:
    answer: str | None  # None when no chain reached an answer
    totals: dict[str, float]  # answer -> summed weight
    counts: dict[str, int]  # answer -> chains
    weights: dict[str, float]  # peer id -> its chain's weight


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x)) if x == x else 0.0  # NaN counts as 0


def certainty(measured: float, best: float) -> float:
    """A measured chain's certainty, given the task's best measured chain."""
    if best <= 0.0:
        return 1.0  # no chain the model finds likely: measurement tells them apart by nothing
    return max(FLOOR, float(min(1.0, _unit(measured) / best) ** SHARPNESS))


def weight(b: Ballot, best: float | None = None) -> float:
    """The ballot's weight; `best`: the task's best measured confidence, None when the
    chains were not all measured (the claimed confidence then stands in)."""
    reputation = max(MIN_REPUTATION, _unit(b.reputation))
    if best is None or b.measured is None:
        sure = 0.75 + 0.25 * _unit(b.confidence)
    else:
        sure = certainty(b.measured, best)
    return reputation * sure * (0.75 + 0.25 * _unit(b.match))


def tally(ballots: Iterable[Ballot]) -> Tally:
    unique: dict[str, Ballot] = {}
    for b in ballots:  # one chain per worker: a repeated ballot is ignored, not summed
        unique.setdefault(b.peer_id, b)
    answered = [b for b in unique.values() if b.answer is not None]
    best = None
    if answered and all(b.measured is not None for b in answered):
        best = max(_unit(b.measured or 0.0) for b in answered)
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    weights: dict[str, float] = {}
    for b in unique.values():
        w = weight(b, best)
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
