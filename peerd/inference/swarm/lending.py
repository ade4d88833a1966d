"""What a shard server lends to other peers' sessions, and in what shares.

Two resources, each a `Shares` (peerd/shares.py) held by entry peers: session slots
(`max_sessions`) and KV-cache bytes (`max_kv_bytes`). A session is charged to its entry
peer: the peer whose request it serves, which confirmed the session by answering the
last hop's return handshake.

Pay for what is used. A session's KV is charged as it grows, in positions times its
span's bytes per position: at OPEN only a headroom (`headroom` positions, at most its
max_length), and before each FORWARD enough for the positions it will hold plus the
headroom again; a truncated cache (speculative rollback, a pooled session's next request)
gives back what it no longer needs.

Under pressure the idlest idle session of the peer furthest above its fair share goes
first, before anyone within their share is refused (`Shares.ask`: Reclaim). A session
in a forward is never evicted. The guarantee for a running generation: a session whose
entry peer stays within its fair share always gets its top-up (the peers above their
share hold at least what it lacks), unless every session it would take back is busy at
that instant; and a FORWARD that fits the headroom already held never waits on the pool
at all. Only a session whose peer is over its share can be refused mid-answer: it is
evicted like any other over-share session, and its entry replays elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from peerd.shares import Grant, Reclaim, Refuse, Shares


class Lent(Protocol):
    """What lending needs of a session (server._Session)."""

    id: str
    kv_per_position: int
    reserved_positions: int
    busy: bool  # in a forward now: never evicted
    last_used: float  # monotonic: when it last finished a forward (or opened)

    @property
    def holder(self) -> str: ...  # the entry peer

    @property
    def max_length(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Eviction:
    session: str
    holder: str
    resource: str  # what was short: "sessions" | "kv_bytes"
    for_peer: str  # who needed it


class OverShare(Exception):
    """The peer asks for more than its fair share while others want theirs."""

    def __init__(self, resource: str, peer: str, held: int, fair_share: float) -> None:
        super().__init__(f"{peer} holds {held} {resource}, its fair share is "
                         f"{fair_share:.0f} while others want theirs")
        self.resource, self.peer, self.held, self.fair_share = resource, peer, held, fair_share


@dataclass
class Lending:
    """The shares of one shard server; the server calls it on the event loop."""

    max_sessions: int
    max_kv_bytes: int
    evict: Callable[[Any, Eviction], None]  # end this session now (the server's)
    headroom: int = 128  # KV positions charged beyond what a session holds
    clock: Callable[[], float] = time.monotonic
    sessions: Shares = field(init=False)
    kv: Shares = field(init=False)
    lent: dict[str, Any] = field(default_factory=dict)  # session id -> session

    def __post_init__(self) -> None:
        self.sessions = Shares("sessions", self.max_sessions)
        self.kv = Shares("kv_bytes", self.max_kv_bytes)

    def open(self, s: Lent) -> None:
        """A slot and the headroom's KV for a new session; OverShare if its peer is over
        its share of either (after evicting others' idle sessions where that helps)."""
        self._take(self.sessions, s.holder, 1, s.id)
        s.reserved_positions = 0
        try:
            self._charge(s, min(s.max_length, self.headroom))
        except OverShare:
            self.sessions.release(s.holder, 1)
            raise
        self.lent[s.id] = s

    def grow(self, s: Lent, positions: int) -> None:
        """Before a forward that leaves `positions` in the cache: charge them and the
        headroom, or at least them; OverShare if not even they can be had."""
        want = min(s.max_length, positions + self.headroom)
        if want <= s.reserved_positions:
            self._shrink(s, want)  # a truncated cache gives back what it no longer needs
            return
        try:
            self._charge(s, want)
        except OverShare:
            if positions > s.reserved_positions:
                self._charge(s, positions)  # raises OverShare when even this is too much

    def close(self, s: Lent) -> None:
        if self.lent.pop(s.id, None) is None:
            return
        self.sessions.release(s.holder, 1)
        self.kv.release(s.holder, s.reserved_positions * s.kv_per_position)
        s.reserved_positions = 0

    def held(self) -> dict[str, dict[str, Any]]:
        """For status and metrics: each resource's capacity and holders."""
        return {r.name: {"capacity": r.capacity, "used": r.used, "held": dict(r.held)}
                for r in (self.sessions, self.kv)}

    # ---- inside -------------------------------------------------------------------

    def _charge(self, s: Lent, positions: int) -> None:
        extra = (positions - s.reserved_positions) * s.kv_per_position
        if extra > 0:
            self._take(self.kv, s.holder, extra, s.id)
            s.reserved_positions = positions

    def _shrink(self, s: Lent, positions: int) -> None:
        if positions < s.reserved_positions:
            self.kv.release(s.holder, (s.reserved_positions - positions) * s.kv_per_position)
            s.reserved_positions = positions

    def _take(self, shares: Shares, peer: str, amount: int, sid: str) -> None:
        decision = shares.ask(peer, amount)
        if isinstance(decision, Refuse):
            raise OverShare(shares.name, peer, decision.held, decision.fair_share)
        if isinstance(decision, Reclaim):
            self._reclaim(shares, peer, amount, sid)
        assert isinstance(decision, Grant | Reclaim)
        shares.grant(peer, amount)

    def _reclaim(self, shares: Shares, peer: str, amount: int, sid: str) -> None:
        """Evict idle sessions of the peers furthest over their share until `amount` is
        free; OverShare (nothing taken back beyond what was evicted) if the sessions
        that could go are all busy."""
        skip: set[str] = set()
        while shares.free < amount:
            victim_peer = shares.most_over(peer, amount, frozenset(skip))
            if victim_peer is None:
                held = shares.held.get(peer, 0)
                raise OverShare(shares.name, peer, held, shares.fair(peer, amount)[peer])
            idle = [v for v in self._of(victim_peer) if not v.busy and v.id != sid]
            if not idle:
                skip.add(victim_peer)
                continue
            victim = min(idle, key=lambda v: v.last_used)
            self.close(victim)
            self.evict(victim, Eviction(victim.id, victim_peer, shares.name, peer))

    def _of(self, holder: str) -> Iterator[Any]:
        return (s for s in self.lent.values() if s.holder == holder)
