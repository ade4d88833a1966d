"""Symphony's pure parts: answer normalisation, weighted voting, reputation, the
election state machine and its drivers over memory channels with a fake clock, and
a Byzantine simulation over the real election, voting and reputation code."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest
import trio
import trio.testing

from peerd.agents import answers, reputation, voting
from peerd.agents.election import (
    MAX_BIDS,
    Candidate,
    Election,
    Fallback,
    WorkFailed,
    fill_seats,
    rank,
    run_election,
)
from peerd.agents.reputation import PRIOR, ReputationBook, view
from peerd.agents.skills import LexicalMatcher, make_matcher
from peerd.agents.voting import Ballot, tally

# ---- answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "want"), [
    ("$1,200.00", "1200"), ("1200", "1200"), ("1,200", "1200"), ("1200.50", "1200.5"),
    ("-0.50", "-0.5"), ("0.0", "0"), ("3/4", "0.75"), ("18 dollars", "18"),
    ("3 * 6 = 18.", "18"), ("$ 42", "42"), ("about 1e3", "3"), ("none", None), ("", None),
    ("1/0", None),
])
def test_numbers_normalise_to_one_canonical_form(raw: str, want: str | None) -> None:
    assert answers.normalise_number(raw) == want


@pytest.mark.parametrize(("raw", "want"), [
    ("B", "B"), ("(b)", "B"), ("B) 42", "B"), ("Option C", "C"), ("the answer: D.", "D"),
    ("I think (E) is right", "E"), ("A", "A"), ("nothing", None),
])
def test_choices_normalise_to_a_letter(raw: str, want: str | None) -> None:
    assert answers.normalise_choice(raw) == want


def test_text_normalises_case_punctuation_and_articles() -> None:
    assert answers.normalise_text("The Eiffel  Tower!") == "eiffel tower"
    assert answers.normalise_text("eiffel tower") == "eiffel tower"
    assert answers.normalise_text("  ...  ") is None


def test_extraction_prefers_the_first_marked_answer() -> None:
    cot = "3 boxes of 4 is 12. 12 - 2 = 10.\nAnswer: 10\nQuestion: more?\nAnswer: 7\n"
    assert answers.extract(cot, "number") == answers.Extracted("10", True)
    assert answers.extract("so the answer is $1,200.", "number").answer == "$1,200."
    assert answers.extract("work\n#### 72", "number") == answers.Extracted("72", True)


def test_extraction_guesses_by_format_when_nothing_is_marked() -> None:
    assert answers.extract("2 + 3 = 5 and then 5 * 2 = 10", "number") == \
        answers.Extracted("10", False)
    assert answers.extract("I pick (C) because (B) is wrong", "choice").answer == "(B)"
    assert answers.extract("first line\nParis\n\n", "text") == answers.Extracted("Paris", False)
    assert answers.extract("", "number") == answers.Extracted("", False)


# ---- skills -------------------------------------------------------------------------


def test_lexical_match_is_the_best_skills_share_of_words_found() -> None:
    m = LexicalMatcher()
    assert m.match("arithmetic word problems", ["Arithmetic word problem"]) == 1.0
    assert m.match("solve this arithmetic problem", ["arithmetic word problems"]) == \
        pytest.approx(2 / 3)
    assert m.match("write python code", ["poetry", "python code"]) == 1.0
    assert m.match("anything", []) == 0.0
    assert make_matcher("lexical").name == "lexical"
    with pytest.raises(ValueError, match="skill matcher"):
        make_matcher("psychic")


# ---- voting -------------------------------------------------------------------------


def ballot(peer: str, answer: str | None, confidence: float = 0.5, match: float = 0.5,
           rep: float = PRIOR) -> Ballot:
    return Ballot(peer, answer, confidence, match, rep)


def test_the_answer_with_the_most_weight_wins() -> None:
    t = tally([ballot("a", "12"), ballot("b", "12"), ballot("c", "7", confidence=1.0)])
    assert t.answer == "12"
    assert t.counts == {"12": 2, "7": 1}
    assert t.totals["12"] == pytest.approx(t.weights["a"] + t.weights["b"])


def test_two_agreeing_chains_outweigh_one_however_sure_at_equal_reputation() -> None:
    liar = ballot("liar", "666", confidence=1.0, match=1.0)
    for conf in (0.0, 0.3):
        honest = [ballot("h1", "42", conf, 0.0), ballot("h2", "42", conf, 0.0)]
        assert tally([liar, *honest]).answer == "42"


def test_weight_grows_with_reputation_confidence_and_match() -> None:
    base = voting.weight(ballot("a", "1", 0.5, 0.5, 0.5))
    assert voting.weight(ballot("a", "1", 0.5, 0.5, 0.9)) > base
    assert voting.weight(ballot("a", "1", 0.9, 0.5, 0.5)) > base
    assert voting.weight(ballot("a", "1", 0.5, 0.9, 0.5)) > base
    # Claims are clipped to [0, 1]; a newcomer (reputation 0) still counts a little.
    assert voting.weight(ballot("a", "1", 7.0, -3.0, 0.5)) == \
        voting.weight(ballot("a", "1", 1.0, 0.0, 0.5))
    assert voting.weight(ballot("a", "1", math.nan, 0.5, 0.0)) > 0


def sure(peer: str, answer: str | None, measured: float, match: float = 0.5,
         confidence: float = 0.5, rep: float = PRIOR) -> Ballot:
    """A ballot whose chain the requester measured."""
    return Ballot(peer, answer, confidence, match, rep, measured)


def test_measured_chains_weigh_by_how_sure_the_model_is_of_them_relative_to_the_surest(
        ) -> None:
    # the chain the model is clearly surest of outweighs two agreeing, less likely ones
    t = tally([sure("a", "7", 0.80), sure("b", "12", 0.60), sure("c", "12", 0.60)])
    assert t.answer == "7"
    assert t.weights["b"] == pytest.approx(t.weights["a"] * voting.FLOOR)
    # close measures leave it to the majority
    assert tally([sure("a", "7", 0.80), sure("b", "12", 0.79), sure("c", "12", 0.79)]
                 ).answer == "12"
    # relative: scaling every measure changes no weight
    for scale in (0.5, 0.1):
        scaled = tally([sure("a", "7", 0.8 * scale), sure("b", "12", 0.6 * scale)])
        assert scaled.weights == pytest.approx(tally([sure("a", "7", 0.8),
                                                      sure("b", "12", 0.6)]).weights)
    # once measured, what a worker claims about its chain counts for nothing
    t = tally([sure("liar", "7", 0.5, confidence=1.0), sure("h", "12", 0.8, confidence=0.0)])
    assert t.answer == "12"
    # reputation still multiplies
    assert tally([sure("a", "7", 0.8, rep=0.05), sure("b", "12", 0.6, rep=0.9)]).answer == "12"
    # nothing the model finds likely at all: the measures tell the chains apart by nothing
    assert voting.certainty(0.0, 0.0) == 1.0


def test_agreeing_measured_chains_outweigh_any_one_however_sure_from_one_over_floor() -> None:
    # At the least match term (0.75), four agreeing chains at the floor weigh what one
    # perfect chain does, and a tie goes to more chains: four honest workers always win
    # against one liar, however likely its chain and whatever match it claims.
    liar = sure("liar", "666", 1.0, match=1.0, confidence=1.0)
    honest = [sure(f"h{i}", "42", 0.01, match=0.0, confidence=0.0) for i in range(4)]
    assert tally([liar, *honest]).answer == "42"
    assert tally([liar, *honest[:3]]).answer == "666"  # the bound is tight


def test_claims_stand_in_unless_every_chain_with_an_answer_was_measured() -> None:
    liar = sure("liar", "666", 1.0, match=1.0, confidence=1.0)
    honest = [sure("h1", "42", 0.01, confidence=0.0), ballot("h2", "42", 0.0)]
    t = tally([liar, *honest])  # h2 unmeasured: claimed, two agreeing chains win
    assert t.answer == "42"
    assert t.weights["liar"] == pytest.approx(voting.weight(ballot("liar", "666", 1.0, 1.0)))
    # a chain without an answer needs no measure
    measured = tally([sure("a", "7", 0.8), sure("b", "12", 0.6), sure("c", "12", 0.6),
                      ballot("d", None)])
    assert measured.answer == "7"


def test_ties_break_deterministically_whatever_the_order() -> None:
    ballots = [ballot("a", "x"), ballot("b", "y"), ballot("c", "z", 0.3), ballot("d", "z", 0.0)]
    results = set()
    for seed in range(10):
        shuffled = list(ballots)
        random.Random(seed).shuffle(shuffled)
        results.add(tally(shuffled).answer)
    assert len(results) == 1
    # An exact tie in weight goes to more chains, then the smaller string.
    assert tally([ballot("a", "y"), ballot("b", "x")]).answer == "x"
    assert tally([ballot("a", "y", 1.0), ballot("b", "x", 1.0)]).answer == "x"


def test_chains_without_an_answer_carry_no_vote_and_repeats_count_once() -> None:
    t = tally([ballot("a", None, 1.0), ballot("b", "5", 0.0), ballot("b", "9", 1.0)])
    assert t.answer == "5"
    assert set(t.weights) == {"a", "b"}
    assert tally([ballot("a", None)]).answer is None
    assert tally([]).answer is None


# ---- reputation ---------------------------------------------------------------------


def test_reputation_is_an_ewma_of_agreement_and_punctuality() -> None:
    book = ReputationBook("me")
    assert book.observe("p", agreed=True, punctual=True, now=1.0) == pytest.approx(0.6)
    assert book.observe("p", agreed=False, punctual=True, now=2.0) == \
        pytest.approx(0.8 * 0.6 + 0.2 * 0.3)
    assert book.observe("p", agreed=False, punctual=False, now=3.0) < 0.6
    assert book.records["p"].tasks == 3
    assert book.observe("me", agreed=True, punctual=True, now=4.0) == PRIOR  # never itself
    assert "me" not in book.own()


def test_own_observations_weigh_twice_others_and_self_claims_never_count() -> None:
    own = {"w": 0.9, "good": 0.9, "bad": 0.1}
    assert view("w", "me", own, {}) == pytest.approx(0.9)
    assert view("new", "me", own, {}) == PRIOR
    # Two observers: one we trust (0.9), one we don't (0.1).
    reports = {"good": {"w": 0.3}, "bad": {"w": 0.0}}
    others = (0.9 * 0.3 + 0.1 * 0.0) / 1.0
    assert view("w", "me", own, reports) == pytest.approx((2 * 0.9 + others) / 3)
    # What w says about itself and what our own entry says are ignored.
    assert view("w", "me", own, {"w": {"w": 1.0}, "me": {"w": 0.0}}) == pytest.approx(0.9)
    # Garbage reports are ignored, not trusted.
    assert view("w", "me", own, {"good": {"w": 7.0}}) == pytest.approx(0.9)


def test_the_book_publishes_recent_scores_and_survives_a_damaged_file() -> None:
    book = ReputationBook("me")
    for i in range(reputation.MAX_PUBLISHED + 10):
        book.observe(f"p{i}", agreed=True, punctual=True, now=float(i))
    published = book.published()
    assert len(published) == reputation.MAX_PUBLISHED
    assert "p0" not in published and f"p{reputation.MAX_PUBLISHED + 9}" in published
    again = ReputationBook.from_json("me", {**book.to_json(), "x": "junk", "me": [1, 1, 1]})
    assert again.own() == book.own()
    # numbers a damaged file may hold: 1e400 reads as inf, and int(inf) overflowed,
    # which stopped the daemon at start
    damaged = {**book.to_json(), "big": [0.5, float("inf"), 1.0], "nan": [0.5, 1, float("nan")],
               "neg": [0.5, -3, 1.0]}
    assert ReputationBook.from_json("me", damaged).own() == book.own()


# ---- election -----------------------------------------------------------------------


def flat(_: str) -> float:
    return PRIOR


def test_ranking_prefers_match_reputation_and_low_load() -> None:
    bids = [Candidate("lo-match", 0.1), Candidate("hi-match", 0.9),
            Candidate("busy", 0.9, load=1), Candidate("slow", 0.9, expected_latency_s=10)]
    order = [c.peer_id for c in rank(bids, flat, 30.0, "t")]
    assert order == ["hi-match", "busy", "slow", "lo-match"]
    trusted = {"lo-match": 1.0}.get
    order = [c.peer_id for c in rank(bids, lambda p: trusted(p) or 0.2, 30.0, "t")]
    assert order[0] == "lo-match"


def test_ranking_ties_break_by_a_hash_of_task_and_peer() -> None:
    bids = [Candidate(f"p{i}", 0.5) for i in range(6)]
    one = [c.peer_id for c in rank(bids, flat, 10.0, "task-1")]
    assert one == [c.peer_id for c in rank(reversed(bids), flat, 10.0, "task-1")]
    others = {tuple(c.peer_id for c in rank(bids, flat, 10.0, f"task-{i}")) for i in range(8)}
    assert len(others) > 1  # not always the same peer first


def election(wanted: int = 2, expected: int = 3, closes_at: float = 1.0) -> Election:
    return Election("t", "me", wanted, expected_bidders=expected, closes_at=closes_at,
                    deadline_s=10.0, reputation=flat)


def test_election_is_ready_when_every_expected_peer_bid_or_the_window_closes() -> None:
    e = election(expected=2)
    assert not e.ready(0.0)
    assert e.offer(Candidate("a", 0.5)) == "accepted"
    assert e.offer(Candidate("a", 0.9)) == "duplicate"
    assert e.offer(Candidate("me", 1.0)) == "reserve"
    assert not e.ready(0.5)
    assert e.ready(1.0)
    e.offer(Candidate("b", 0.5))
    assert e.ready(0.5)
    # Nobody expected: wait for the whole window (peers we do not know of may bid).
    assert not election(expected=0).ready(0.99)


def test_own_bid_is_a_reserve_for_seats_others_cannot_fill() -> None:
    e = election(wanted=2)
    e.offer(Candidate("me", 1.0))
    e.offer(Candidate("a", 0.1))
    e.offer(Candidate("b", 0.2))
    assert [c.peer_id for c in e.elect()] == ["b", "a"]  # never "me" while others can
    alone = election(wanted=3)
    alone.offer(Candidate("me", 0.0))
    alone.offer(Candidate("a", 0.5))
    assert [c.peer_id for c in alone.elect()] == ["a", "me"]


def test_a_flood_of_bids_is_capped_by_rank_and_each_reputation_read_once() -> None:
    """Any peer may bid: an election keeps MAX_BIDS bids, the best ranked, and never
    drops a seated one; a good bid that comes after the flood still takes a seat; each
    bidder's reputation is read once however often the election ranks."""
    asked: Counter[str] = Counter()
    dropped: list[str] = []

    def reputation(peer: str) -> float:
        asked[peer] += 1
        return 0.9 if peer.startswith("good") else PRIOR

    e = Election("t", "me", 2, expected_bidders=0, closes_at=1.0, deadline_s=10.0,
                 reputation=reputation, on_drop=dropped.append)
    for i in range(MAX_BIDS):
        assert e.offer(Candidate(f"sybil-{i}", 1.0)) == "accepted"
    seated = {c.peer_id for c in e.elect()}
    assert e.offer(Candidate("sybil-late", 0.5)) == "full" and dropped == ["sybil-late"]
    assert e.offer(Candidate("good-late", 0.8)) == "accepted"  # ranks above every sybil
    assert len(e.bids) == MAX_BIDS and len(dropped) == 2 and dropped[1] not in seated
    assert seated <= set(e.bids)
    for _ in range(3):
        e.ranking()
    assert e.replacement().peer_id == "good-late"  # type: ignore[union-attr]
    assert max(asked.values()) == 1  # (a dropped bid forgets its look-up)
    assert len(e._known) <= MAX_BIDS + 1


