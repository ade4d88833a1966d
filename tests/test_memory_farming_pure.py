"""Farmed replays, the pure rules: when other peers' replays are accepted (two agree,
or the requester reproduces one), who is counted, the utility of an accepted verdict,
who may replay (from the ledger), and what a result must say of itself."""

from __future__ import annotations

import dataclasses

import pytest

from peerd.memory.admission import Weights
from peerd.memory.farming import (
    Settlement,
    check_result,
    job_model,
    replayers,
    settle,
    verdict_of,
)
from protocols.codec import decode, encode, packb
from protocols.errors import PeerError, WireError
from protocols.ledger import LedgerEntry, Load, ModelServed
from protocols.memory_replay import (
    FEATURE_REPLAY,
    MAX_RESULT_BYTES,
    ArmReplay,
    ReplayJob,
    ReplayResult,
    ScecReplay,
    SignedReplayResult,
)

H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64
OUT_A, OUT_B, OUT_C = "a" * 64, "b" * 64, "c" * 64


def task(h: str, *, score_a: float = 0.0, score_b: float = 1.0, tokens_a: int = 20,
         tokens_b: int = 40, out_b: str = OUT_B) -> ScecReplay:
    return ScecReplay(scec=h, without=ArmReplay(OUT_A, score_a, tokens_a),
                      with_item=ArmReplay(out_b, score_b, tokens_b))


def result(peer: str, *tasks: ScecReplay, job: str = "job1", model: str = "m") -> ReplayResult:
    return ReplayResult(job_id=job, requester="req", replayer=peer, model=model, version="",
                        tasks=tasks)


HONEST = (task(H1), task(H2, score_b=0.0, out_b=OUT_C))
LIE = (task(H1), task(H2, score_b=1.0, out_b=OUT_C))  # task 2's B score flipped


# ---- the acceptance rule ---------------------------------------------------------------


def test_two_peers_that_agree_on_every_task_are_accepted() -> None:
    got = settle([H1, H2], {"p": result("p", *HONEST), "q": result("q", *HONEST)})
    assert got == Settlement(True, "agreed", HONEST, ("p", "q"), ())


def test_two_peers_that_disagree_on_one_arm_are_not_and_nobody_is_counted() -> None:
    got = settle([H1, H2], {"p": result("p", *HONEST), "q": result("q", *LIE)})
    assert (got.accepted, got.reason, got.offenders) == (False, "disagreed", ())


@pytest.mark.parametrize("change", [
    {"out_b": OUT_A}, {"score_b": 0.5}, {"tokens_b": 41}, {"tokens_a": 19}, {"score_a": 1.0}])
def test_any_difference_of_output_score_or_tokens_is_a_disagreement(change: dict[str, object]
                                                                     ) -> None:
    other = (task(H1, **change), HONEST[1])  # type: ignore[arg-type]
    assert not settle([H1, H2], {"p": result("p", *HONEST),
                                 "q": result("q", *other)}).accepted


def test_one_result_alone_is_not_enough() -> None:
    got = settle([H1, H2], {"p": result("p", *HONEST)})
    assert (got.accepted, got.reason) == (False, "too_few")
    assert settle([H1, H2], {}).reason == "too_few"


def test_a_result_naming_other_tasks_is_off_the_job_and_counted() -> None:
    swapped = (task(H3), HONEST[1])
    got = settle([H1, H2], {"p": result("p", *HONEST), "q": result("q", *swapped)})
    assert (got.accepted, got.reason, got.offenders) == (False, "too_few", ("q",))
    reordered = (HONEST[1], HONEST[0])
    got = settle([H1, H2], {"p": result("p", *HONEST), "q": result("q", *reordered),
                            "r": result("r", *HONEST)})
    assert (got.accepted, got.by, got.offenders) == (True, ("p", "r"), ("q",))


def test_a_third_peer_breaks_a_tie_and_the_odd_one_out_is_counted() -> None:
    got = settle([H1, H2], {"p": result("p", *HONEST), "liar": result("liar", *LIE),
                            "q": result("q", *HONEST)})
    assert (got.accepted, got.tasks, got.by, got.offenders) == (
        True, HONEST, ("p", "q"), ("liar",))


def test_two_pairs_that_disagree_are_a_tie_nobody_wins() -> None:
    got = settle([H1, H2], {"p": result("p", *HONEST), "q": result("q", *HONEST),
                            "r": result("r", *LIE), "s": result("s", *LIE)})
    assert (got.accepted, got.reason, got.offenders) == (False, "disagreed", ())


def test_the_requester_reproducing_one_task_accepts_a_single_result() -> None:
    got = settle([H1, H2], {"p": result("p", *HONEST)}, {H2: HONEST[1]})
    assert got == Settlement(True, "reproduced", HONEST, ("p",), ())


def test_a_result_the_requester_contradicts_is_counted_and_not_accepted() -> None:
    got = settle([H1, H2], {"liar": result("liar", *LIE)}, {H2: HONEST[1]})
    assert (got.accepted, got.reason, got.offenders) == (False, "disagreed", ("liar",))
    # with an honest peer beside it: the honest one is accepted, the liar counted
    got = settle([H1, H2], {"liar": result("liar", *LIE), "p": result("p", *HONEST)},
                 {H2: HONEST[1]})
    assert (got.accepted, got.by, got.offenders) == (True, ("p",), ("liar",))


def test_a_reproduction_of_no_task_of_the_job_proves_nothing() -> None:
    got = settle([H1, H2], {"p": result("p", *HONEST)}, {H3: task(H3)})
    assert (got.accepted, got.reason) == (False, "too_few")


