"""Verification rules and γ = auto, as pure functions (acceptance.py, gamma.py)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from peerd.inference.options import SpeculativeOptions
from peerd.inference.speculative.acceptance import (
    TAU,
    TokenClasses,
    Verdict,
    token_class,
    verify_adaptive,
    verify_greedy,
    verify_sample,
)
from peerd.inference.speculative.gamma import (
    MAX_PROBE_EVERY,
    PROBE_EVERY,
    TREE_NODES,
    GammaController,
    TreeBudget,
    best_gamma,
    best_tree_size,
    expected_tokens,
)
from peerd.inference.speculative.ngram import NgramDrafter, lookup, lookups

# ---- greedy -------------------------------------------------------------------------------


def onehot_logits(best: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(best), vocab)
    for i, b in enumerate(best):
        logits[i, b] = 5.0
    return logits


def test_greedy_keeps_the_agreeing_prefix_and_adds_the_targets_token() -> None:
    logits = onehot_logits([3, 4, 5, 6])  # the target's argmax at each of γ+1 = 4 rows
    assert verify_greedy(logits, [3, 4, 5]) == Verdict(3, 6)  # all accepted + bonus
    assert verify_greedy(logits, [3, 9, 5]) == Verdict(1, 4)  # correction at position 1
    assert verify_greedy(logits, [7, 4, 5]) == Verdict(0, 3)
    assert verify_greedy(onehot_logits([2]), []) == Verdict(0, 2)  # plain decoding
    assert Verdict(1, 4).committed([3, 9, 5]) == [3, 4]
    with pytest.raises(ValueError, match="γ"):
        verify_greedy(logits, [1])


# ---- sample: the committed tokens are distributed as the target's ------------------------

# 99.9% quantiles of chi-square for 7 degrees of freedom: a correct sampler fails the test
# once in a thousand runs; the seeds below are fixed, so the test is deterministic.
CHI2_999_DF7 = 24.32


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("drafter", ["sampled", "deterministic"])
def test_rejection_sampling_reproduces_the_target_distribution(drafter: str) -> None:
    """γ = 2 over a vocabulary of 8: the first and second committed tokens follow the
    target's p0 and p1 (rows are independent of history here), whatever q is."""
    gen = torch.Generator().manual_seed(1234)
    V, N = 8, 20_000
    p = torch.softmax(torch.randn(3, V, generator=gen) * 1.5, dim=-1)  # target [γ+1, V]
    q = torch.softmax(torch.randn(2, V, generator=gen) * 1.5, dim=-1)  # drafter [γ, V]
    first, second = torch.zeros(V), torch.zeros(V)
    n_second = 0
    accepted_total = 0
    for _ in range(N):
        if drafter == "sampled":
            draft = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
            verdict = verify_sample(p, draft, q, gen)
        else:
            draft = [2, 5]  # a deterministic drafter: q = one-hot
            verdict = verify_sample(p, draft, None, gen)
        tokens = verdict.committed(draft)
        accepted_total += verdict.accepted
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
            n_second += 1
    chi_first = chi_square(first, p[0])
    chi_second = chi_square(second, p[1])
    print(f"{drafter}: chi2 first {chi_first:.1f}, second {chi_second:.1f} (99.9% bound "
          f"{CHI2_999_DF7}); {accepted_total / N:.2f} accepted per round")
    assert chi_first < CHI2_999_DF7
    assert n_second > 1000 and chi_second < CHI2_999_DF7
    assert accepted_total > 0


def test_rejection_sampling_accepts_everything_when_draft_equals_target() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 6, generator=gen), dim=-1)
    for _ in range(200):
        draft = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(2)]
        assert verify_sample(p, draft, p[:2], gen).accepted == 2


# ---- adaptive ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "cls"), [
    (" ", "space"), ("\n", "space"), (",", "punct"), (" .", "punct"), ("...", "punct"),
    (" the", "function"), (" of", "function"), (" apples", "word"), ("ing", "word"),
    (" 42", "strict"), ("7", "strict"), (" +", "strict"), ("(", "strict"), ("_id", "strict"),
    (" Paris", "strict"), ("camelCase", "strict"), (" $", "strict"), ("=", "strict"),
    (" not", "strict"), (" and", "strict"), (" or", "strict"), (" more", "strict"),
    (" all", "strict"), (" in", "strict"), (" if", "strict"), (" was", "function"),
    ("\n    ", "strict"), ("   ", "strict"), ("\n\n", "space"),
])
def test_token_classes(text: str, cls: str) -> None:
    assert token_class(text) == cls