def test_replacements_come_in_rank_order_late_bids_included_then_run_out() -> None:
    e = election(wanted=1)
    e.offer(Candidate("a", 0.9))
    e.offer(Candidate("b", 0.5))
    assert [c.peer_id for c in e.elect()] == ["a"]
    e.offer(Candidate("late", 0.7))
    e.offer(Candidate("me", 1.0))
    assert [e.replacement().peer_id for _ in range(3)] == ["late", "b", "me"]  # type: ignore[union-attr]
    assert e.replacement() is None


def test_a_no_show_ranks_after_every_other_bidder_whatever_it_claims() -> None:
    e = Election("t", "me", 2, expected_bidders=2, closes_at=1.0, deadline_s=10.0,
                 reputation=flat, demoted=lambda p: p == "no-show")
    e.offer(Candidate("no-show", 1.0))
    e.offer(Candidate("a", 0.0))
    assert not e.ready(0.5)  # its bid is not one we wait for
    e.offer(Candidate("b", 0.1))
    e.offer(Candidate("me", 1.0))
    assert e.ready(0.5)
    assert [c.peer_id for c in e.ranking()] == ["b", "a", "no-show", "me"]
    assert [c.peer_id for c in e.elect()] == ["b", "a"]
    # ... but it still fills a seat the others cannot, before our own reserve
    assert e.replacement() == Candidate("no-show", 1.0)


