"""Fair shares of what a peer lends to others: max-min fairness, and who gives way.

A lent resource (shard sessions, KV bytes, a worker's task seats...) has a capacity,
and each remote peer holds some of it. A peer's fair share is its max-min fair
allocation: the capacity divided equally among the peers that want it, where a peer
that wants less than its part keeps what it wants and the rest is divided again among
the others (water-filling). A peer alone may hold everything; its share shrinks as
others ask. What a holder "wants" is what it holds, unless the caller knows more:
a resource that cannot be taken back (a worker's task seats) must know who was refused
and still waits, and passes that extra demand as `wanting` (peer -> amount beyond what
it holds), or the peers holding everything would always keep it.

`Shares.ask(peer, amount)` answers a request for `amount` more:
- `Grant`: it fits in what is free;
- `Reclaim`: it fits once peers holding more than their fair share give some back; the
  caller takes it back (evicts), from `Shares.most_over()` first, then grants;
- `Refuse`: the peer would hold more than its fair share: it waits, or goes elsewhere.

The guarantee behind `Reclaim`: the fair allocations of all demanders sum to the
capacity, so when a peer within its share is short by `need`, the others hold at least
`need` above theirs. Sans-I/O and unit-tested; the caller owns the things held.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


def max_min(capacity: float, demands: Mapping[str, float]) -> dict[str, float]:
    """Each demander's max-min fair allocation of `capacity` (water-filling): the
    smallest demands are met in full, the rest share equally what is left."""
    fair: dict[str, float] = {}
    left = float(capacity)
    ordered = sorted(demands.items(), key=lambda kv: (kv[1], kv[0]))
    for i, (peer, demand) in enumerate(ordered):
        level = left / (len(ordered) - i)
        fair[peer] = min(float(demand), level)
        left -= fair[peer]
    return fair


@dataclass(frozen=True, slots=True)
class Grant:
    pass


@dataclass(frozen=True, slots=True)
class Reclaim:
    need: int  # how much others must give back first
    fair_share: float  # the asking peer's share once it holds what it asks


@dataclass(frozen=True, slots=True)
class Refuse:
    fair_share: float  # what the asking peer may hold while others want theirs
    held: int


Decision = Grant | Reclaim | Refuse


@dataclass
class Shares:
    """One lent resource: its capacity and what each peer holds of it."""

    name: str  # "sessions", "kv_bytes", ...: metrics, events, status
    capacity: int
    held: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(self.held.values())

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def fair(self, asking: str | None = None, amount: int = 0,
             wanting: Mapping[str, int] | None = None) -> dict[str, float]:
        """Every demander's fair share, with `asking` wanting `amount` more than it holds
        and each peer in `wanting` that much more than it holds (`asking`'s own entry
        there is superseded by `amount`)."""
        demands: dict[str, float] = {p: float(h) for p, h in self.held.items() if h > 0}
        for peer, extra in (wanting or {}).items():
            if extra > 0:
                demands[peer] = float(self.held.get(peer, 0) + extra)
        if asking is not None:
            demands[asking] = float(self.held.get(asking, 0) + amount)
        return max_min(self.capacity, demands)

    def ask(self, peer: str, amount: int, wanting: Mapping[str, int] | None = None
            ) -> Decision:
        """May `peer` take `amount` more, while the peers in `wanting` wait for theirs?
        What is free is granted at once when nobody else waits; when others do, only
        within `peer`'s fair share. (Nothing changes until `grant`.)"""
        others = {p: w for p, w in (wanting or {}).items() if p != peer and w > 0}
        if amount <= self.free and not others:
            return Grant()
        after = self.held.get(peer, 0) + amount
        share = self.fair(peer, amount, others)[peer]
        if after > share + 1e-9 or after > self.capacity:
            return Refuse(share, self.held.get(peer, 0))
        if amount <= self.free:
            return Grant()
        return Reclaim(amount - self.free, share)

    def most_over(self, asking: str, amount: int, exclude: frozenset[str] = frozenset(),
                  wanting: Mapping[str, int] | None = None) -> str | None:
        """The holder furthest above its fair share while `asking` wants `amount` more
        and the peers in `wanting` theirs (not `asking`, nor one in `exclude`); None when
        nobody is above it."""
        fair = self.fair(asking, amount, wanting)
        over = [(self.held[p] - fair[p], p) for p in self.held
                if p != asking and p not in exclude and self.held[p] > fair[p] + 1e-9]
        return max(over)[1] if over else None

    def grant(self, peer: str, amount: int) -> None:
        if amount < 0 or amount > self.free:
            raise ValueError(f"{self.name}: cannot grant {amount} of {self.free} free")
        if amount:
            self.held[peer] = self.held.get(peer, 0) + amount

    def release(self, peer: str, amount: int) -> None:
        have = self.held.get(peer, 0)
        if not 0 <= amount <= have:
            raise ValueError(f"{self.name}: {peer} releases {amount} but holds {have}")
        if amount == have:
            self.held.pop(peer, None)
        else:
            self.held[peer] = have - amount
