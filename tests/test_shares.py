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


# ---- who waits: `wanting`, for what cannot be taken back ------------------------------------


def test_a_freed_seat_goes_to_the_peer_that_waits_not_the_one_holding_the_rest() -> None:
    s = Shares("seats", 4, {"greedy": 3})  # one seat just came free
    assert s.ask("greedy", 1) == Grant()  # nobody else waits: all of it may be used
    waiting = {"honest": 1}
    assert s.ask("greedy", 1, waiting) == Refuse(fair_share=3.0, held=3)
    assert s.ask("honest", 1, {"greedy": 1}) == Grant()
    assert s.fair(wanting=waiting) == {"honest": 1.0, "greedy": 3.0}
    # with room for both, the waiting peer takes nothing from the other's grant
    roomy = Shares("seats", 4, {"greedy": 1})
    assert roomy.ask("greedy", 1, waiting) == Grant()


def test_wanting_shrinks_the_shares_of_those_who_hold() -> None:
    s = Shares("r", 6, {"g": 4, "a": 2})
    assert s.ask("a", 1) == Reclaim(need=1, fair_share=3.0)
    assert s.fair("a", 1, {"h": 1}) == {"h": 1.0, "a": 2.5, "g": 2.5}
    assert s.ask("a", 1, {"h": 1}) == Refuse(fair_share=2.5, held=2)
    assert s.ask("h", 1, {"a": 1}) == Reclaim(need=1, fair_share=1.0)
    assert s.most_over("h", 1, wanting={"a": 1}) == "g"
    assert s.most_over("a", 0, wanting={"h": 1}) == "g"
    assert s.most_over("g", 0, wanting={"h": 1}) is None  # "a" holds under its 2.5


def test_the_asking_peers_own_wanting_entry_is_superseded_by_what_it_asks() -> None:
    s = Shares("seats", 4, {"g": 4})
    assert s.ask("h", 1, {"h": 3}) == s.ask("h", 1) == Reclaim(need=1, fair_share=1.0)
    assert s.fair("h", 1, {"h": 3}) == s.fair("h", 1)
    assert s.ask("g", 1, {"g": 2}) == s.ask("g", 1)  # alone: more than all of it


def test_the_reclaim_is_enough_and_grants_stay_fair_while_others_wait() -> None:
    rng = random.Random(13)
    for _ in range(500):
        s = Shares("r", rng.randrange(1, 200))
        for i in range(rng.randrange(1, 6)):
            s.grant(f"p{i}", rng.randrange(0, s.free + 1))
        wanting = {f"p{rng.randrange(0, 9)}": rng.randrange(0, 20)
                   for _ in range(rng.randrange(0, 4))}
        asker, amount = f"p{rng.randrange(0, 9)}", rng.randrange(1, 60)
        decision = s.ask(asker, amount, wanting)
        others = {p: w for p, w in wanting.items() if p != asker}
        fair = s.fair(asker, amount, others)
        after = s.held.get(asker, 0) + amount
        if isinstance(decision, Reclaim):
            spare = sum(max(0.0, h - fair[p]) for p, h in s.held.items() if p != asker)
            assert spare + 1e-6 >= decision.need
        if isinstance(decision, Grant) and any(w > 0 for w in others.values()):
            assert after <= fair[asker] + 1e-9  # nobody waiting is passed over
        if isinstance(decision, Refuse):
            assert after > fair[asker] + 1e-9 or after > s.capacity
