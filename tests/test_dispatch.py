"""The dispatcher's rules with a scripted transport and trio's fake clock: calls run in
parallel within each peer's capacity (counted), a failure retries on another peer after
a bounded backoff, a verdict on the call is not retried, a spent budget is an
observation, a silent peer is routed around, and the results keep the calls' order;
a peer that leaves mid-call ends its attempts at once; a peer that failed as
unreachable or silent is suspected across batches (ranked last, not excluded)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from peerd.plans.caller import TIMEOUT, UNREACHABLE, Outcome, ToolFailure, ToolResult
from peerd.plans.choice import Offer, rank
from peerd.plans.dispatch import Call, Departures, Dispatched, Limiter, dispatch
from peerd.plans.retry import RetryPolicy, backoff_s, candidates, retried
from peerd.plans.suspects import SUSPECT_S, Suspects
from protocols import tool as wire

H = "0" * 64


def offers_of(*peers: tuple[str, int]) -> list[Offer]:
    return [Offer(p, H, cap) for p, cap in peers]


class Script:
    """call_one: each peer takes `slot_s` per call and answers per `answers` (peer ->
    codes, consumed in turn; "ok" once they run out); counts calls in flight by peer."""

    def __init__(self, slot_s: float = 1.0, answers: dict[str, list[str]] | None = None,
                 hangs: Sequence[str] = ()) -> None:
        self.slot_s = slot_s
        self.answers = answers or {}
        self.hangs = set(hangs)
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.calls: list[tuple[str, str]] = []  # (call id, peer)
        self.at: list[float] = []

    async def __call__(self, offer: Offer, call: Call, deadline_s: float) -> Outcome:
        self.calls.append((call.call_id, offer.peer))
        self.at.append(trio.current_time())
        self.in_flight[offer.peer] += 1
        self.peak[offer.peer] = max(self.peak[offer.peer], self.in_flight[offer.peer])
        try:
            if offer.peer in self.hangs:
                await trio.sleep_forever()
            await trio.sleep(self.slot_s)
            queue = self.answers.get(offer.peer, [])
            code = queue.pop(0) if queue else wire.OK
        finally:
            self.in_flight[offer.peer] -= 1
        if code == wire.OK:
            return ToolResult(offer.peer, call.tool, call.call_id, {"id": call.call_id}, 0.0)
        by = "caller" if code in (UNREACHABLE, TIMEOUT) else "callee"
        return ToolFailure(offer.peer, call.tool, call.call_id, code, f"said {code}", by)


def calls(n: int, tool: str = "t") -> list[Call]:
    return [Call(tool, {"i": i}, f"c{i}") for i in range(n)]


async def test_calls_run_in_parallel_within_capacity(
        autojump_clock: trio.testing.MockClock) -> None:
    script = Script(slot_s=1.0)
    slots = Limiter()
    t0 = trio.current_time()
    got = await dispatch(calls(12), lambda t: offers_of(("a", 2), ("b", 2)), script,
                         slots=slots)
    assert trio.current_time() - t0 == pytest.approx(3.0)  # 12 calls, 4 at a time
    assert [d.call.call_id for d in got] == [f"c{i}" for i in range(12)]
    assert all(d.ok and len(d.attempts) == 1 for d in got)
    assert script.peak == {"a": 2, "b": 2}
    assert slots.peak == {("a", "t"): 2, ("b", "t"): 2} and not slots.load


async def test_capacity_is_never_exceeded_under_a_burst_of_batches(
        autojump_clock: trio.testing.MockClock) -> None:
    """Three batches at once share the limiter; busy answers and retries on top."""
    script = Script(slot_s=0.5, answers={"a": [wire.BUSY] * 5, "c": [UNREACHABLE] * 3})
    slots = Limiter()
    offers = offers_of(("a", 3), ("b", 1), ("c", 2))
    got: list[bool] = []

    async def batch(tool: str) -> None:
        for d in await dispatch(calls(20, tool), lambda t: offers, script, slots=slots,
                                policy=RetryPolicy(max_attempts=5), rng=random.Random(1)):
            got.append(d.ok)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(batch, "t")
    assert len(got) == 60 and all(got)
    assert slots.peak[("a", "t")] <= 3 and slots.peak[("b", "t")] <= 1
    assert slots.peak[("c", "t")] <= 2
    assert script.peak["a"] <= 3 and script.peak["b"] <= 1 and script.peak["c"] <= 2


async def test_a_failure_retries_on_another_peer_after_a_bounded_backoff(
        autojump_clock: trio.testing.MockClock) -> None:
    script = Script(slot_s=1.0, answers={"a": [wire.BUSY]})
    policy = RetryPolicy(max_attempts=3, base_s=0.4, cap_s=2.0)
    (got,) = await dispatch(calls(1), lambda t: offers_of(("a", 1), ("b", 1)), script,
                            slots=Limiter(), policy=policy, rng=random.Random(7))
    assert got.ok and got.peer == "b"
    assert [(a.peer, a.code) for a in got.attempts] == [("a", wire.BUSY), ("b", wire.OK)]
    waited = script.at[1] - script.at[0] - 1.0
    assert 0.0 <= waited <= 0.4  # the first backoff: uniform(0, base)
    # the bound doubles per attempt up to the cap; full jitter draws below it
    rng = random.Random(3)
    for n, bound in ((2, 0.4), (3, 0.8), (4, 1.6), (5, 2.0), (9, 2.0)):
        draws = [backoff_s(policy, n, rng) for _ in range(200)]
        assert min(draws) >= 0.0 and max(draws) <= bound and max(draws) > bound / 2
    assert backoff_s(policy, 1, rng) == 0.0


@pytest.mark.parametrize("code", [wire.INVALID_ARGUMENTS, wire.UNKNOWN_TOOL,
                                  wire.TOOL_ERROR, wire.INVALID_RESULT])
async def test_a_verdict_on_the_call_is_not_retried(
        code: str, autojump_clock: trio.testing.MockClock) -> None:
    script = Script(answers={"a": [code]})
    (got,) = await dispatch(calls(1), lambda t: offers_of(("a", 1), ("b", 1)), script,
                            slots=Limiter())
    assert not got.ok and got.code == code and len(got.attempts) == 1
    assert not retried(code) and got.to_json()["error"]["by"] == "callee"


async def test_a_spent_budget_is_an_observation(
        autojump_clock: trio.testing.MockClock) -> None:
    script = Script(answers={"a": [wire.DEADLINE] * 9, "b": [wire.BUSY] * 9})
    got = await dispatch(calls(2), lambda t: offers_of(("a", 1), ("b", 1)), script,
                         slots=Limiter(), policy=RetryPolicy(max_attempts=4))
    for d in got:
        assert not d.ok and len(d.attempts) == 4
        error = d.to_json()["error"]
        assert error["peers"] == ["a", "b"] and "failed 4 times" in error["message"]
    (none,) = await dispatch(calls(1, "nobody"), lambda t: [], script, slots=Limiter())
    assert none.code == "no_offer" and none.attempts == () and not none.ok


async def test_a_silent_peer_is_routed_around(
        autojump_clock: trio.testing.MockClock) -> None:
    """A peer that never answers costs one attempt's deadline, once: the batch passes it
    over afterwards."""
    script = Script(slot_s=1.0, hangs=["dead"])
    offers = [Offer("dead", H, 4, rtt_ms=0.1), Offer("b", H, 2, rtt_ms=5.0)]
    got = await dispatch(calls(8), lambda t: offers, script, slots=Limiter(),
                         policy=RetryPolicy(attempt_deadline_s=2.0))
    assert all(d.ok and d.peer == "b" for d in got)
    assert sum(1 for _, p in script.calls if p == "dead") <= 4  # only the first wave
    assert {a.code for d in got for a in d.attempts} <= {TIMEOUT, wire.OK}


def test_peers_offering_the_schema_the_call_was_written_for_come_first() -> None:
    new, old = "1" * 64, H
    offers = [Offer("a", old, 1), Offer("b", new, 1), Offer("c", old, 1)]
    assert [o.peer for o in candidates(offers, set(), set(), new)] == ["b"]
    assert [o.peer for o in candidates(offers, set(), set())] == ["a", "b", "c"]
    # tried (or suspect), the peers of the other version are next, before a retry of b
    assert [o.peer for o in candidates(offers, {"b"}, set(), new)] == ["a", "c"]
    assert [o.peer for o in candidates(offers, {"a", "b", "c"}, set(), new)] == ["b"]
    assert [o.peer for o in candidates(offers, set(), {"b"}, new)] == ["a", "c"]
    assert candidates([], set(), set(), new) == []


async def test_a_call_goes_to_a_peer_of_its_schema_though_another_ranks_higher(
        autojump_clock: trio.testing.MockClock) -> None:
    script = Script(slot_s=1.0)
    offers = [Offer("near", H, 4, rtt_ms=1.0, reputation=0.9),
              Offer("far", "1" * 64, 4, rtt_ms=80.0)]
    got = await dispatch([Call("t", {}, "c0", "1" * 64), Call("t", {}, "c1")],
                         lambda t: offers, script, slots=Limiter())
    assert [d.peer for d in got] == ["far", "near"]


def test_the_next_peer_is_another_and_reputation_ranks() -> None:
    offers = offers_of(("a", 1), ("b", 1), ("c", 1))
    assert [o.peer for o in candidates(offers, {"a"}, {"b"})] == ["c"]
    assert [o.peer for o in candidates(offers, {"a", "c"}, {"b"})] == ["a", "c"]
    assert [o.peer for o in candidates(offers, set(), {"a", "b", "c"})] == ["a", "b", "c"]
    ranked = rank([Offer("liar", H, 4, rtt_ms=0.1, reputation=0.1),
                   Offer("far", H, 4, rtt_ms=50.0), Offer("twin", H, 4, rtt_ms=50.0,
                                                          reputation=0.9)])
    assert [o.peer for o in ranked] == ["twin", "far", "liar"]
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


async def test_a_peer_that_leaves_mid_call_ends_its_attempts_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    """The disconnect notification (Departures.left) cancels the attempts in flight at
    the peer: each ends `unreachable` then, not at its deadline, and moves elsewhere."""
    script = Script(slot_s=1.0, hangs=["dead"])
    offers = [Offer("dead", H, 2, rtt_ms=0.1), Offer("b", H, 2, rtt_ms=5.0)]
    departures = Departures()
    policy = RetryPolicy(attempt_deadline_s=30.0)
    got: list[Dispatched] = []
    t0 = trio.current_time()

    async def batch() -> None:
        got.extend(await dispatch(calls(4), lambda t: offers, script, slots=Limiter(),
                                  policy=policy, departures=departures))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batch)
        await trio.sleep(0.5)
        assert departures.watched("dead") == 2 and departures.watched("b") == 2
        departures.left("dead")
    assert trio.current_time() - t0 < policy.attempt_deadline_s  # no deadline waited out
    moved = [d for d in got if len(d.attempts) > 1]
    assert len(moved) == 2 and all(d.ok and d.peer == "b" for d in got)
    for d in moved:
        first = d.attempts[0]
        assert (first.peer, first.code, first.by) == ("dead", UNREACHABLE, "caller")
        assert first.elapsed_s == pytest.approx(0.5)
    assert departures.watched("dead") == 0 and departures.watched("b") == 0
    departures.left("nobody")  # a peer with nothing in flight: nothing to do


def test_a_suspect_is_remembered_for_a_while_then_forgiven() -> None:
    """The pure rule on a fake clock: unreachable or silent marks a peer for hold_s;
    a ledger entry it signed after it failed, or a connection made since, clears it;
    nothing else marks. (Clock times 0-200; unix times 1000 on.)"""
    s = Suspects(hold_s=30.0)
    assert SUSPECT_S == 30.0 and not s.suspected("a", 990.0, 0.0)
    for code in (wire.BUSY, wire.DEADLINE, wire.TOOL_ERROR, wire.OK):
        assert not s.failed("a", code, 0.0, 1000.0) and not s.suspected("a", 990.0, 0.0)
    assert s.failed("a", UNREACHABLE, 100.0, 1100.0)
    assert s.suspected("a", 1095.0, 100.0) and s.suspected("a", 1095.0, 129.9)
    assert not s.suspected("a", 1095.0, 130.0)  # the hold is over
    assert not s.suspected("a", 1095.0, 100.0)  # and forgotten
    assert s.failed("b", TIMEOUT, 0.0, 1000.0)
    assert s.suspected("b", 995.0, 10.0)  # the entry it had when it failed
    # an entry it signed before it died, heard only now (a newer seq than the one we
    # held when it failed): no news of it
    assert s.suspected("b", 999.9, 10.0)
    assert not s.suspected("b", 1009.0, 10.0)  # one signed since: it is back
    assert s.failed("c", TIMEOUT, 5.0, 1005.0)
    s.clear("c", 4.0)  # a connection from before it failed (its hook ran late)
    assert s.suspected("c", 1000.0, 6.0)
    s.clear("c", 6.0)  # it connected again
    assert not s.suspected("c", 1000.0, 7.0)
    off = Suspects(hold_s=0.0)
    assert not off.failed("a", UNREACHABLE, 1.0, 1000.0) and not off.suspected("a", 0, 1.0)
    with pytest.raises(ValueError):
        Suspects(hold_s=-1.0)


async def test_a_suspect_ranks_last_but_is_not_excluded(
        autojump_clock: trio.testing.MockClock) -> None:
    ranked = rank([Offer("sus", H, 4, rtt_ms=0.1, suspect=True),
                   Offer("far", H, 4, rtt_ms=90.0, reputation=0.1),
                   Offer("full", H, 1, load=1, rtt_ms=1.0)])
    assert [o.peer for o in ranked] == ["far", "sus", "full"]
    # the nearest peer is suspected: calls go to the other first, and to it only when
    # the other is full; a suspect that alone offers the tool still gets the call
    script = Script(slot_s=1.0)
    offers = [Offer("sus", H, 2, rtt_ms=0.1, suspect=True), Offer("b", H, 2, rtt_ms=5.0)]
    got = await dispatch(calls(3), lambda t: offers, script, slots=Limiter())
    assert [p for _, p in script.calls] == ["b", "b", "sus"] and all(d.ok for d in got)
    (alone,) = await dispatch(calls(1), lambda t: offers[:1], script, slots=Limiter())
    assert alone.ok and alone.peer == "sus"