# ---- the utility of an accepted verdict -------------------------------------------------


def test_the_utility_is_the_local_judges_rule_on_the_agreed_scores_and_tokens() -> None:
    v = verdict_of(HONEST, Weights(lambda_latency=5.0, lambda_tokens=1e-3))
    # s: (1 + 0)/2 - 0 = 0.5; p: 40 - 20 = 20; latency not charged
    assert v.utility.d_score == pytest.approx(0.5)
    assert v.utility.d_tokens == pytest.approx(20)
    assert v.utility.d_latency == 0.0
    assert v.utility.total == pytest.approx(0.5 - 0.02)
    assert v.admitted
    assert not verdict_of(HONEST, min_gain=0.5).admitted
    assert [t.task for t in v.tasks] == [H1, H2]


# ---- who may replay ----------------------------------------------------------------------


def entry(peer: str, *, features: tuple[str, ...] = (FEATURE_REPLAY,), model: str = "m",
          layers: tuple[int, int] = (0, 4), load: Load | None = None) -> LedgerEntry:
    return LedgerEntry(peer_id=peer, seq=1, timestamp=0.0, ttl_s=30.0, features=features,
                       models=(ModelServed(model, layers[0], layers[1], "float32",
                                           num_layers=4),), load=load or Load())


def test_replayers_serve_the_model_and_offer_replays() -> None:
    entries = [entry("me"), entry("whole", load=Load(sessions=2, queue=1)),
               entry("shard", layers=(0, 2)), entry("other", model="x"),
               entry("old", features=("memory",))]
    got = {c.peer_id: c for c in replayers(entries, "m", "me", {"whole": 40.0})}
    assert set(got) == {"whole", "shard"}
    assert (got["whole"].match, got["whole"].load) == (1.0, 3)
    assert got["whole"].expected_latency_s == pytest.approx(0.04)
    assert got["shard"].match == 0.5


def test_the_model_asked_for_is_the_one_most_tasks_ran_on() -> None:
    assert job_model(["a", "b", "b"]) == "b"
    assert job_model(["a", "b"]) == "a"


# ---- what a result must say of itself ------------------------------------------------------


def test_a_result_for_another_job_model_or_signer_is_refused() -> None:
    good = result("p", *HONEST)
    ask = {"job_id": "job1", "model": "m", "hashes": [H1, H2], "replayer": "p",
           "requester": "req"}
    check_result(good, **ask)  # type: ignore[arg-type]
    for bad, reason in [(result("q", *HONEST), "impersonation"),
                        (result("p", *HONEST, job="job2"), "wrong_job"),
                        (result("p", *HONEST, model="x"), "wrong_model"),
                        (result("p", HONEST[0]), "wrong_job")]:
        with pytest.raises(PeerError) as caught:
            check_result(bad, **ask)  # type: ignore[arg-type]
        assert caught.value.reason == reason


# ---- the wire messages ---------------------------------------------------------------------


def job(**changes: object) -> ReplayJob:
    base = ReplayJob(job_id="job-1", model="m", candidate="Be brief.", scecs=(b"a", b"b"),
                     given=((), ("an item",)))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_job_round_trips_and_decodes_strictly() -> None:
    j = job()
    j.check()
    assert decode(encode(j), ReplayJob) == j
    wire = {**j.to_wire(), "extra": 1}
    with pytest.raises(WireError):
        decode(packb(wire), ReplayJob)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"job_id": ""}, "malformed"), ({"job_id": "a b"}, "malformed"),
    ({"model": ""}, "malformed"), ({"candidate": " "}, "malformed"),
    ({"candidate": "x" * 4001}, "oversized"),
    ({"scecs": (), "given": ()}, "malformed"),
    ({"scecs": tuple(bytes([i]) for i in range(5)), "given": ((),) * 5}, "oversized"),
    ({"scecs": (b"a", b"a")}, "malformed"),
    ({"scecs": (b"a" * (512 * 1024 + 1), b"b")}, "oversized"),
    ({"given": ((),)}, "malformed"),
    ({"given": ((), ("x",) * 17)}, "oversized"),
    ({"given": ((), ("",))}, "malformed"),
])
def test_a_bad_job_is_refused_with_its_reason(changes: dict[str, object], reason: str
                                              ) -> None:
    with pytest.raises(WireError) as caught:
        job(**changes).check()
    assert caught.value.reason == reason


@pytest.mark.parametrize("bad", [
    {"tasks": ()}, {"tasks": HONEST * 3}, {"replayer": ""}, {"model": ""},
    {"job_id": "a b"}, {"version": "v" * 129},
    {"tasks": (task(H1, score_b=1.5),)}, {"tasks": (task(H1, out_b="xyz"),)},
    {"tasks": (task(H1, tokens_b=-1),)}, {"tasks": (dataclasses.replace(task(H1), scec="z"),)},
])
def test_a_result_out_of_bounds_is_malformed(bad: dict[str, object]) -> None:
    r = dataclasses.replace(result("p", *HONEST), **bad)  # type: ignore[arg-type]
    with pytest.raises(WireError):
        r.check()
    with pytest.raises(WireError):  # the requester's check of a result runs it first
        check_result(r, job_id="job1", model="m", hashes=[H1, H2], replayer="p",
                     requester="req")


def test_a_signed_result_over_its_cap_is_oversized() -> None:
    with pytest.raises(WireError) as caught:
        SignedReplayResult(body=b"x" * (MAX_RESULT_BYTES + 1), sig=b"").check()
    assert caught.value.reason == "oversized"
