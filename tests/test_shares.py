"""The share arithmetic, pure: max-min fair allocations and who gives way."""

from __future__ import annotations

import random

import pytest

from peerd.shares import Grant, Reclaim, Refuse, Shares, max_min


def test_max_min_meets_small_demands_and_divides_the_rest_equally() -> None:
    assert max_min(32, {"a": 31, "b": 2}) == {"b": 2.0, "a": 30.0}
    assert max_min(10, {"a": 1, "b": 100, "c": 100}) == {"a": 1.0, "b": 4.5, "c": 4.5}
    assert max_min(10, {"a": 3, "b": 3}) == {"a": 3.0, "b": 3.0}  # nobody is limited
    assert max_min(10, {}) == {}


def test_max_min_never_gives_more_than_the_capacity_or_a_demand() -> None:
    rng = random.Random(7)
    for _ in range(500):
        capacity = rng.randrange(1, 1000)
        demands = {f"p{i}": rng.randrange(0, 600) for i in range(rng.randrange(1, 9))}
        fair = max_min(capacity, demands)
        assert sum(fair.values()) <= capacity + 1e-6
        assert all(0 <= fair[p] <= demands[p] + 1e-9 for p in demands)
        if sum(demands.values()) > capacity:  # scarce: everything is handed out...
            assert sum(fair.values()) == pytest.approx(capacity)
            # ...and no peer that got less than it wanted got less than another
            cut = [fair[p] for p in demands if fair[p] < demands[p] - 1e-9]
            assert max(fair.values()) <= min(cut, default=capacity) + 1e-6


def test_a_peer_alone_may_take_everything() -> None:
    s = Shares("sessions", 4)
    for _ in range(4):
        assert s.ask("greedy", 1) == Grant()
        s.grant("greedy", 1)
    assert s.free == 0
    assert isinstance(s.ask("greedy", 1), Refuse)  # more than all of it: wait


def test_a_newcomer_within_its_share_reclaims_from_the_peer_over_its_share() -> None:
    s = Shares("sessions", 32, {"greedy": 32})
    decision = s.ask("honest", 1)
    assert decision == Reclaim(need=1, fair_share=1.0)
    assert s.most_over("honest", 1) == "greedy"
    s.release("greedy", 1)
    s.grant("honest", 1)
    assert s.held == {"greedy": 31, "honest": 1}
    # the greedy peer is refused what it just gave back: the honest one wants its share
    assert isinstance(s.ask("greedy", 1), Refuse)


def test_the_share_shrinks_as_others_ask() -> None:
    s = Shares("kv_bytes", 100, {"a": 60, "b": 40})
    assert s.fair() == {"a": 60.0, "b": 40.0}  # everything wanted is held: both fair
    assert s.ask("c", 30) == Reclaim(need=30, fair_share=30.0)
    assert s.fair("c", 30) == {"c": 30.0, "a": 35.0, "b": 35.0}
    assert s.most_over("c", 30) == "a"  # the one holding the most gives way first
    assert s.most_over("c", 30, exclude=frozenset({"a"})) == "b"
    assert isinstance(s.ask("c", 40), Refuse)  # 40 is over a third of 100


def test_equal_holders_refuse_each_other_more() -> None:
    s = Shares("sessions", 8, {"a": 4, "b": 4})
    assert s.ask("a", 1) == Refuse(fair_share=4.0, held=4)
    assert s.most_over("a", 1) is None


def test_the_reclaim_is_always_enough_for_a_peer_within_its_share() -> None:
    """What the peers above their fair share hold beyond it covers any need."""
    rng = random.Random(11)
    for _ in range(500):
        s = Shares("r", rng.randrange(1, 200))
        for i in range(rng.randrange(1, 6)):
            amount = rng.randrange(0, s.free + 1)
            s.grant(f"p{i}", amount)
        asker, amount = f"p{rng.randrange(0, 7)}", rng.randrange(1, 60)
        decision = s.ask(asker, amount)
        if isinstance(decision, Reclaim):
            fair = s.fair(asker, amount)
            spare = sum(max(0.0, h - fair[p]) for p, h in s.held.items() if p != asker)
            assert spare + 1e-6 >= decision.need


def test_grant_and_release_check_their_amounts() -> None:
    s = Shares("sessions", 2)
    s.grant("a", 2)
    with pytest.raises(ValueError):
        s.grant("b", 1)
    with pytest.raises(ValueError):
        s.release("a", 3)
    s.release("a", 2)
    assert s.held == {} and s.free == 2