def test_a_no_show_is_remembered_for_a_while_or_until_it_delivers() -> None:
    shows = reputation.NoShows()
    shows.missed("w", 100.0)
    assert shows.recent("w", 100.0 + reputation.NO_SHOW_S - 1)
    assert not shows.recent("w", 100.0 + reputation.NO_SHOW_S)
    assert not shows.recent("other", 100.0)
    shows.missed("w", 200.0)
    shows.delivered("w")
    assert not shows.recent("w", 201.0)
    for i in range(reputation.MAX_NO_SHOWS + 1):
        shows.missed(f"p{i}", float(i))
    assert not shows.recent("p0", 1.0) and shows.recent("p1", 1.0)


def test_no_shows_read_back_from_a_file_keep_only_what_is_not_over_and_well_formed(
        ) -> None:
    shows = reputation.NoShows()
    shows.missed("old", 100.0)
    shows.missed("new", 500.0)
    data = {**shows.to_json(), "bad": "soon", "flag": True, "inf": float("inf"), "7": 600}
    back = reputation.NoShows.from_json(data, now=100.0 + reputation.NO_SHOW_S)
    assert back.to_json() == {"new": 500.0, "7": 600.0}
    assert back.recent("new", 501.0) and not back.recent("old", 501.0)
    for damaged in (None, [], "x", {"p": None}):
        assert reputation.NoShows.from_json(damaged, now=0.0).to_json() == {}


