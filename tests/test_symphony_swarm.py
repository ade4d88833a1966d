"""Symphony over real in-process hosts: beacons on gossip, signed bids and answers on
streams, with fake solvers in place of models. One confident liar among honest
workers: outvoted every time, its reputation sinks, and it stops being elected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from peerd.agents.record import TaskSpec
from peerd.agents.reputation import ReputationBook
from peerd.agents.requester import FILL_ROUNDS, NoWorkers
from peerd.agents.symphony import Symphony
from peerd.datadir import REPUTATION_FILE
from protocols.task import TaskRequest
from tests.harness import book, events, gossip, swarm, wait_for
from tests.symphony import (
    FakeSolver,
    FixedMatcher,
    liar,
    ready_to_elect,
    symphonies,
    true_sum,
)

SKILL = "arithmetic word problems"


async def test_a_task_is_elected_solved_and_voted(tmp_path: Path) -> None:
    async with swarm(4, tmp_path, connect="star") as nodes:
        requester, *workers = nodes
        solvers = [None, FakeSolver(), FakeSolver(), FakeSolver(answer=liar)]
        async with symphonies(nodes, solvers, skills=[[]] + [[SKILL]] * 3) as (service, *_):
            await ready_to_elect(requester, workers)
            spec = TaskSpec("What is 20 + 22?", workers=3, requirement="arithmetic",
                            answer_format="number", deadline_s=10.0, bid_window_s=5.0)
            record = await service.run_task(spec)
            body = record.to_json()
            assert set(body) == {"id", "status", "answer", "votes", "elected", "fallbacks",
                                 "timings"}
            assert body["answer"] == "42"
            assert sorted(body["elected"]) == sorted(w.peer_id for w in workers)
            assert body["fallbacks"] == []
            assert {v["answer"] for v in body["votes"]} == {"42", "43"}
            assert all(set(v) == {"peer_id", "answer", "confidence", "measured", "weight",
                                  "cot"} for v in body["votes"])
            assert set(body["timings"]) == {"beacon_ms", "solve_ms", "measure_ms", "total_ms"}
            # Elected as soon as all three expected bids were in, not at the window's end.
            assert body["timings"]["beacon_ms"] < 5000
            assert service.requester.records[record.id] is record
            for kind in ("task.beacon", "task.bid", "task.elected", "task.answer", "task.done"):
                assert events(requester, kind, task_id=record.id), kind
            assert events(workers[0], "task.solved", task_id=record.id)
            # each seat decoded greedily from its own set of worked examples
            seen = [(r.temperature, r.prompt) for s in solvers if s for r in s.requests]
            assert sorted(seen) == [(0.0, 0), (0.0, 1), (0.0, 2)]


async def test_a_worker_that_predates_prompt_sets_is_sent_none(tmp_path: Path) -> None:
    """A worker whose ledger entry does not list FEATURE_PROMPT_SETS (older software,
    which refuses a request carrying `prompt`) gets set 0 and the old sampling; the
    others still get their own sets."""
    from peerd.agents.requester import TEMPERATURES

    async with swarm(4, tmp_path, connect="star") as nodes:
        requester, *workers = nodes
        old = workers[1]
        solvers = [None, FakeSolver(), FakeSolver(), FakeSolver()]
        async with symphonies(nodes, solvers, skills=[[]] + [[SKILL]] * 3) as (service, *_):
            old_service = old.service(Symphony)
            old_service.features = ()
            gossip(old).refresh()
            await ready_to_elect(requester, workers)
            await wait_for(lambda: book(requester).get(old.peer_id).features == (),  # type: ignore[union-attr]
                           15, "the old worker's entry without features")
            spec = TaskSpec("What is 20 + 22?", workers=3, requirement="arithmetic",
                            answer_format="number", deadline_s=10.0, bid_window_s=5.0)
            record = await service.run_task(spec)
            assert record.answer == "42"
            assigned = [e.data for e in events(requester, "task.assigned", task_id=record.id)]
            assert len(assigned) == 3
            for e in assigned:
                if e["peer_id"] == old.peer_id:
                    assert (e["temperature"], e["prompt"]) == (TEMPERATURES[e["seat"]], 0)
                else:
                    assert (e["temperature"], e["prompt"]) == (0.0, e["seat"])
            assert [r.prompt for r in solvers[2].requests] == [0]  # type: ignore[union-attr]


async def test_a_late_worker_is_replaced_by_the_next_bidder(tmp_path: Path) -> None:
    async with swarm(3, tmp_path, connect="star") as nodes:
        requester, slow, spare = nodes
        solvers = [None, FakeSolver(delay_s=3600.0), FakeSolver()]
        async with symphonies(nodes, solvers, skills=[[], [SKILL], ["poetry"]]) \
                as (service, *_):
            await ready_to_elect(requester, [slow, spare])
            spec = TaskSpec("What is 1 + 2?", workers=1, requirement=SKILL,
                            answer_format="number", deadline_s=0.5, bid_window_s=5.0)
            record = await service.run_task(spec)
            assert record.elected == [slow.peer_id]  # the better match
            assert [(f.peer_id, f.reason, f.replacement) for f in record.fallbacks] == [
                (slow.peer_id, "deadline", spare.peer_id)]
            assert record.answer == "3"
            assert [v.peer_id for v in record.votes] == [spare.peer_id]
            # The late worker loses reputation; the one that answered gains. The book is
            # kept in the data dir, so a restarted requester remembers.
            scores = service.requester.book.own()
            assert scores[slow.peer_id] < 0.5 < scores[spare.peer_id]
            saved = json.loads((requester.config.data_dir / REPUTATION_FILE).read_text())
            assert ReputationBook.from_json(requester.peer_id, saved).own() == \
                service.requester.book.own()


async def test_workers_that_take_a_seat_and_never_answer_hold_a_task_a_bounded_time(
        tmp_path: Path) -> None:
    """Three bidders take the seat and never answer: the task gives up after
    FILL_ROUNDS deadlines (two of them tried, not all three and the spare one after
    another), and the next task ranks those two last."""
    async with swarm(5, tmp_path, connect="star", heartbeat_s=3.0) as nodes:
        requester, *stalling, spare = nodes
        solvers = [None, *[FakeSolver(delay_s=3600.0) for _ in stalling], FakeSolver()]
        async with symphonies(nodes, solvers,
                              skills=[[], *[[SKILL] for _ in stalling], ["poetry"]]) \
                as (service, *_):
            await ready_to_elect(requester, [*stalling, spare])
            spec = TaskSpec("What is 1 + 2?", workers=1, requirement=SKILL,
                            answer_format="number", deadline_s=0.5, bid_window_s=5.0)
            with pytest.raises(NoWorkers):
                await service.run_task(spec)
            (first,) = service.requester.records.values()
            tried = [f.peer_id for f in first.fallbacks]
            assert len(tried) == FILL_ROUNDS < len(stalling)
            assert {f.reason for f in first.fallbacks} == {"deadline"}
            assert set(tried) < {n.peer_id for n in stalling}
            assert first.fallbacks[-1].replacement is None and first.votes == []
            # the one not tried is seated first now, then the spare, not a no-show
            (fresh,) = {n.peer_id for n in stalling} - set(tried)
            record = await service.run_task(spec)
            assert record.elected == [fresh]
            assert [v.peer_id for v in record.votes] == [spare.peer_id]
            assert record.answer == "3"


async def test_the_requester_works_on_its_own_beacon_only_when_nobody_else_can(
        tmp_path: Path) -> None:
    async with swarm(2, tmp_path, connect="star") as nodes:
        requester, other = nodes
        mine, theirs = FakeSolver(), FakeSolver(able=False)
        async with symphonies(nodes, [mine, theirs], skills=[[SKILL], ["poetry"]]) \
                as (service, _):
            spec = TaskSpec("What is 2 + 2?", workers=1, answer_format="number",
                            deadline_s=5.0, bid_window_s=0.3)
            record = await service.run_task(spec)
            assert record.elected == [requester.peer_id]
            assert record.answer == "4" and mine.solved == 1
            theirs.able = True
            await ready_to_elect(requester, [other])
            record = await service.run_task(spec)
            assert record.elected == [other.peer_id]
            assert mine.solved == 1 and theirs.solved == 1


async def test_nobody_bids(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as nodes, symphonies(nodes, [None]) as (service,):
        spec = TaskSpec("What is 2 + 2?", bid_window_s=0.2)
        with trio.fail_after(5):
            try:
                await service.run_task(spec)
            except NoWorkers as exc:
                assert "no peer bid" in str(exc)
            else:
                raise AssertionError("a task without bidders succeeded")
        (record,) = service.requester.records.values()
        assert record.status == "failed" and record.to_json()["answer"] is None


def liars_chains_surest(request: TaskRequest, cot: str) -> float:
    """A requester's model that is far surer of the liar's chains than of honest ones."""
    return 0.3 if f"gives {true_sum(request.question)}." in cot else 0.95


@pytest.mark.parametrize("measures", [False, True], ids=["claimed", "measured"])
async def test_byzantine_liar_is_outvoted_then_no_longer_elected(tmp_path: Path,
                                                                 measures: bool) -> None:
    async with swarm(6, tmp_path, connect="star", heartbeat_s=3.0) as nodes:
        requester, *workers = nodes
        honest = [FakeSolver(confidence=c) for c in (0.2, 0.4, 0.5, 0.3)]
        lying = FakeSolver(answer=liar, confidence=1.0)
        # measured: the requester weighs chains by its own model's measure, not claims
        own = FakeSolver(measures=liars_chains_surest) if measures else None
        solvers = [own, *honest, lying]
        # The liar also claims a perfect skill match; the honest match lexically.
        matchers = [None, None, None, None, None, FixedMatcher(1.0)]
        liar_id = workers[-1].peer_id
        async with symphonies(nodes, solvers, matchers, [[]] + [[SKILL]] * 5) \
                as (service, *_):
            await ready_to_elect(requester, workers)
            for i in range(10):
                question = f"What is {100 + 7 * i} + {23 * i}?"
                truth = str(100 + 7 * i + 23 * i)
                record = await service.run_task(TaskSpec(
                    question, workers=5, requirement="arithmetic", answer_format="number",
                    deadline_s=10.0, bid_window_s=5.0))
                assert liar_id in record.elected
                assert record.answer == truth, f"task {i}: {record.to_json()}"
                shown = {v["peer_id"]: v["measured"] for v in record.to_json()["votes"]}
                assert shown[liar_id] == (0.95 if measures else None)
            scores = service.requester.book.own()
            assert all(scores[liar_id] < scores[w.peer_id] for w in workers[:-1]), scores
            record = await service.run_task(TaskSpec(
                "What is 5 + 6?", workers=3, requirement="arithmetic", answer_format="number",
                deadline_s=10.0, bid_window_s=5.0))
            assert liar_id not in record.elected
            assert record.answer == "11"
            # The requester publishes what it saw; others read it from its ledger entry.
            other = workers[0]

            def published() -> dict[str, float]:
                entry = book(other).get(requester.peer_id)
                return dict(entry.reputation) if entry else {}

            await wait_for(lambda: liar_id in published(), 10,
                           "the requester's reputation report in another peer's ledger")
            assert published()[liar_id] < min(published()[w.peer_id] for w in workers[:-1])
