"""The controller's pure rules (docs/sedm.md, "The rules"), with a fake clock: the
effective weight and its decay, ranking, the no-memory baseline, weight updates from
uses, merging, the consolidation plan (merge, prune, evict) and the admission precheck.
Times are plain numbers: every rule takes `now`."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from peerd.memory.controller import (
    Baseline,
    ControllerSettings,
    EarlierRefusal,
    Evict,
    Merge,
    Prune,
    admission_stats,
    after_use,
    after_uses,
    effective_weight,
    merge,
    plan_consolidation,
    precheck,
    rank,
)
from peerd.memory.item import ItemStats, Record, sign_item

KEY = create_new_key_pair()
AUTHOR = str(ID.from_pubkey(KEY.public_key))
T0 = 1_750_000_000.0  # the fake clock's start
DAY = 86_400.0
S = ControllerSettings(top_k=3, n0=4.0, min_similarity=0.3, merge_threshold=0.92,
                       half_life_s=7 * DAY, prune_floor=0.01, size_cap=100, queue_cap=8)


def posterior(u0: float, uses: int, delta_sum: float, n0: float = S.n0) -> float:
    """The weight by hand: the admission utility as a prior worth n0 uses."""
    return (n0 * u0 + delta_sum) / (n0 + uses)


def record(text: str, *, u0: float = 0.1, uses: int = 0, delta_sum: float = 0.0,
           at: float = T0, last_used: float | None = None, domain: str = "arithmetic",
           source: str = "local") -> Record:
    item, signed = sign_item(KEY.private_key, AUTHOR, text, domain, "example", created=at)
    stats = ItemStats(weight=posterior(u0, uses, delta_sum), admitted_utility=u0, uses=uses,
                      delta_sum=delta_sum, last_used=at if last_used is None else last_used,
                      admitted_at=at, source=source)
    return Record(item=item, signed=signed, stats=stats)


def removed(d: Merge | Prune | Evict) -> str:
    """The item a decision takes out of the store."""
    return d.drop if isinstance(d, Merge) else d.item_id


# ---- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"top_k": 0}, {"n0": 0.0}, {"n0": math.nan}, {"min_similarity": 0.0},
    {"min_similarity": 1.5}, {"merge_threshold": 0.0}, {"merge_threshold": 1.01},
    {"half_life_s": 0.0}, {"half_life_s": math.inf}, {"prune_floor": -0.1},
    {"prune_floor": math.nan}, {"size_cap": 0}, {"queue_cap": 0}, {"baseline_window": 0},
])
def test_nonsense_settings_are_refused_with_the_field_named(bad: dict[str, Any]) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        ControllerSettings(**bad)


def test_the_defaults_are_valid() -> None:
    s = ControllerSettings()
    assert s.min_similarity < s.merge_threshold <= 1.0 and s.prune_floor > 0


# ---- the effective weight ---------------------------------------------------------------


def test_admission_stats_start_at_the_measured_utility() -> None:
    st = admission_stats(0.25, T0, S, source="peer-x")
    assert st.weight == st.admitted_utility == 0.25
    assert (st.uses, st.delta_sum, st.last_used, st.admitted_at, st.source) == (
        0, 0.0, T0, T0, "peer-x")
    assert effective_weight(st, T0, S) == 0.25


def test_the_weight_moves_from_the_prior_to_the_measured_mean() -> None:
    st = admission_stats(0.4, T0, S)
    deltas = [0.1, -0.1, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    for i, d in enumerate(deltas):
        st = after_use(st, 0.5 + d, 0.5, T0 + i, S)
        n, total = i + 1, sum(deltas[: i + 1])
        assert st.weight == pytest.approx(posterior(0.4, n, total))
        assert st.uses == n and st.delta_sum == pytest.approx(total)
        assert st.last_used == T0 + i
        assert effective_weight(st, st.last_used, S) == pytest.approx(st.weight)
    # young: the prior dominated; old: the mean of the deltas does
    assert abs(st.weight - sum(deltas) / len(deltas)) < abs(st.weight - 0.4)


def test_the_weight_halves_every_half_life_since_last_use() -> None:
    st = admission_stats(0.2, T0, S)
    assert effective_weight(st, T0 + S.half_life_s, S) == pytest.approx(0.1)
    assert effective_weight(st, T0 + 3 * S.half_life_s, S) == pytest.approx(0.025)
    # a clock behind last use (another peer's, a step back) does not inflate it
    assert effective_weight(st, T0 - DAY, S) == pytest.approx(0.2)
    # a use resets the clock
    used = after_use(st, 0.7, 0.5, T0 + 2 * S.half_life_s, S)
    assert effective_weight(used, T0 + 2 * S.half_life_s, S) == pytest.approx(
        posterior(0.2, 1, 0.2))


def test_the_weight_is_recomputed_from_the_counts_not_read_from_the_field() -> None:
    # a stored weight from an older n0 does not survive a settings change
    st = replace(admission_stats(0.3, T0, S), uses=4, delta_sum=-0.4, weight=0.3)
    assert effective_weight(st, T0, S) == pytest.approx(posterior(0.3, 4, -0.4))
    assert effective_weight(st, T0, replace(S, n0=1.0)) == pytest.approx(
        posterior(0.3, 4, -0.4, n0=1.0))


# ---- ranking ----------------------------------------------------------------------------


def test_a_helpful_young_item_outranks_a_slightly_more_similar_useless_one() -> None:
    young = record("Q: 17 + 25? A: 17 + 25 = 42.", u0=0.3)
    useless = record("Q: 17 + 26? A: the answer is 43.", u0=0.3, uses=20, delta_sum=0.0)
    ranked = rank([(useless, 0.65), (young, 0.6)], T0, S)
    assert [r.record.item.id for r in ranked] == [young.item.id, useless.item.id]
    assert ranked[0].score == pytest.approx(0.6 * 0.3)
    assert ranked[1].score == pytest.approx(0.65 * posterior(0.3, 20, 0.0))
    assert ranked[0].weight == pytest.approx(0.3) and ranked[0].similarity == 0.6


def test_a_harmful_item_goes_to_zero_after_a_few_bad_uses_and_stops_being_retrieved() -> None:
    bad = record("Q: 2 + 2? A: 5.", u0=0.2)
    other = record("Q: 3 + 3? A: 3 + 3 = 6.", u0=0.05)
    assert rank([(bad, 0.9), (other, 0.5)], T0, S)[0].record == bad
    stats = bad.stats
    for i in range(1, 4):
        stats = after_use(stats, 0.0, 0.5, T0 + i, S)  # each use: 0.5 below the baseline
        if i >= 2:
            assert stats.weight <= 0
    bad = replace(bad, stats=stats)
    assert [r.record for r in rank([(bad, 0.9), (other, 0.5)], T0 + 10, S)] == [other]


def test_rank_drops_low_similarity_and_non_positive_weights_and_keeps_top_k() -> None:
    recs = [record(f"item {i}", u0=0.1 + i / 100) for i in range(6)]
    zero = record("zero", u0=0.0)
    negative = record("negative", u0=-0.1)
    far = record("far", u0=0.9)
    cands = [(r, 0.5) for r in recs] + [(zero, 0.99), (negative, 0.99), (far, 0.29)]
    ranked = rank(cands, T0, S)
    assert len(ranked) == S.top_k
    assert [r.record for r in ranked] == [recs[5], recs[4], recs[3]]
    assert len(rank(cands, T0, S, k=10)) == 6
    assert rank(cands, T0, S, k=0) == []
    assert rank([(far, S.min_similarity)], T0, S)[0].record == far  # the minimum is in
    assert rank([(far, math.nan)], T0, S) == []


def test_rank_breaks_ties_by_similarity_then_id_whatever_the_input_order() -> None:
    a, b = record("tie a", u0=0.2), record("tie b", u0=0.2)
    low, high = sorted([record("tie c", u0=0.1), record("tie d", u0=0.1)],
                       key=lambda r: r.item.id)
    for more_similar in (low, high):  # one of the two goes against the order of ids
        less = high if more_similar is low else low
        cands = [(a, 0.5), (b, 0.5), (more_similar, 1.0), (less, 0.5)]  # a, b, c score 0.1
        expected = [more_similar.item.id, *sorted([a.item.id, b.item.id])]
        for seed in range(6):
            random.Random(seed).shuffle(cands)
            assert [r.record.item.id for r in rank(cands, T0, S, k=3)] == expected


def test_rank_counts_an_item_listed_twice_once_at_its_best_similarity() -> None:
    a, b = record("dup a", u0=0.2), record("dup b", u0=0.2)
    for cands in ([(a, 0.4), (b, 0.5), (a, 0.6)], [(a, 0.6), (b, 0.5), (a, 0.4)]):
        ranked = rank(cands, T0, S)
        assert [(r.record.item.id, r.similarity) for r in ranked] == [(a.item.id, 0.6),
                                                                       (b.item.id, 0.5)]


def test_decay_reorders_an_idle_item_below_a_recently_used_one() -> None:
    idle = record("idle", u0=0.2, at=T0)
    fresh = record("fresh", u0=0.15, at=T0 + 14 * DAY)
    now = T0 + 14 * DAY
    assert [r.record for r in rank([(idle, 0.5), (fresh, 0.5)], now, S)] == [fresh, idle]
    assert rank([(idle, 0.5)], now, S)[0].weight == pytest.approx(0.05)


# ---- the baseline and uses --------------------------------------------------------------


def test_the_baseline_is_a_per_domain_mean_with_a_count() -> None:
    b = Baseline()
    assert b.mean("gsm8k") is None and b.count("gsm8k") == 0
    for s in (1.0, 0.0, 0.0, 1.0, 1.0):
        b.observe("gsm8k", s)
    b.observe("arithmetic", 0.25)
    assert b.mean("gsm8k") == pytest.approx(0.6) and b.count("gsm8k") == 5
    assert b.mean("arithmetic") == 0.25 and b.count("arithmetic") == 1
    assert b.mean("chat") is None
    restored = Baseline.restore(b.snapshot())
    assert restored.snapshot() == b.snapshot() == {"arithmetic": (0.25, 1),
                                                   "gsm8k": (pytest.approx(0.6), 5)}


def test_the_baseline_follows_a_drifting_model_past_its_window() -> None:
    b = Baseline(window=10)
    for _ in range(10):
        b.observe("d", 0.0)
    assert b.mean("d") == 0.0
    for _ in range(100):  # the model got better: the old runs fade
        b.observe("d", 1.0)
    assert b.mean("d") == pytest.approx(1 - 0.9 ** 100) and b.count("d") == 110


def test_the_baseline_refuses_scores_that_are_not_numbers() -> None:
    b = Baseline()
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="score"):
            b.observe("d", bad)
    assert b.mean("d") is None
    with pytest.raises(ValueError, match="window"):
        Baseline(window=0)


def test_a_use_without_a_baseline_changes_nothing() -> None:
    st = admission_stats(0.2, T0, S)
    assert after_use(st, 1.0, None, T0 + DAY, S) == st


def test_a_use_refuses_scores_that_are_not_numbers() -> None:
    st = admission_stats(0.2, T0, S)
    with pytest.raises(ValueError, match="score"):
        after_use(st, math.nan, 0.5, T0, S)
    with pytest.raises(ValueError, match="baseline"):
        after_use(st, 0.5, math.inf, T0, S)


def test_items_given_together_each_get_the_same_delta() -> None:
    a, b = admission_stats(0.2, T0, S), replace(admission_stats(0.0, T0, S), uses=3,
                                                delta_sum=0.3, weight=posterior(0.0, 3, 0.3))
    out = after_uses([a, b], 1.0, 0.25, T0 + 5, S)
    assert out == [after_use(a, 1.0, 0.25, T0 + 5, S), after_use(b, 1.0, 0.25, T0 + 5, S)]
    assert [s.delta_sum for s in out] == [0.75, pytest.approx(1.05)]
    assert after_uses([a, b], 1.0, None, T0, S) == [a, b]


# ---- merge ------------------------------------------------------------------------------


def test_merge_keeps_the_better_and_combines_the_statistics_exactly() -> None:
    a = record("Q: 2 + 3? A: 2 + 3 = 5.", u0=0.3, uses=2, delta_sum=0.4, at=T0,
               last_used=T0 + 3 * DAY)
    b = record("Q: 2+3? A: 2 + 3 = 5", u0=0.1, uses=6, delta_sum=0.3, at=T0 + DAY,
               last_used=T0 + 5 * DAY)
    now = T0 + 6 * DAY
    m = merge(b, a, 0.97, now, S)
    assert (m.keep, m.drop, m.similarity) == (a.item.id, b.item.id, 0.97)
    u0 = ((S.n0 + 2) * 0.3 + (S.n0 + 6) * 0.1) / (2 * S.n0 + 8)
    st = m.stats
    assert st.admitted_utility == pytest.approx(u0)
    assert st.uses == 8 and st.delta_sum == pytest.approx(0.7)
    assert st.weight == pytest.approx(posterior(u0, 8, 0.7))
    assert st.last_used == T0 + 5 * DAY and st.admitted_at == T0
    assert st.source == a.stats.source
    assert merge(a, b, 0.97, now, S) == m  # the order given does not matter


def test_merge_ties_go_to_more_uses_then_the_older_then_the_lower_id() -> None:
    # equal weights, exactly: 0.25 either way
    more = record("more uses", u0=0.25, uses=4, delta_sum=1.0)
    fewer = record("fewer uses", u0=0.25, uses=1, delta_sum=0.25)
    assert merge(fewer, more, 0.95, T0, S).keep == more.item.id
    older = record("older", u0=0.1, at=T0 - DAY, last_used=T0)
    younger = record("younger", u0=0.1, at=T0)
    assert merge(younger, older, 0.95, T0, S).keep == older.item.id
    x, y = record("twin x", u0=0.1), record("twin y", u0=0.1)
    assert merge(x, y, 0.95, T0, S).keep == min(x.item.id, y.item.id)


def test_merge_refuses_an_item_with_itself_or_with_another_domain() -> None:
    a = record("self")
    with pytest.raises(ValueError, match="itself"):
        merge(a, a, 1.0, T0, S)
    with pytest.raises(ValueError, match="gsm8k"):
        merge(a, record("self", domain="gsm8k"), 1.0, T0, S)


# ---- consolidation ----------------------------------------------------------------------


def test_decay_to_the_floor_prunes_an_unused_item_at_the_predicted_time() -> None:
    item = record("never used", u0=0.16)
    keep = record("used", u0=0.16, last_used=T0 + 100 * DAY)
    # 0.16 halves to 0.01 in four half-lives
    predicted = T0 + S.half_life_s * math.log2(0.16 / S.prune_floor)
    assert predicted == pytest.approx(T0 + 28 * DAY)
    assert plan_consolidation([item, keep], {}, predicted - 60, S) == []
    plan = plan_consolidation([item, keep], {}, predicted + 60, S)
    assert [(type(d), removed(d)) for d in plan] == [(Prune, item.item.id)]
    assert isinstance(plan[0], Prune) and plan[0].floor == S.prune_floor
    assert plan[0].weight == pytest.approx(S.prune_floor, rel=1e-4)
    assert plan[0].weight < S.prune_floor


def test_harmful_items_are_pruned_at_once() -> None:
    bad = record("bad", u0=0.2, uses=6, delta_sum=-1.5)
    plan = plan_consolidation([bad], {}, T0, S)
    assert isinstance(plan[0], Prune) and plan[0].weight < 0 and plan[0].item_id == bad.item.id


def test_eviction_under_the_cap_removes_the_least_useful() -> None:
    recs = [record(f"item {i}", u0=w) for i, w in enumerate([0.5, 0.02, 0.3, 0.05, 0.4])]
    plan = plan_consolidation(recs, {}, T0, replace(S, size_cap=3))
    assert plan == [Evict(item_id=recs[1].item.id, weight=0.02, cap=3),
                    Evict(item_id=recs[3].item.id, weight=0.05, cap=3)]
    assert plan_consolidation(recs, {}, T0, replace(S, size_cap=5)) == []


def test_merges_come_first_then_prunes_then_evictions_under_the_cap() -> None:
    a = record("a", u0=0.3)
    a2 = record("a again", u0=0.2)
    dead = record("dead", u0=-0.1)
    weak = record("weak", u0=0.05)
    good = record("good", u0=0.4)
    neighbours = {a.item.id: [(a2.item.id, 0.95), (good.item.id, 0.5)]}
    plan = plan_consolidation([a, a2, dead, weak, good], neighbours, T0,
                              replace(S, size_cap=2))
    assert [type(d) for d in plan] == [Merge, Prune, Evict]
    merged, pruned, evicted = plan
    assert isinstance(merged, Merge) and (merged.keep, merged.drop) == (a.item.id, a2.item.id)
    assert merged.stats == merge(a, a2, 0.95, T0, S).stats
    assert pruned == Prune(item_id=dead.item.id, weight=-0.1, floor=S.prune_floor)
    assert evicted == Evict(item_id=weak.item.id, weight=0.05, cap=2)


def test_an_item_merged_away_is_not_merged_again_and_a_keeper_absorbs_in_turn() -> None:
    a = record("a", u0=0.4)
    b = record("b", u0=0.3)
    c = record("c", u0=0.2)
    d = record("d", u0=0.5)
    # a~b, b~c, a~c: a keeps b then c; b (gone) is never merged with c; d~b is skipped
    neighbours = {a.item.id: [(b.item.id, 0.99), (c.item.id, 0.93)],
                  b.item.id: [(c.item.id, 0.96), (d.item.id, 0.94)]}
    plan = plan_consolidation([a, b, c, d], neighbours, T0, S)
    pairs = [(m.keep, m.drop) for m in plan if isinstance(m, Merge)]
    assert pairs == [(a.item.id, b.item.id), (a.item.id, c.item.id)]
    first = merge(a, b, 0.99, T0, S)
    second = plan[1]
    assert isinstance(second, Merge)
    assert second.stats == merge(replace(a, stats=first.stats), c, 0.93, T0, S).stats


def test_merging_stays_within_a_domain_and_ignores_unknown_ids_and_low_similarity() -> None:
    a = record("same text", u0=0.3, domain="arithmetic")
    b = record("same text!", u0=0.2, domain="gsm8k")
    c = record("close", u0=0.2)
    neighbours = {a.item.id: [(b.item.id, 0.99), ("f" * 64, 0.99), (a.item.id, 1.0),
                              (c.item.id, S.merge_threshold - 1e-6)]}
    assert plan_consolidation([a, b, c], neighbours, T0, S) == []
    # the threshold itself merges
    neighbours = {c.item.id: [(a.item.id, S.merge_threshold)]}
    assert [type(d) for d in plan_consolidation([a, c], neighbours, T0, S)] == [Merge]


def test_a_merge_that_would_leave_its_keeper_under_the_floor_is_not_made() -> None:
    young = record("young", u0=0.3)
    harmful = record("harmful twin", u0=0.2, uses=30, delta_sum=-9.0)
    plan = plan_consolidation([young, harmful], {young.item.id: [(harmful.item.id, 0.97)]},
                              T0, S)
    assert len(plan) == 1 and isinstance(plan[0], Prune)
    assert plan[0].item_id == harmful.item.id
    assert plan[0].weight == pytest.approx(posterior(0.2, 30, -9.0))


def test_duplicate_records_are_our_bug() -> None:
    a = record("a")
    with pytest.raises(ValueError, match="twice"):
        plan_consolidation([a, a], {}, T0, S)


def random_store(seed: int, n: int = 40) -> tuple[list[Record], dict[str, list[tuple[str, float]]]]:
    rng = random.Random(seed)
    recs = [record(f"item {seed} {i}", u0=rng.uniform(-0.1, 0.4), uses=(u := rng.randint(0, 9)),
                   delta_sum=rng.uniform(-0.3, 0.3) * u, at=T0 - rng.uniform(0, 40) * DAY,
                   domain=rng.choice(["arithmetic", "gsm8k"])) for i in range(n)]
    neighbours: dict[str, list[tuple[str, float]]] = {}
    for r in recs:
        others = rng.sample(recs, 5)
        neighbours[r.item.id] = [(o.item.id, round(rng.uniform(0.85, 1.0), 2)) for o in others]
    return recs, neighbours


@pytest.mark.parametrize("seed", range(8))
def test_the_plan_never_touches_an_item_twice_and_respects_the_cap(seed: int) -> None:
    recs, neighbours = random_store(seed)
    settings = replace(S, size_cap=15)
    plan = plan_consolidation(recs, neighbours, T0, settings)
    gone = [removed(d) for d in plan]
    assert len(gone) == len(set(gone)), "an item removed twice"
    for i, d in enumerate(plan):  # nothing removed is used by a later decision
        assert all(removed(d) not in ((x.keep, x.drop) if isinstance(x, Merge) else (x.item_id,))
                   for x in plan[i + 1:])
    merged = {x for d in plan if isinstance(d, Merge) for x in (d.keep, d.drop)}
    pruned = {d.item_id for d in plan if isinstance(d, Prune)}
    assert not merged & pruned, "an item both merged and pruned"
    assert len(recs) - len(gone) <= settings.size_cap
    by_id = {r.item.id: r for r in recs}
    for d in plan:
        if isinstance(d, Merge):
            assert by_id[d.keep].item.domain == by_id[d.drop].item.domain
            assert d.similarity >= settings.merge_threshold


@pytest.mark.parametrize("seed", range(4))
def test_the_plan_does_not_depend_on_input_order(seed: int) -> None:
    recs, neighbours = random_store(seed)
    settings = replace(S, size_cap=15)
    expected = plan_consolidation(recs, neighbours, T0, settings)
    assert any(isinstance(d, Merge) for d in expected)
    rng = random.Random(seed)
    for _ in range(5):
        shuffled = recs[:]
        rng.shuffle(shuffled)
        nb = {k: rng.sample(v, len(v)) for k, v in rng.sample(list(neighbours.items()),
                                                                len(neighbours))}
        assert plan_consolidation(shuffled, nb, T0, settings) == expected


def test_every_decision_says_what_happened_for_a_log_line_and_an_event() -> None:
    a, b = record("a", u0=0.3), record("b", u0=0.2)
    m = merge(a, b, 0.95, T0, S)
    p = Prune(item_id=a.item.id, weight=0.004, floor=0.01)
    e = Evict(item_id=b.item.id, weight=0.02, cap=100)
    assert (m.action, p.action, e.action) == ("merged", "pruned", "evicted")
    assert a.item.id[:12] in str(m) and b.item.id[:12] in str(m) and "0.95" in str(m)
    assert "0.004" in str(p) and "0.01" in str(p)
    assert "cap of 100" in str(e)
    assert m.detail() == {"keep": a.item.id, "drop": b.item.id, "similarity": 0.95,
                          "weight": m.stats.weight, "uses": 0}
    assert p.detail() == {"weight": 0.004, "floor": 0.01}
    assert e.detail() == {"weight": 0.02, "cap": 100}


# ---- the precheck before a replay -------------------------------------------------------


def test_a_novel_candidate_is_replayed_and_says_why() -> None:
    pre = precheck([("a" * 64, 0.5), ("b" * 64, 0.91)], 0, S)
    assert pre.replay and pre.reason == "novel"
    assert (pre.item_id, pre.similarity) == ("b" * 64, 0.91)
    assert "0.91" in pre.message
    empty = precheck([], S.queue_cap - 1, S)
    assert empty.replay and empty.reason == "novel" and empty.item_id == ""
    assert empty.message


def test_a_near_duplicate_is_refused_naming_the_item() -> None:
    pre = precheck([("a" * 64, 0.95), ("c" * 64, 0.97), ("b" * 64, 0.97)], 0, S)
    assert not pre.replay and pre.reason == "duplicate"
    assert (pre.item_id, pre.similarity) == ("b" * 64, 0.97)  # the nearest, then lowest id
    assert "b" * 12 in pre.message
    # a duplicate is the better reason even with the queue full: it never would be admitted
    assert precheck([("a" * 64, 0.99)], S.queue_cap, S).reason == "duplicate"
    assert precheck([("a" * 64, S.merge_threshold)], 0, S).reason == "duplicate"


def test_a_full_queue_refuses() -> None:
    pre = precheck([("a" * 64, 0.5)], S.queue_cap, S)
    assert not pre.replay and pre.reason == "queue_full"
    assert str(S.queue_cap) in pre.message
    with pytest.raises(ValueError, match="queue"):
        precheck([], -1, S)


def test_a_text_refused_for_no_gain_is_not_replayed_again_for_a_while() -> None:
    earlier = EarlierRefusal(age_s=3600.0, utility=-0.05, tasks=4)
    pre = precheck([("a" * 64, 0.5)], 0, S, earlier)
    assert not pre.replay and pre.reason == "refused_before"
    assert "-0.05" in pre.message and "4 tasks" in pre.message
    # a duplicate is still the better reason; past the memory it is judged again
    assert precheck([("a" * 64, 0.99)], 0, S, earlier).reason == "duplicate"
    late = replace(earlier, age_s=S.refusal_memory_s)
    assert precheck([("a" * 64, 0.5)], 0, S, late).reason == "novel"
    off = ControllerSettings(refusal_memory_s=0.0)
    assert precheck([], 0, off, earlier).reason == "novel"
    with pytest.raises(ValueError, match="refusal_memory_s"):
        ControllerSettings(refusal_memory_s=-1.0)


def test_a_nan_similarity_is_no_duplicate() -> None:
    pre = precheck([("a" * 64, math.nan)], 0, S)
    assert pre.replay and pre.reason == "novel"
