"""Routing: the cheapest chain of shard peers covering all decoder layers.

Pure functions over what the ledger says (who serves which layers, how fast) and
what we measured (round-trip time to each peer). Petals' Dijkstra, Parallax's DP:

    nodes  = layer boundaries 0..L
    edge   = a peer serving [s, e) can run any [a, b) with s <= a < b <= e
    cost   = rtt_ms(peer) + 1000 * (b - a) / layers_per_s(peer)

where layers_per_s = advertised tokens/s x the span it advertised (a token through
a span of k layers costs k layer-steps). A peer's RTT as the entry peer measured it
stands in for the hop cost; the ledger does not carry the pairwise matrix.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocols.ledger import LedgerEntry
from protocols.shard import FEATURE_SESSIONS

DEFAULT_MS_PER_LAYER = 2.0  # for a peer that has not measured its throughput yet
DEFAULT_RTT_MS = 5.0  # for a peer we have not probed yet


@dataclass(frozen=True, slots=True)
class Server:
    """One peer's advertised span of one model."""

    peer_id: str
    start: int
    end: int  # exclusive
    tokens_per_s: float = 0.0
    rtt_ms: float | None = None
    dtype: str = ""  # its compute dtype, as advertised ("" unknown)

    def ms_per_layer(self) -> float:
        if self.tokens_per_s <= 0 or not math.isfinite(self.tokens_per_s):
            return DEFAULT_MS_PER_LAYER
        return 1000.0 / (self.tokens_per_s * (self.end - self.start))

    def cost_ms(self, a: int, b: int) -> float:
        """The hop cost of running layers [a, b) here: its RTT and its compute."""
        rtt = DEFAULT_RTT_MS if self.rtt_ms is None else self.rtt_ms
        return rtt + (b - a) * self.ms_per_layer()


@dataclass(frozen=True, slots=True)
class Span:
    peer_id: str
    start: int
    end: int
    cost_ms: float


@dataclass(frozen=True, slots=True)
class Route:
    spans: tuple[Span, ...]
    cost_ms: float


@dataclass(frozen=True, slots=True)
class NoRoute:
    """The usable servers leave these layer ranges uncovered."""

    missing: tuple[tuple[int, int], ...]

    def describe(self) -> str:
        return ", ".join(f"[{a}, {b})" for a, b in self.missing)


def servers_by_model(entries: Iterable[LedgerEntry],
                     rtt_ms: Mapping[str, float] | None = None) -> dict[str, list[Server]]:
    """model id -> the spans the ledger advertises for it, with our measured RTTs; a
    span a peer lists again is one server (the first listing): find_route tries each
    server from every layer boundary. Only peers that speak our version of the shard
    protocol (FEATURE_SESSIONS) serve: a session through any other would fail."""
    out: dict[str, list[Server]] = {}
    seen: set[tuple[str, str, int, int]] = set()
    for e in entries:
        if FEATURE_SESSIONS not in e.features:
            continue
        for m in e.models:
            key = (m.model_id, e.peer_id, m.layer_start, m.layer_end)
            if key in seen:
                continue
            seen.add(key)
            rtt = None if rtt_ms is None else rtt_ms.get(e.peer_id)
            out.setdefault(m.model_id, []).append(
                Server(e.peer_id, m.layer_start, m.layer_end, m.tokens_per_s, rtt, m.dtype))
    return out


def route_peers(servers: Iterable[Server], me: str, span: tuple[int, int]) -> list[str]:
    """The peers a route of this model may cross, for our node to stay connected to
    (Node.keep_connected), nearest first: those serving the layer after our span or the
    layer before it (our own sessions' next hop, and the hop that sends to us), then
    those serving layer 0 (a request we take starts there), then the rest; ties by
    peer id."""
    start, end = span

    def serves(s: Server, layer: int) -> bool:
        return s.start <= layer < s.end

    rank: dict[str, int] = {}
    for s in servers:
        if s.peer_id == me:
            continue
        r = 0 if serves(s, end) or serves(s, start - 1) else 1 if serves(s, 0) else 2
        rank[s.peer_id] = min(r, rank.get(s.peer_id, r))
    return sorted(rank, key=lambda pid: (rank[pid], pid))


def coverage_gaps(servers: Iterable[Server], num_layers: int) -> list[tuple[int, int]]:
    covered = [False] * num_layers
    for s in servers:
        for i in range(max(0, s.start), min(num_layers, s.end)):
            covered[i] = True
    gaps: list[tuple[int, int]] = []
    i = 0
    while i < num_layers:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < num_layers and not covered[j]:
            j += 1
        gaps.append((i, j))
        i = j
    return gaps