async def test_run_election_waits_for_expected_bids_on_a_fake_clock(
        autojump_clock: trio.testing.MockClock) -> None:
    send, recv = trio.open_memory_channel[Candidate](16)
    e = election(wanted=2, expected=3, closes_at=trio.current_time() + 5.0)
    async with trio.open_nursery() as nursery:
        async def bidders() -> None:
            for i, delay in enumerate([0.1, 0.2, 0.3, 9.0]):
                await trio.sleep(delay)
                await send.send(Candidate(f"p{i}", 0.1 * (i + 1)))

        nursery.start_soon(bidders)
        t0 = trio.current_time()
        seats = await run_election(e, recv, nursery)
        assert trio.current_time() - t0 == pytest.approx(0.6)  # the third bid, not 5 s
        assert [c.peer_id for c in seats] == ["p2", "p1"]
        nursery.cancel_scope.cancel()


async def test_run_election_holds_at_the_window_with_whatever_bid(
        autojump_clock: trio.testing.MockClock) -> None:
    send, recv = trio.open_memory_channel[Candidate](16)
    e = election(wanted=3, expected=5, closes_at=trio.current_time() + 2.0)
    async with trio.open_nursery() as nursery:
        send.send_nowait(Candidate("only", 0.5))
        t0 = trio.current_time()
        seats = await run_election(e, recv, nursery)
        assert trio.current_time() - t0 == pytest.approx(2.0)
        assert [c.peer_id for c in seats] == ["only"]
        send.send_nowait(Candidate("late", 0.5))  # still offered, for fallbacks
        await trio.sleep(0.1)
        assert "late" in e.bids
        nursery.cancel_scope.cancel()