def probs_logits(rows: list[dict[int, float]], vocab: int = 6) -> torch.Tensor:
    """Logits whose softmax puts the given mass on the given tokens (rest spread)."""
    out = torch.empty(len(rows), vocab)
    for i, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (vocab - len(row))
        p = torch.full((vocab,), rest)
        for t, m in row.items():
            p[t] = m
        out[i] = p.log()
    return out


# token ids of a toy vocabulary: 0 " the", 1 " a", 2 " 7", 3 " 9", 4 ",", 5 " apples"
TOY = TokenClasses([" the", " a", " 7", " 9", ",", " apples"])


def test_adaptive_relaxes_function_words_near_ties_but_never_digits() -> None:
    # row 0: the target slightly prefers " the" over " a": function words, near-tie
    # row 1: " 7" vs " 9": digits, always strict
    logits = probs_logits([{0: 0.45, 1: 0.40}, {2: 0.45, 3: 0.40}, {4: 0.9}])
    assert verify_adaptive(logits, [1, 3], TOY) == Verdict(1, 2)  # " a" kept, " 9" not
    assert verify_greedy(logits, [1, 3]) == Verdict(0, 0)  # greedy keeps neither


def test_adaptive_is_strict_where_the_target_is_confident_or_far_apart() -> None:
    confident = probs_logits([{0: 0.92, 1: 0.05}, {4: 0.9}])
    assert verify_adaptive(confident, [1], TOY) == Verdict(0, 0)
    far = probs_logits([{0: 0.6, 1: 0.2}, {4: 0.9}])  # 0.2 < (1 - 0.4) * 0.6
    assert verify_adaptive(far, [1], TOY) == Verdict(0, 0)
    # a digit may not replace a word, nor a word a digit (min over both classes)
    mixed = probs_logits([{0: 0.45, 2: 0.44}, {4: 0.9}])
    assert verify_adaptive(mixed, [2], TOY) == Verdict(0, 0)
    assert TAU["strict"] == 0.0


def test_adaptive_agrees_with_greedy_when_drafts_match() -> None:
    logits = onehot_logits([1, 2, 3], vocab=6)
    assert verify_adaptive(logits, [1, 2], TOY) == verify_greedy(logits, [1, 2])


# ---- prompt lookup ------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_latest_match() -> None:
    seq = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert lookup(seq, 3) == [7, 8, 1]  # the latest earlier "1 2 3" was followed by 7 8 1
    assert lookup([5, 6, 7], 4) == []
    assert lookup([4, 4, 4], 2) == [4]  # only what exists before the tail's own position


def test_lookups_give_distinct_continuations_latest_and_longest_first() -> None:
    seq = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 2, 3]
    # "2 3" (n=2) was followed by 7 8 6 (latest), then 4 5 9; then "3" alone adds nothing
    assert lookups(seq, 3) == [[7, 8, 6], [4, 5, 9]]
    assert lookups(seq, 3, branches=1) == [lookup(seq, 3)]
    # a continuation that merely repeats the start of an earlier one adds nothing
    assert lookups([1, 1, 1, 1], 2) == [[1], [1, 1]]
    tree = NgramDrafter().start()
    tree.extend(seq, None)
    drafted = tree.propose_tree(3)
    assert drafted.tokens == [7, 8, 6, 4, 5, 9] and drafted.parents == [-1, 0, 1, -1, 3, 4]


# ---- γ = auto -----------------------------------------------------------------------------


def test_expected_tokens() -> None:
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9


def test_best_gamma_grows_with_acceptance_and_link_latency() -> None:
    # slow links (large fixed cost) and a good drafter: draft long
    assert best_gamma(0.9, fixed_ms=200, per_token_ms=5) >= 10
    # a poor drafter: short drafts
    assert best_gamma(0.2, fixed_ms=200, per_token_ms=5) <= 2
    # compute-bound (each position as dear as the round): γ stays small
    assert best_gamma(0.8, fixed_ms=10, per_token_ms=10) <= 3
    assert best_gamma(0.9, 200, 5) > best_gamma(0.9, 20, 5)


def test_gamma_controller_follows_the_session() -> None:
    fixed = GammaController(fixed=5)
    fixed.observe(5, 0, 100.0)
    assert fixed.next() == 5
    auto = GammaController()
    assert auto.next() == 4  # before any measurement
    for g in (4, 6, 8, 5, 7, 6, 8):  # every draft fully accepted; slow rounds
        auto.observe(g, g, 150.0 + 2.0 * g)
    a, b = auto.cost()
    assert 140 < a < 160 and 1.0 < b < 3.0  # the fit recovers T = 150 + 2γ
    assert auto.next() >= 10
    for _ in range(12):  # now the drafter keeps missing at once
        g = auto.next()
        auto.observe(g, 0, 150.0 + 2.0 * g)
    assert auto.next() <= 2