def find_route(servers: Iterable[Server], num_layers: int,
               exclude: frozenset[str] = frozenset()) -> Route | NoRoute:
    """Cheapest chain over [0, num_layers); deterministic on ties (by peer id)."""
    usable = sorted((s for s in servers
                     if s.peer_id not in exclude and 0 <= s.start < s.end <= num_layers),
                    key=lambda s: (s.peer_id, s.start, s.end))
    gaps = coverage_gaps(usable, num_layers)
    if gaps:
        return NoRoute(tuple(gaps))
    boundaries = sorted({0, num_layers} | {b for s in usable for b in (s.start, s.end)})
    best: dict[int, float] = {0: 0.0}
    back: dict[int, tuple[int, Span]] = {}
    heap: list[tuple[float, int]] = [(0.0, 0)]
    while heap:
        cost, at = heapq.heappop(heap)
        if at == num_layers:
            break
        if cost > best.get(at, math.inf):
            continue
        for s in usable:
            if not s.start <= at < s.end:
                continue
            for b in boundaries:
                if at < b <= s.end:
                    step = s.cost_ms(at, b)
                    if cost + step < best.get(b, math.inf) - 1e-9:
                        best[b] = cost + step
                        back[b] = (at, Span(s.peer_id, at, b, step))
                        heapq.heappush(heap, (cost + step, b))
    spans: list[Span] = []
    at = num_layers
    while at != 0:
        prev, span = back[at]
        spans.append(span)
        at = prev
    spans.reverse()
    return Route(tuple(spans), best[num_layers])


@dataclass(slots=True)
class _Ban:
    until: float  # when the last ban ends
    strikes: int  # bans in a row, none more than `quiet_s` after the one before ended
    why: str  # the last failure's code


@dataclass
class BanList:
    """Peers that failed recently, banned with exponential back-off (sans-I/O: the
    caller passes the time).

    A peer is remembered from its first ban until `quiet_s` after its last one ended:
    a ban that has run out no longer counts, but its strikes keep the back-off going
    for a peer that fails again soon; after a quiet time it starts from a clean slate.
    At most `max_peers` peers are remembered, those whose bans ended first going first
    (the caller bans only peers on a route it took, but a swarm is large)."""

    base_s: float = 5.0
    max_s: float = 300.0
    quiet_s: float = 3600.0
    max_peers: int = 1024
    _bans: dict[str, _Ban] = field(default_factory=dict)

    def __len__(self) -> int:
        """Peers remembered: banned now, or banned within `quiet_s`."""
        return len(self._bans)

    def ban(self, peer_id: str, now: float, why: str = "failed",
            at_least_s: float = 0.0) -> float:
        """Ban `peer_id` (for longer the more bans in a row, and at least `at_least_s`);
        the seconds it is banned for."""
        self._prune(now)
        last = self._bans.pop(peer_id, None)  # (re-inserted last: the newest)
        strikes = (last.strikes if last else 0) + 1
        duration = max(at_least_s, float(min(self.max_s, self.base_s * 2.0 ** (strikes - 1))))
        self._bans[peer_id] = _Ban(now + duration, strikes, why)
        while len(self._bans) > self.max_peers:
            first = min(self._bans, key=lambda p: self._bans[p].until)
            del self._bans[first]
        return duration

    def banned(self, now: float) -> frozenset[str]:
        self._prune(now)
        return frozenset(p for p, b in self._bans.items() if b.until > now)

    def why(self, peer_id: str) -> str | None:
        ban = self._bans.get(peer_id)
        return ban.why if ban else None

    def remaining(self, peer_id: str, now: float) -> float:
        """Seconds until `peer_id` may be tried again (0 when it may now)."""
        ban = self._bans.get(peer_id)
        return max(0.0, ban.until - now) if ban else 0.0

    def listed(self, now: float) -> list[dict[str, Any]]:
        """The peers banned now, the longest still to wait first: why (the last
        failure's code), the seconds left, and the bans in a row."""
        self._prune(now)
        banned = sorted(((p, b) for p, b in self._bans.items() if b.until > now),
                        key=lambda pb: -pb[1].until)
        return [{"peer_id": p, "why": b.why, "remaining_s": round(b.until - now, 1),
                 "strikes": b.strikes} for p, b in banned]

    def forgive(self, peer_id: str) -> None:
        """A peer that served well again starts from a clean slate."""
        self._bans.pop(peer_id, None)

    def _prune(self, now: float) -> None:
        quiet = [p for p, b in self._bans.items() if b.until + self.quiet_s <= now]
        for p in quiet:
            del self._bans[p]