async def test_fill_seats_replaces_late_and_failing_workers(
        autojump_clock: trio.testing.MockClock) -> None:
    e = election(wanted=2)
    for peer, match in [("slow", 0.9), ("broken", 0.8), ("spare1", 0.5), ("spare2", 0.4)]:
        e.offer(Candidate(peer, match))
    seats = e.elect()
    seen: list[Fallback] = []

    async def work(seat: int, c: Candidate) -> str:
        if c.peer_id == "slow":
            await trio.sleep(3600)
        if c.peer_id == "broken":
            raise WorkFailed("bad_signature")
        await trio.sleep(1.0)
        return f"answer from {c.peer_id}"

    t0 = trio.current_time()
    results, fallbacks = await fill_seats(e, seats, work, 10.0, seen.append)
    assert trio.current_time() - t0 == pytest.approx(11.0)  # the deadline, then 1 s
    assert [(r.worker.peer_id if r.worker else None, r.tried) for r in results] == [
        ("spare2", ["slow", "spare2"]), ("spare1", ["broken", "spare1"])]
    assert results[0].result == "answer from spare2"
    assert sorted((f.peer_id, f.reason, f.replacement) for f in fallbacks) == [
        ("broken", "bad_signature", "spare1"), ("slow", "deadline", "spare2")]
    assert seen == fallbacks


