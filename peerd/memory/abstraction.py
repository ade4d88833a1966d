"""Which proven items the memory abstracts on its own, and into which domains
(docs/sedm.md, "Abstraction"). Pure: no model, no I/O, time passed in.

An item is abstracted only once its own uses have proven it: at least `min_uses` scored
runs were given it, they beat the no-memory baseline on average (the admission replay
alone is a handful of tasks; the uses are the evidence that it keeps helping), and its
effective weight is still at least `min_weight`. An insight is never abstracted again:
it is already the general form, and a rewrite of a rewrite drifts from what was proven.

Its insight is offered to every other domain where this peer holds at least `min_runs`
scored runs: with fewer, the replay that must admit it there has nothing (or too little)
to be judged on. Each (item, domain) pair is tried once, whatever its verdict: the
verdict is the measurement, and trying again would pay the same replays to repeat it
(an operator can still ask for one: `POST /v1/memory/items/{id}/abstract`). A round
takes at most `per_round` items, the heaviest first, so abstraction never crowds the
admission desk, whose candidates come from users' runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from peerd.memory.controller import ControllerSettings, effective_weight
from peerd.memory.item import Record

INSIGHT = "insight"


@dataclass(frozen=True, slots=True)
class AbstractionRules:
    # Uses that prove an item: about twice the evidence of its admission replay (4 tasks).
    min_uses: int = 8
    # A proven item still worth its place: ten times the prune floor.
    min_weight: float = 0.1
    # Scored runs a domain needs before an insight can be judged there (the admission
    # replay takes up to 4).
    min_runs: int = 4
    # Items abstracted a round: each is one model call plus two replays a task per domain.
    per_round: int = 1

    def __post_init__(self) -> None:
        if self.min_uses < 1 or self.min_runs < 1 or self.per_round < 1:
            raise ValueError("abstraction: min_uses, min_runs and per_round are at least 1")
        if not 0.0 <= self.min_weight < float("inf"):
            raise ValueError(f"abstraction: min_weight {self.min_weight} must be at least 0")


@dataclass(frozen=True, slots=True)
class Abstraction:
    item_id: str
    domains: tuple[str, ...]  # where its insight is offered, the most runs first


def proven(rec: Record, now: float, settings: ControllerSettings,
           rules: AbstractionRules) -> bool:
    s = rec.stats
    return (rec.item.kind != INSIGHT and s.uses >= rules.min_uses and s.delta_sum > 0
            and effective_weight(s, now, settings) >= rules.min_weight)


def due(records: Iterable[Record], runs: Mapping[str, int],
        tried: Collection[tuple[str, str]], now: float, settings: ControllerSettings,
        rules: AbstractionRules = AbstractionRules()) -> list[Abstraction]:
    """This round's abstractions: proven items, the heaviest first (ties by id), each
    with the domains (other than its own, holding at least min_runs scored runs, not
    tried for it yet) its insight goes to; at most per_round of them."""
    targets = sorted((d for d, n in runs.items() if n >= rules.min_runs),
                     key=lambda d: (-runs[d], d))
    ranked = sorted((r for r in records if proven(r, now, settings, rules)),
                    key=lambda r: (-effective_weight(r.stats, now, settings), r.item.id))
    out: list[Abstraction] = []
    for rec in ranked:
        domains = tuple(d for d in targets
                        if d != rec.item.domain and (rec.item.id, d) not in tried)
        if domains:
            out.append(Abstraction(rec.item.id, domains))
            if len(out) == rules.per_round:
                break
    return out