def test_gamma_auto_stops_drafting_when_it_does_not_pay_but_keeps_probing() -> None:
    """Compute-bound (no link latency) with a drafter that always misses: each drafted
    position costs as much as the round, so plain rounds (γ = 0) win; every
    PROBE_EVERY-th round still drafts, to notice a drafter that starts hitting."""
    auto = GammaController()
    choices = []
    for _ in range(40):
        g = auto.next()
        choices.append(g)
        auto.observe(g, 0, 50.0 + 40.0 * g)
    tail = choices[16:]
    assert tail.count(0) >= len(tail) * 3 // 4
    assert any(g > 0 for g in tail)
    assert best_gamma(0.0, 50, 40, min_gamma=0) == 0


# ---- tree size ----------------------------------------------------------------------------


def test_best_tree_size_buys_candidates_while_they_pay_for_their_position() -> None:
    probs = [0.9, 0.6, 0.3, 0.1, 0.05, 0.02, 0.01]
    # slow links: a round costs 200 ms and a position 5: keep every candidate whose
    # chance beats what the round's rate earns in 5 ms
    slow = best_tree_size(probs, fixed_ms=200, per_node_ms=5)
    rate = (1 + sum(probs[:slow])) / (200 + 5 * slow)
    assert all(p > rate * 5 for p in probs[:slow]) and probs[slow] <= rate * 5 * 1.01
    assert slow >= 4
    # compute-bound: a position costs as much as the round: nothing but sure bets
    assert best_tree_size(probs, fixed_ms=20, per_node_ms=20) <= 1
    assert best_tree_size(probs, 200, 5) > best_tree_size(probs, 20, 5)
    # a head that is right a quarter as often as it believes buys a smaller tree
    assert best_tree_size(probs, 200, 5, calibration=0.25) < slow
    assert best_tree_size([], 200, 5) == 0
    assert best_tree_size([0.0, 0.0], 10, 1) == 0
    assert best_tree_size([0.0, 0.0], 10, 1, min_nodes=1) == 1


def test_tree_budget_follows_the_session() -> None:
    probs = sorted([0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1] * 4, reverse=True)
    assert TreeBudget(fixed=5).choose(probs) == 5
    assert TreeBudget(fixed=5).choose(probs[:2]) == 2
    budget = TreeBudget()
    assert budget.choose(probs) == TREE_NODES  # before any measurement
    assert budget.calibration == 1.0
    for n in (16, 8, 24, 12, 20):  # slow rounds, cheap positions, the head right as it says
        budget.observe(n, sum(probs[:n]), round(sum(probs[:n])), 200.0 + 5.0 * n)
    a, b = budget.fit.cost()
    assert 190 < a < 210 and 4.5 < b < 5.5
    assert 0.9 < budget.calibration < 1.1
    big = budget.choose(probs)
    assert big >= 20
    for _ in range(10):  # the head now gets a tenth of what it predicts
        budget.observe(big, sum(probs[:big]), 1, 200.0 + 5.0 * big)
    assert budget.calibration < 0.2
    assert budget.choose(probs) < big


def test_tree_budget_grows_a_level_while_its_candidates_pay_for_its_time() -> None:
    budget = TreeBudget()
    assert budget.rate == 0.0
    assert budget.deeper([0.001], 50.0)  # nothing measured: grow
    for _ in range(20):  # 3 tokens per 300 ms round: 0.01 tokens per ms
        budget.observe(10, 2.0, 2, 300.0, committed=3)
    assert budget.rate == pytest.approx(0.01)
    assert budget.calibration == pytest.approx(1.0)
    # a 5 ms level is worth 0.05 tokens here
    assert budget.deeper([0.04, 0.02], 5.0)
    assert not budget.deeper([0.03, 0.01], 5.0)
    assert not budget.deeper([0.04, 0.02], 10.0)  # a slower head: the same level does not
    # a fast pipeline (20 tokens per 300 ms) prices a level's time higher
    for _ in range(20):
        budget.observe(10, 2.0, 2, 300.0, committed=20)
    assert not budget.deeper([0.04, 0.02], 5.0)
    assert budget.deeper([0.3, 0.1], 5.0)
    # a head right half as often as it believes counts its candidates at half
    for _ in range(30):
        budget.observe(10, 4.0, 2, 300.0, committed=20)
    assert budget.calibration == pytest.approx(0.5, abs=0.01)
    assert not budget.deeper([0.3, 0.1], 5.0)
    # committed defaults to the accepted tokens plus the target's own
    other = TreeBudget()
    other.observe(10, 2.0, 4, 100.0)
    assert other.rate == pytest.approx(0.05)