async def test_a_seat_stays_empty_when_no_bidder_is_left(
        autojump_clock: trio.testing.MockClock) -> None:
    e = election(wanted=1)
    e.offer(Candidate("a", 0.5))

    async def work(seat: int, c: Candidate) -> str:
        raise WorkFailed("error")

    results, fallbacks = await fill_seats(e, e.elect(), work, 10.0)
    assert results[0].worker is None and results[0].result is None
    assert fallbacks == [Fallback(0, "a", "error", None)]


async def test_fill_seats_stops_seating_stallers_at_its_overall_bound(
        autojump_clock: trio.testing.MockClock) -> None:
    """Every bidder takes the seat and never answers: within 25 s of 10 s deadlines the
    seat sees two full deadlines and a third worker for the 5 s left (half a deadline,
    MIN_TURN), then stays empty; no fourth is seated."""
    e = election(wanted=1)
    for i in range(6):
        e.offer(Candidate(f"staller{i}", 0.9 - i / 10))

    async def work(seat: int, c: Candidate) -> str:
        await trio.sleep(3600)
        return "never"

    t0 = trio.current_time()
    results, fallbacks = await fill_seats(e, e.elect(), work, 10.0, within_s=25.0)
    assert trio.current_time() - t0 == pytest.approx(25.0)
    assert results[0].worker is None
    assert results[0].tried == ["staller0", "staller1", "staller2"]
    assert [(f.reason, f.replacement) for f in fallbacks] == [
        ("deadline", "staller1"), ("deadline", "staller2"), ("deadline", None)]


