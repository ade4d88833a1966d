"""The rules of warm pooled sessions (peerd/inference/swarm/warm.py), pure: the route of
a session whose prefix a request can reuse is kept within a cost margin of the best;
what a session offers a request; where reusing cached KV is safe."""

from __future__ import annotations

import pytest

from peerd.inference.swarm.routing import Route, Server, Span, find_route
from peerd.inference.swarm.warm import (
    WarmMargin,
    WarmRoute,
    prefer_warm,
    price,
    prompt_reuse_safe,
    reusable_prefix,
    route_dtypes,
)
from protocols.shard import Hop


def route(*spans: tuple[str, int, int, float]) -> Route:
    parts = tuple(Span(p, a, b, c) for p, a, b, c in spans)
    return Route(parts, sum(s.cost_ms for s in parts))


BEST = route(("a", 0, 2, 40.0), ("b", 2, 4, 60.0))  # 100 ms
NEAR = route(("a", 0, 2, 40.0), ("c", 2, 4, 75.0))  # 115 ms: within 20%
FAR = route(("d", 0, 4, 130.0))  # 130 ms: beyond it


def test_a_warm_route_within_the_margin_wins() -> None:
    assert prefer_warm(BEST, [WarmRoute(NEAR, 30)]) is NEAR
    assert prefer_warm(BEST, [WarmRoute(FAR, 30)]) is BEST  # 30% dearer
    assert prefer_warm(BEST, [WarmRoute(FAR, 30)], WarmMargin(fraction=0.35)) is FAR
    assert prefer_warm(BEST, []) is BEST


def test_a_warm_session_with_nothing_to_reuse_moves_nothing() -> None:
    assert prefer_warm(BEST, [WarmRoute(NEAR, 0)]) is BEST


def test_the_most_reusable_tokens_win_then_the_cheaper_route() -> None:
    nearer = route(("a", 0, 2, 40.0), ("e", 2, 4, 65.0))  # 105 ms
    assert prefer_warm(BEST, [WarmRoute(nearer, 10), WarmRoute(NEAR, 30)]) is NEAR
    assert prefer_warm(BEST, [WarmRoute(NEAR, 30), WarmRoute(nearer, 30)]) is nearer
    # the best route's own warm session beats a dearer one holding as much
    assert prefer_warm(BEST, [WarmRoute(NEAR, 30), WarmRoute(BEST, 30)]) is BEST
    # a warm session on the best route holding less loses to one within the margin
    assert prefer_warm(BEST, [WarmRoute(BEST, 5), WarmRoute(NEAR, 30)]) is NEAR


def test_the_margin_has_a_floor_for_cheap_routes() -> None:
    cheap = route(("a", 0, 4, 2.0))
    warm = route(("b", 0, 4, 6.0))  # 3x dearer, but 4 ms: noise of a throughput figure
    assert WarmMargin().allows(6.0, 2.0)
    assert prefer_warm(cheap, [WarmRoute(warm, 8)]) is warm
    assert prefer_warm(cheap, [WarmRoute(warm, 8)], WarmMargin(floor_ms=1.0)) is cheap
    assert not WarmMargin().allows(130.0, 100.0)
    assert WarmMargin().allows(120.0, 100.0)


def test_price_costs_a_pooled_route_at_todays_figures() -> None:
    servers = [Server("a", 0, 2, tokens_per_s=50.0, rtt_ms=3.0, dtype="float32"),
               Server("b", 2, 4, tokens_per_s=10.0, rtt_ms=1.0, dtype="float32"),
               Server("c", 0, 4, tokens_per_s=100.0, rtt_ms=2.0, dtype="bfloat16")]
    hops = (Hop("a", 0, 2), Hop("b", 2, 4))
    priced = price(servers, hops)
    assert priced is not None
    assert [(s.peer_id, s.start, s.end) for s in priced.spans] == [("a", 0, 2), ("b", 2, 4)]
    # as find_route prices each span: RTT + layers x ms per layer
    assert priced.spans[0].cost_ms == pytest.approx(3.0 + 2 * 1000 / (50 * 2))
    assert priced.cost_ms == pytest.approx(sum(s.cost_ms for s in priced.spans))
    # a sub-span of what a peer serves is priced by that peer's figures
    part = price(servers, (Hop("c", 0, 1), Hop("c", 1, 4)))
    assert part is not None and part.cost_ms == pytest.approx(2 * 2.0 + 4 * 1000 / 400)
    best = find_route(servers, 4)
    assert isinstance(best, Route) and best.spans[0].peer_id == "c"
    # a banned peer, or one that no longer serves those layers: not a route any more
    assert price(servers, hops, frozenset({"b"})) is None
    assert price(servers, (Hop("a", 0, 3), Hop("b", 3, 4))) is None
    assert price(servers[1:], hops) is None
    assert route_dtypes(servers, priced) == ["float32", "float32"]
    assert route_dtypes(servers, best) == ["bfloat16"]
    assert route_dtypes(servers[:1], priced) == ["float32", ""]  # gone: unknown


def test_what_a_pooled_session_offers_a_request() -> None:
    cached = (1, 2, 3, 4, 5)
    # the last prompt token always runs (its logits choose the next token)
    assert reusable_prefix(cached, [1, 2, 3, 4, 5], None, drafting=False) == 4
    assert reusable_prefix(cached, [1, 2, 3, 4, 5, 6, 7], None, drafting=False) == 5
    assert reusable_prefix(cached, [1, 2, 9], None, drafting=False) == 2
    assert reusable_prefix(cached, [9], None, drafting=False) == 0
    assert reusable_prefix((), [1, 2], None, drafting=False) == 0
    # a drafter needs the features of what it reuses: only as far as they go, and a
    # session without features (pooled by a plain request) offers it nothing
    assert reusable_prefix(cached, [1, 2, 3, 4, 5, 6], 3, drafting=True) == 3
    assert reusable_prefix(cached, [1, 2, 3, 4, 5, 6], None, drafting=True) == 0
    assert reusable_prefix(cached, [1, 7], 5, drafting=True) == 0  # fewer than 2 shared


def test_prompt_reuse_is_safe_only_in_float32_end_to_end() -> None:
    assert prompt_reuse_safe("float32", ["float32", "float32"])
    assert not prompt_reuse_safe("bfloat16", ["float32", "float32"])  # the wire rounds
    assert not prompt_reuse_safe("float32", ["float32", "bfloat16"])
    assert not prompt_reuse_safe("float32", ["float16"])
    assert not prompt_reuse_safe("float32", ["float32", ""])  # a hop we know nothing of
    assert not prompt_reuse_safe("float32", [])