def test_tree_budget_stops_drafting_when_it_does_not_pay_but_keeps_probing() -> None:
    """Compute-bound, a head whose candidates are all long shots: after the first
    rounds it stops growing trees (plain rounds), and after PROBE_EVERY rounds grows
    one and sends a few nodes, to notice a head that starts hitting; each probe that
    does not pay doubles the wait for the next."""
    budget = TreeBudget()
    probs = [0.05] * 16
    rounds: list[int | None] = []  # nodes sent; None: no tree grown
    for _ in range(80):
        if not budget.drafting():
            rounds.append(None)
            budget.observe_plain(50.0)
            continue
        n = budget.choose(probs)
        rounds.append(n)
        budget.observe(n, sum(probs[:n]), 0, 50.0 + 20.0 * n)
    tail = rounds[20:]
    assert tail.count(None) >= len(tail) * 3 // 4
    probes = [n for n in tail if n is not None and n > 0]
    assert probes and all(n == budget.probe for n in probes)
    drafted = [i for i, n in enumerate(rounds) if n is not None]
    waits = [b - a - 1 for a, b in pairwise(drafted) if b - a > 1]
    assert waits[:3] == [PROBE_EVERY - 1, 2 * PROBE_EVERY - 1, 4 * PROBE_EVERY - 1], rounds
    # and once the head hits, trees come back (the next probe restores the head's
    # calibration, the one after finds a tree that pays)
    for _ in range(2 * MAX_PROBE_EVERY + 2):
        if budget.drafting():
            n = budget.choose([0.95] * 16)
            budget.observe(n, 0.95 * n, n, 50.0 + 2.0 * n)
        else:
            budget.observe_plain(50.0)
    assert budget.drafting() and budget.choose([0.95] * 16) > 0


def test_tree_budget_counts_the_drafting_against_a_plain_round() -> None:
    """Whether to draft is measured: the rounds that drafted commit r tokens a ms of
    their whole time, drafting included, against 1 token a plain round. On a fast link
    (plain rounds of 72 ms; a tree's pass 120 ms + 4.5 ms a node, 18 ms of drafting) a
    head whose trees commit 1.6 tokens has the session decode plain; one whose trees
    commit 3 (lookup branches included, which the head's estimates do not cover), the
    same head behind a slow link, or one that drafts for free where there is no jump,
    keep it drafting."""

    def drafts(committed: int, plain_ms: float, jump_ms: float, draft_ms: float) -> bool:
        budget = TreeBudget()
        assert not budget.drafting()  # a plain round first: what a tree must beat
        budget.observe_plain(plain_ms)
        for n in (8, 10, 12, 10, 8, 12):
            if not budget.drafting():
                return False
            budget.choose([0.3] * 16)
            budget.observe(n, 1.0, committed - 1, plain_ms + jump_ms + 4.5 * n,
                           committed=committed, draft_ms=draft_ms)
        return budget.drafting()

    assert not drafts(2, 72.0, 48.0, 18.0)  # 2 tokens in 183 ms against 1 in 72
    assert drafts(3, 72.0, 48.0, 18.0)
    assert drafts(2, 250.0, 48.0, 18.0)  # 2 tokens in 361 ms against 1 in 250
    assert drafts(2, 72.0, 0.0, 0.0)  # 2 tokens in 117 ms
    assert drafts(2, 72.0, 16.0, 18.0)  # 2 tokens in 151 ms: barely worse, drafts on
    assert TreeBudget(fixed=4).drafting()  # a fixed size drafts from the first round
    # one round is too few to judge by: a slow start among good rounds drafts on
    budget = TreeBudget()
    budget.observe_plain(72.0)
    for committed in (1, 4, 4):
        assert budget.drafting()
        budget.choose([0.6] * 16)
        budget.observe(10, 2.0, committed - 1, 165.0, committed=committed, draft_ms=18.0)
    assert budget.drafting()
    # and before any plain round is measured, the fit's intercept stands in for one
    budget = TreeBudget()
    budget.plain_ms = None
    for n in (4, 8, 12):
        budget.observe(n, 1.0, 0, 72.0 + 4.5 * n, draft_ms=18.0)  # 1 token a round
    assert not budget.drafting()


# ---- the speculative option ---------------------------------------------------------------


def test_speculative_options() -> None:
    assert SpeculativeOptions.parse_flag("eagle,adaptive") == SpeculativeOptions(
        "eagle", "adaptive")
    assert SpeculativeOptions.parse_flag("ngram,greedy,4").gamma == 4
    assert SpeculativeOptions.parse_flag("model:smollm2").draft == "model:smollm2"
    assert not SpeculativeOptions().enabled
    for bad in ("magic", "model:", "ngram:x", "eagle,fast", "ngram,greedy,0", "ngram,greedy,99",
                "ngram,greedy,x", "a,b,c,d"):
        with pytest.raises(ValueError):
            SpeculativeOptions.parse_flag(bad)
