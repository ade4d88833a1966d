"""Routing and ban list: pure, no network."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from peerd.inference.swarm.routing import (
    BanList,
    NoRoute,
    Route,
    Server,
    coverage_gaps,
    find_route,
    route_peers,
    servers_by_model,
)
from protocols.errors import WireError
from protocols.ledger import LedgerEntry, ModelServed
from protocols.shard import FEATURE_SESSIONS, Hop, check_route


def route_of(result: Route | NoRoute) -> list[tuple[str, int, int]]:
    assert isinstance(result, Route), result
    return [(s.peer_id, s.start, s.end) for s in result.spans]


def test_single_server_covers_everything() -> None:
    assert route_of(find_route([Server("a", 0, 30)], 30)) == [("a", 0, 30)]


def test_chain_of_three_stages() -> None:
    servers = [Server("c", 20, 30), Server("a", 0, 10), Server("b", 10, 20)]
    assert route_of(find_route(servers, 30)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_fewer_hops_win_when_rtt_dominates() -> None:
    servers = [Server("a", 0, 15, rtt_ms=20), Server("b", 15, 30, rtt_ms=20),
               Server("full", 0, 30, rtt_ms=20)]
    assert route_of(find_route(servers, 30)) == [("full", 0, 30)]


def test_faster_replica_is_chosen() -> None:
    servers = [Server("slow", 0, 10, tokens_per_s=5, rtt_ms=1),
               Server("fast", 0, 10, tokens_per_s=500, rtt_ms=1)]
    assert route_of(find_route(servers, 10)) == [("fast", 0, 10)]


def test_nearer_replica_is_chosen() -> None:
    servers = [Server("far", 0, 10, rtt_ms=50), Server("near", 0, 10, rtt_ms=2)]
    assert route_of(find_route(servers, 10)) == [("near", 0, 10)]


def test_overlapping_spans_are_cut_at_boundaries() -> None:
    servers = [Server("a", 0, 20, rtt_ms=1), Server("b", 10, 30, rtt_ms=1)]
    route = route_of(find_route(servers, 30))
    assert route[0][0] == "a" and route[-1] == ("b", route[-1][1], 30)
    assert route[0][2] == route[1][1]  # contiguous


def test_ties_break_by_peer_id() -> None:
    servers = [Server("z", 0, 10, rtt_ms=1), Server("m", 0, 10, rtt_ms=1)]
    assert route_of(find_route(servers, 10)) == [("m", 0, 10)]


def test_gap_reports_missing_ranges() -> None:
    result = find_route([Server("a", 0, 10), Server("b", 20, 30)], 30)
    assert isinstance(result, NoRoute)
    assert result.missing == ((10, 20),)
    assert result.describe() == "[10, 20)"


def test_excluded_peer_reroutes_to_replica() -> None:
    servers = [Server("a", 0, 15), Server("b", 15, 30, rtt_ms=1), Server("b2", 15, 30, rtt_ms=9)]
    assert route_of(find_route(servers, 30, frozenset({"b"}))) == [("a", 0, 15), ("b2", 15, 30)]
    assert isinstance(find_route(servers, 30, frozenset({"b", "b2"})), NoRoute)


def test_coverage_gaps() -> None:
    assert coverage_gaps([], 4) == [(0, 4)]
    assert coverage_gaps([Server("a", 1, 2)], 4) == [(0, 1), (2, 4)]


def test_ban_list_backs_off_exponentially() -> None:
    bans = BanList(base_s=5, max_s=30)
    assert bans.ban("p", now=0) == 5
    assert bans.banned(4.9) == {"p"} and bans.banned(5.1) == frozenset()
    assert bans.ban("p", now=10) == 10
    assert bans.ban("p", now=20) == 20
    assert bans.ban("p", now=40) == 30  # capped
    bans.forgive("p")
    assert bans.banned(41) == frozenset()
    assert bans.ban("p", now=50) == 5


def test_check_route_refuses_skips_and_overlaps() -> None:
    check_route((Hop("a", 0, 2), Hop("b", 2, 4)), 4)
    with pytest.raises(WireError, match="skips"):
        check_route((Hop("a", 0, 2), Hop("b", 3, 4)), 4)
    with pytest.raises(WireError, match="skips"):
        check_route((Hop("a", 0, 3), Hop("b", 2, 4)), 4)
    with pytest.raises(WireError, match="ends at layer"):
        check_route((Hop("a", 0, 2),), 4)
    with pytest.raises(WireError, match="empty"):
        check_route((Hop("a", 0, 0), Hop("b", 0, 4)), 4)



def test_route_peers_are_the_models_other_servers_nearest_first() -> None:
    servers = [Server("me", 10, 20), Server("z-next", 20, 30), Server("a-far", 30, 40),
               Server("m-before", 5, 10), Server("b-first", 0, 5), Server("c-both", 0, 12),
               Server("a-far", 18, 25),  # a peer's second span: its nearest one counts
               Server("me", 0, 10)]
    # serving layer 20 (our next hop) or layer 9 (the hop before us), then layer 0
    assert route_peers(servers, "me", (10, 20)) == [
        "a-far", "c-both", "m-before", "z-next", "b-first"]
    # a first span: nobody before it; then the rest by peer id
    assert route_peers(servers, "me", (0, 5)) == [
        "c-both", "m-before", "b-first", "a-far", "z-next"]
    assert route_peers([Server("me", 0, 4)], "me", (0, 4)) == []


def test_ban_list_forgets_bans_once_over_and_strikes_after_a_quiet_time() -> None:
    """A ban that has run out stops counting at once; its strikes (the back-off) are
    kept through `quiet_s` after it, then forgotten: the list holds no peer forever."""
    bans = BanList(base_s=5, max_s=30, quiet_s=100)
    for i in range(50):
        bans.ban(f"p{i}", now=0, why="x" * 10)
    assert len(bans.banned(4)) == 50 and len(bans) == 50
    assert bans.banned(6) == frozenset() and bans.remaining("p0", 6) == 0.0
    assert bans.ban("p0", now=10, why="again") == 10  # struck again soon: backs off
    assert bans.banned(11) == {"p0"} and bans.why("p0") == "again"
    assert bans.banned(110) == frozenset() and len(bans) == 1  # p1.. quiet since 5
    assert bans.banned(130) == frozenset() and len(bans) == 0  # p0 quiet since 20
    assert bans.why("p0") is None
    assert bans.ban("p0", now=130) == 5  # a clean slate


def test_ban_list_holds_at_most_max_peers() -> None:
    """Past `max_peers` the list drops the peers whose bans ended first (over ones
    before running ones): culprits by the thousand cannot grow it."""
    bans = BanList(base_s=5, max_s=30, quiet_s=3600, max_peers=8)
    for i in range(1000):
        bans.ban(f"p{i}", now=float(i))
        assert len(bans) <= 8
    assert bans.banned(999.5) == {f"p{i}" for i in range(995, 1000)}
    assert bans.ban("p999", now=1000) == 10  # the newest keep their strikes


def test_a_span_listed_again_is_one_server() -> None:
    """Each server is an edge find_route tries from every layer boundary: a peer that
    lists one span of a model eight times (all its entry may hold) or in two entries
    is still one server of that span, the first listing's; other spans and models
    stay."""
    spans = [ModelServed("m", 0, 2, "float32", tokens_per_s=float(i)) for i in range(6)]
    spans += [ModelServed("m", 2, 4, "float32"), ModelServed("n", 0, 2, "float32")]
    entry = LedgerEntry(peer_id="a", seq=1, timestamp=0.0, ttl_s=60.0, models=tuple(spans),
                        features=(FEATURE_SESSIONS,))
    other = LedgerEntry(peer_id="b", seq=1, timestamp=0.0, ttl_s=60.0, models=tuple(spans[:1]),
                        features=(FEATURE_SESSIONS,))
    # a peer of another version of the shard protocol (it does not list ours) serves
    # nothing to us: a session through it would fail
    older = LedgerEntry(peer_id="c", seq=1, timestamp=0.0, ttl_s=60.0, models=tuple(spans),
                        features=("/peerd/shard/2.0.0",))
    servers = servers_by_model([entry, other, older, entry], {"a": 3.0})
    assert [(s.peer_id, s.start, s.end, s.tokens_per_s, s.rtt_ms) for s in servers["m"]] == [
        ("a", 0, 2, 0.0, 3.0), ("a", 2, 4, 0.0, 3.0), ("b", 0, 2, 0.0, None)]
    assert [(s.peer_id, s.start, s.end) for s in servers["n"]] == [("a", 0, 2)]


def test_the_bans_are_listed_with_why_and_how_long_the_longest_first() -> None:
    """What `peerd status` shows as the peers routed around."""
    bans = BanList(base_s=5, max_s=30)
    bans.ban("a", 0.0, "stalled")
    bans.ban("b", 1.0, "unreachable")
    assert bans.listed(2.0) == [
        {"peer_id": "b", "why": "unreachable", "remaining_s": 4.0, "strikes": 1},
        {"peer_id": "a", "why": "stalled", "remaining_s": 3.0, "strikes": 1}]
    bans.ban("b", 7.0, "unreachable")  # its second ban in a row: 10 s
    assert bans.listed(8.0) == [
        {"peer_id": "b", "why": "unreachable", "remaining_s": 9.0, "strikes": 2}]
    assert bans.listed(20.0) == []


def test_peerd_status_shows_the_peers_routed_around() -> None:
    from rich.console import Console

    from peerd.cli.admin import routed_around_table

    console = Console(record=True, width=120)
    console.print(routed_around_table([
        {"peer_id": "12D3KooWLiar", "why": "stalled", "remaining_s": 9.4, "strikes": 2},
        {"peer_id": "12D3KooWSlow", "why": "overloaded", "remaining_s": 299.0, "strikes": 7},
        {"peer_id": "12D3KooWBent", "why": "wrong_output", "remaining_s": 86000.0,
         "strikes": 1}]))
    text = console.export_text()
    assert "12D3KooWLiar" in text and "stalled" in text and "9 s" in text
    assert "5 min" in text and "23.9 h" in text and "peerd forgive PEER_ID" in text


def test_peerd_status_says_how_the_audits_came_out() -> None:
    from peerd.cli.admin import audits_line

    assert audits_line({"rate": 0.05, "agreed": 3, "blamed": 1, "disputed": 0}) == (
        "[bold]audits[/] of routes after 5% of requests: 3 agreed, 1 blamed")
    assert audits_line({"rate": 0.0}).endswith("none yet")
    assert audits_line({"rate": 1.0, "running": True}).endswith("none yet; one running")


def test_a_ban_lasts_at_least_what_the_caller_says() -> None:
    bans = BanList(base_s=5, max_s=300)
    assert bans.ban("a", 0.0, "wrong_output", at_least_s=300) == 300
    assert bans.ban("b", 0.0, "stalled") == 5


@pytest.mark.parametrize(("options", "status", "words"), [
    (None, 409, "serves no model"), ("loading", 503, "still loading")])
async def test_forgive_before_a_model_is_ready_says_why_in_words(
        options: str | None, status: int, words: str) -> None:
    """`peerd forgive` on a peer that serves no model, or whose model still loads (a
    ready one: tests/test_openai_api.py)."""
    from starlette.requests import Request

    from peerd.inference.slot import ModelOptions, ModelSlot

    slot = ModelSlot(cast(Any, None), cast(Any, None),
                     ModelOptions("smollm2") if options else None)
    request = Request({"type": "http", "method": "DELETE", "path_params": {"peer_id": "x"},
                       "headers": []})
    reply = await slot._forgive(request)
    assert reply.status_code == status
    assert words in json.loads(bytes(reply.body))["error"]["message"]
