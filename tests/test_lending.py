"""What a shard server lends, pure: sessions and KV charged as they grow, and who gives
way under pressure (peerd/inference/swarm/lending.py over peerd/shares.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from peerd.inference.swarm.lending import Eviction, Lending, OverShare

KV = 10  # bytes a position, for every session here


@dataclass
class Fake:
    id: str
    holder: str
    max_length: int = 1000
    kv_per_position: int = KV
    reserved_positions: int = 0
    busy: bool = False
    last_used: float = 0.0


def lending(sessions: int = 4, kv_positions: int = 10_000, headroom: int = 100
            ) -> tuple[Lending, list[Eviction]]:
    evicted: list[Eviction] = []
    lend = Lending(sessions, kv_positions * KV, lambda s, e: evicted.append(e),
                   headroom=headroom)
    return lend, evicted


def test_a_session_is_charged_its_headroom_then_what_it_grows_to() -> None:
    lend, _ = lending()
    s = Fake("s1", "a", max_length=500)
    lend.open(s)
    assert s.reserved_positions == 100 and lend.kv.held == {"a": 100 * KV}
    lend.grow(s, 250)  # a prompt of 250 positions: them and the headroom again
    assert s.reserved_positions == 350
    lend.grow(s, 450)  # no more than max_length
    assert s.reserved_positions == 500
    lend.grow(s, 10)  # rolled back (keep): what is no longer needed goes back
    assert s.reserved_positions == 110 and lend.kv.held == {"a": 110 * KV}
    lend.close(s)
    assert lend.kv.held == {} and lend.sessions.held == {}


def test_the_idlest_idle_session_of_the_peer_furthest_over_its_share_goes_first() -> None:
    lend, evicted = lending(sessions=4)
    greedy = [Fake(f"g{i}", "greedy", last_used=float(i)) for i in range(3)]
    other = Fake("o1", "other", last_used=0.0)
    for s in [*greedy, other]:
        lend.open(s)
    greedy[0].busy = True  # in a forward now: never taken back
    newcomer = Fake("n1", "honest")
    lend.open(newcomer)
    assert evicted == [Eviction("g1", "greedy", "sessions", "honest")]
    assert lend.sessions.held == {"greedy": 2, "other": 1, "honest": 1}
    assert "g1" not in lend.lent and "n1" in lend.lent


def test_kv_pressure_takes_back_from_the_biggest_holder() -> None:
    lend, evicted = lending(sessions=32, kv_positions=1000, headroom=100)
    big = Fake("big", "greedy", max_length=1000)
    lend.open(big)
    lend.grow(big, 850)  # 950 positions of 1000
    small = Fake("small", "honest", max_length=200)
    lend.open(small)  # wants 100: within its share of the KV, so the greedy one goes
    assert [e.session for e in evicted] == ["big"] and evicted[0].resource == "kv_bytes"
    assert lend.kv.held == {"honest": 100 * KV}


def test_a_peer_over_its_share_is_refused_when_others_want_theirs() -> None:
    lend, evicted = lending(sessions=2)
    lend.open(Fake("a1", "a"))
    lend.open(Fake("b1", "b"))
    with pytest.raises(OverShare) as err:
        lend.open(Fake("a2", "a"))
    assert err.value.peer == "a" and err.value.resource == "sessions"
    assert evicted == [] and lend.sessions.held == {"a": 1, "b": 1}


def test_a_reclaim_that_finds_only_busy_sessions_refuses_and_takes_nothing() -> None:
    lend, evicted = lending(sessions=2)
    for i in range(2):
        s = Fake(f"g{i}", "greedy")
        lend.open(s)
        s.busy = True
    with pytest.raises(OverShare):
        lend.open(Fake("n1", "honest"))
    assert evicted == [] and lend.sessions.held == {"greedy": 2}


def test_growth_past_the_share_falls_back_to_what_the_forward_needs() -> None:
    """A session whose peer is over its share keeps going within what it holds; only
    when even the positions of its next forward cannot be had is it refused."""
    lend, _ = lending(sessions=8, kv_positions=400, headroom=100)
    mine = Fake("m", "a", max_length=1000)
    theirs = Fake("t", "b", max_length=1000)
    lend.open(mine)
    lend.open(theirs)
    lend.grow(theirs, 100)  # b holds 200 of 400; a 100
    lend.grow(mine, 150)  # 150 + headroom is over a's share (200): it gets the 150
    assert mine.reserved_positions == 150
    with pytest.raises(OverShare):  # 250 is over its share even without headroom
        lend.grow(mine, 250)
    assert mine.reserved_positions == 150 and theirs.reserved_positions == 200
