"""Warm pooled sessions, as pure rules: which route keeps one, what one offers a
request, and where its cached prefix may stand in for a fresh prefill.

A pooled session's caches hold the KV of the tokens its last request left there
(pipeline.py); a request sharing a prefix with them computes only the rest, but only
on that session's route. The cheapest route moves whenever a peer re-advertises its
throughput or an RTT probe moves a little, and a request routed elsewhere recomputes
its whole prompt. So a request that reuses prompts takes the route of a session it
can reuse while that route costs at most `WarmMargin` more than the best one:

    warm wins  <=>  reusable > 0  and
                    cost(warm) <= cost(best) + max(fraction * cost(best), floor_ms)

and among several, the one holding the most reusable tokens, then the cheaper.

Reusing KV is safe where its last bits cannot matter: the cached positions were
computed in passes of other shapes (a prefill, one-token steps, verification passes)
than a fresh prefill of the whole prompt would use, and matrix products round
differently with the number of rows. In float32 end to end that moves logits by
~1e-5 (SmolLM2), the same difference DSD's verification passes make against plain
decoding, which the project's lossless promise already excuses only at a near-tie
of the top two logits. In bfloat16 or float16, on a hop or on the wire, the same
difference is rounded to a 16-bit value: logits moved by tenths and argmax ties
were common (bench/README.md, "Cold sessions"), so greedy output would part from a
fresh prefill's. Sampling changes nothing here: it draws from the same logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peerd.inference.swarm.pipeline import common_prefix
from peerd.inference.swarm.routing import Route, Server, Span
from protocols.shard import Hop

REUSE_DTYPE = "float32"  # the only precision in which a cached prefix replaces a prefill


@dataclass(frozen=True, slots=True)
class WarmMargin:
    """How much dearer than the best route a warm route may be and still be taken."""

    # of the best route's cost: a throughput figure moves by more than this only when
    # a peer really got slower (or busier), and a reused prefix saves its prefill
    fraction: float = 0.2
    # at least this many ms: on a fast local route a few ms are measurement noise
    floor_ms: float = 5.0

    def allows(self, cost_ms: float, best_ms: float) -> bool:
        return cost_ms <= best_ms + max(self.fraction * best_ms, self.floor_ms)


WARM_MARGIN = WarmMargin()  # the default


@dataclass(frozen=True, slots=True)
class WarmRoute:
    """A route holding a pooled session, priced now, and how many of the request's
    tokens that session's caches would spare it."""

    route: Route
    reusable: int


def prefer_warm(best: Route, warm: Iterable[WarmRoute],
                margin: WarmMargin = WARM_MARGIN) -> Route:
    """The route a request that reuses prompts takes: the warm route within `margin`
    of `best` with the most reusable tokens (then the cheaper), else `best`."""
    keep = [w for w in warm if w.reusable > 0 and margin.allows(w.route.cost_ms, best.cost_ms)]
    if not keep:
        return best
    return max(keep, key=lambda w: (w.reusable, -w.route.cost_ms)).route


def serving(servers: Iterable[Server], peer_id: str, start: int, end: int) -> Server | None:
    """The server `peer_id` advertises that covers layers [start, end), if any."""
    return next((s for s in servers if s.peer_id == peer_id and s.start <= start
                 and end <= s.end), None)


def price(servers: Sequence[Server], hops: Sequence[Hop],
          exclude: frozenset[str] = frozenset()) -> Route | None:
    """The route through exactly `hops` at today's figures, each span priced as
    find_route prices it; None when a hop's peer is excluded or no longer serves its
    layers."""
    spans: list[Span] = []
    for hop in hops:
        server = None if hop.peer_id in exclude else serving(servers, hop.peer_id,
                                                             hop.start, hop.end)
        if server is None:
            return None
        spans.append(Span(hop.peer_id, hop.start, hop.end, server.cost_ms(hop.start, hop.end)))
    return Route(tuple(spans), sum(s.cost_ms for s in spans))


def route_dtypes(servers: Sequence[Server], route: Route) -> list[str]:
    """Each span's advertised compute dtype ("" where the ledger no longer says)."""
    found = (serving(servers, s.peer_id, s.start, s.end) for s in route.spans)
    return [server.dtype if server is not None else "" for server in found]


def reusable_prefix(cached: Sequence[int], tokens: Sequence[int], feature_rows: int | None,
                    drafting: bool) -> int:
    """How many leading `tokens` a session caching `cached` spares a request. The last
    token always runs (its logits choose the next one). A drafter also needs the
    target's features of what it reuses: a session keeps `feature_rows` of them (None:
    pooled without any), and fewer than 2 are not worth telling it."""
    shared = max(0, min(common_prefix(cached, tokens), len(tokens) - 1))
    if not drafting:
        return shared
    if feature_rows is None or shared < 2:
        return 0
    return min(shared, feature_rows)


def prompt_reuse_safe(wire_dtype: str, hop_dtypes: Sequence[str]) -> bool:
    """Whether cached KV may replace a fresh prefill without moving greedy output
    (beyond the near-ties float32 rounding already moves): float32 on the wire and on
    every hop, each hop's dtype known."""
    return wire_dtype == REUSE_DTYPE and bool(hop_dtypes) and all(
        d == REUSE_DTYPE for d in hop_dtypes)