# ---- Byzantine: one confident liar among honest workers -----------------------------


def simulate_task(book: ReputationBook, bidders: dict[str, tuple[float, str, float]],
                  wanted: int, truth: str, now: float, measured: bool = False
                  ) -> tuple[list[str], str | None]:
    """One task over the real election, voting and reputation code. `bidders`: peer ->
    (claimed match, answer, confidence: claimed, or `measured` by the requester).
    Returns (elected, accepted answer)."""
    own = book.own()

    def rep(peer: str) -> float:
        return view(peer, book.owner, own, {})

    e = Election(f"task-{now}", book.owner, wanted, expected_bidders=len(bidders),
                 closes_at=1.0, deadline_s=30.0, reputation=rep)
    for peer, (match, _, _) in bidders.items():
        e.offer(Candidate(peer, match))
    seats = e.elect()
    ballots = []
    for c in seats:
        _, said, confidence = bidders[c.peer_id]
        ballots.append(Ballot(c.peer_id, answers.normalise_number(said), confidence,
                              c.match, rep(c.peer_id), confidence if measured else None))
    accepted = tally(ballots).answer
    for b in ballots:
        book.observe(b.peer_id, agreed=b.answer == accepted, punctual=True, now=now)
    return [c.peer_id for c in seats], accepted


@pytest.mark.parametrize("measured", [False, True], ids=["claimed", "measured"])
def test_one_confident_liar_never_outvotes_four_honest_and_loses_its_seat(
        measured: bool) -> None:
    # measured: the liar's chains are the ones the requester's model is surest of
    rng = random.Random(7)
    book = ReputationBook("requester")
    for task in range(10):
        truth = str(rng.randrange(10, 1000))
        honest_say = [truth, f"{truth}.00", f"${truth}", truth]  # same number, spelt apart
        bidders = {f"honest{i}": (rng.uniform(0.2, 0.6), honest_say[i], rng.uniform(0.1, 0.7))
                   for i in range(4)}
        bidders["liar"] = (1.0, str(int(truth) + 1), 1.0)  # claims a perfect match, too
        elected, accepted = simulate_task(book, bidders, 5, truth, float(task), measured)
        assert "liar" in elected  # five seats, five bidders
        assert accepted == truth, f"task {task}: the liar's answer won"
    scores = book.own()
    assert all(scores["liar"] < scores[f"honest{i}"] for i in range(4)), scores
    # With three seats and four honest bidders, the liar is no longer elected.
    for task in range(10, 15):
        truth = str(rng.randrange(10, 1000))
        bidders = {f"honest{i}": (rng.uniform(0.2, 0.6), truth, 0.5) for i in range(4)}
        bidders["liar"] = (1.0, "0", 1.0)
        elected, accepted = simulate_task(book, bidders, 3, truth, float(task), measured)
        assert "liar" not in elected
        assert accepted == truth


# ---- the task request's prompt set --------------------------------------------------------


def test_a_task_requests_prompt_set_stays_off_the_wire_at_zero_and_is_bounded() -> None:
    from protocols.codec import decode, encode, packb
    from protocols.errors import WireError
    from protocols.task import MAX_PROMPT_SETS, TaskRequest

    request = TaskRequest(task_id="t", question="1 + 1?", answer_format="number",
                          temperature=0.0, seed=1, max_tokens=16, deadline_s=5.0)
    assert "prompt" not in request.to_wire()  # what a 1.0.0 worker decodes strictly
    again = decode(encode(request), TaskRequest)
    assert again == request and again.prompt == 0
    third = dataclasses.replace(request, prompt=3)
    assert decode(encode(third), TaskRequest).prompt == 3
    for bad in (-1, MAX_PROMPT_SETS, 2**40):
        wire = {**request.to_wire(), "prompt": bad}
        with pytest.raises(WireError, match="prompt set"):
            decode(packb(wire), TaskRequest).check()  # as the worker checks it


def test_seats_decode_greedily_from_their_own_example_sets_then_sample() -> None:
    from peerd.agents.requester import TEMPERATURES, seat_sampling
    from peerd.agents.solver import EXAMPLES, PROMPT_SETS, messages, prompt_sets
    from protocols.task import MAX_PROMPT_SETS

    sets = prompt_sets("number")
    assert sets >= 3
    assert [seat_sampling(s, "number") for s in range(sets)] == [(0.0, s) for s in range(sets)]
    later = [seat_sampling(s, "number") for s in range(sets, sets + 9)]
    assert all(t > 0 for t, _ in later)  # no second greedy chain from the same set
    assert [t for t, _ in later[:7]] == list(TEMPERATURES[1:])
    assert [p for _, p in later] == [s % sets for s in range(sets, sets + 9)]
    # a worker that takes no prompt sets: set 0, greedy then sampled, as before them
    assert [seat_sampling(s, "number", takes_prompt=False) for s in range(4)] == [
        (0.0, 0), (0.7, 0), (0.9, 0), (0.5, 0)]
    # one set only (choice, text): seat 0 greedy, then the temperatures as they were
    assert [seat_sampling(s, "choice") for s in range(4)] == [
        (0.0, 0), (0.7, 0), (0.9, 0), (0.5, 0)]
    # every set is distinct and names real examples; the prompt shows them in order
    for answer_format, chosen in PROMPT_SETS.items():
        assert len(set(chosen)) == len(chosen) <= MAX_PROMPT_SETS  # what a worker accepts
        assert all(0 <= i < len(EXAMPLES[answer_format]) for s in chosen for i in s)
    shown = [m["content"] for m in messages("Q?", "number", 1) if m["role"] == "user"]
    assert shown == [EXAMPLES["number"][i][0] for i in PROMPT_SETS["number"][1]] + ["Q?"]
    assert messages("Q?", "number", sets) == messages("Q?", "number", 0)  # modulo the sets


def test_a_chains_confidence_is_its_likelihood_scaled_by_how_its_answer_came_out() -> None:
    from peerd.agents.solver import confidence_of, likelihood

    assert likelihood([]) == 0.0
    assert likelihood([math.log(0.5)] * 3) == pytest.approx(0.5)
    assert likelihood([math.log(0.9), math.log(0.4)]) == pytest.approx(0.6)  # geometric
    assert confidence_of("3 * 4 = 12.\nAnswer: 12", "number", 0.8) == ("12", 0.8)
    answer, guessed = confidence_of("so he has 12 apples", "number", 0.8)
    assert answer == "12" and guessed == pytest.approx(0.36)
    answer, unparsed = confidence_of("Answer: many", "number", 0.8)
    assert answer == "many" and unparsed == pytest.approx(0.28)
    assert confidence_of("no idea", "number", 0.8) == ("", 0.0)


def test_a_chain_splits_into_what_its_model_and_its_calculator_wrote() -> None:
    from peerd.agents.solver import authors

    cot = ("Tom has 9 + 3 = 12 apples.\nHe gives away 1, so 12 - 1 = 11 remain. "
           "That is 11 = 11.\nAnswer: 11")
    parts = authors(cot)
    assert "".join(text for text, _ in parts) == cot  # nothing lost, nothing added
    assert [text for text, calculated in parts if calculated] == [" 12", " 11"]
    # a stated result the calculator would not have written is the model's own
    wrong = "He has 9 + 3 = 13 apples.\nAnswer: 13"
    assert authors(wrong) == [(wrong, False)]
    assert authors("") == []
