"""A Symphony task with a reference answer, over real in-process hosts: the settled
answer is scored, the run is kept by the requester's memory as an SCEC (with the notes
it was given, by id), the notes' weights move against the domain's no-memory baseline
(and a run given none moves the baseline), and the reference never reaches a worker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from peerd.api.app import create_app
from peerd.memory.controller import ControllerSettings, admission_stats
from peerd.memory.item import Record, sign_item
from peerd.memory.scec import decode_scec
from peerd.memory.service import Memory
from protocols.codec import encode
from tests.harness import swarm
from tests.symphony import FakeSolver, ready_to_elect, symphonies

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# a reference no worker could guess: its words must appear in nothing a worker is sent
SECRET = "zebra-quartz"


async def test_a_scored_task_is_kept_as_an_scec_and_moves_its_notes(tmp_path: Path
                                                                     ) -> None:
    solver = FakeSolver()
    async with swarm(2, tmp_path, connect="star") as (a, b), \
            symphonies([a, b], [None, solver], skills=[[], ["arithmetic"]]) as (service, _):
        memory = Memory(a, None, tmp_path / "mem", embedder="hashing",
                        settings=ControllerSettings(min_similarity=1e-6))
        await a.start(memory)
        service.recall = service.scored = memory
        note = "What is asked: add the two numbers, give the sum alone."
        item, signed = sign_item(a.key_pair.private_key, a.peer_id, note, "arithmetic",
                                 "rule")
        store = memory.live_store()
        await store.put(Record(item, signed, admission_stats(0.5, time.time(),
                                                             memory.settings)),
                        (await store.embed([note]))[0])
        published: list[bytes] = []  # everything the requester says on gossip
        publish = a.pubsub.publish

        async def spying(topic: str, data: bytes) -> Any:
            published.append(data)
            return await publish(topic, data)

        a.pubsub.publish = spying  # type: ignore[method-assign]
        await ready_to_elect(a, [b])
        task = {"workers": 1, "answer_format": "number", "deadline_s": 10,
                "bid_window_s": 3, "domain": "arithmetic"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(a, TOKEN)),
                                     base_url="http://peerd", headers=AUTH,
                                     timeout=30.0) as client:
            # no memory given: scored 0 (the reference is not the sum), the baseline moves
            r = await client.post("/v1/tasks", json={**task, "question": "What is 40 + 2?",
                                                     "reference": f"{SECRET} 43"})
            assert r.status_code == 200, r.text
            plain = r.json()
            assert plain["answer"] == "42" and plain["score"] == 0.0
            assert plain["reference"] == f"{SECRET} 43" and plain["scorer"] == "number"
            assert memory.baseline.mean("arithmetic") == 0.0
            assert memory.baseline.count("arithmetic") == 1
            kept = await store.get_scec(plain["scec"])
            assert kept is not None
            scec = decode_scec(kept.body)
            assert (scec.prompt, scec.domain, scec.answer, scec.output, scec.score) == (
                "What is 40 + 2?", "arithmetic", f"{SECRET} 43", "42", 0.0)
            assert scec.memory == () and scec.memory_ids == ()
            assert len(plain["votes"]) == 1
            (asked,) = solver.requests
            assert (scec.temperature, scec.seed, scec.max_tokens) == (
                asked.temperature, asked.seed, asked.max_tokens)

            # given the note: scored 1 against a baseline of 0, so the note's weight rises
            r = await client.post("/v1/tasks", json={**task, "question": "What is 30 + 5?",
                                                     "reference": f"{SECRET} 35",
                                                     "memory": {"k": 2,
                                                                "domain": "arithmetic"}})
            assert r.status_code == 200, r.text
            helped = r.json()
            assert helped["score"] == 1.0 and [n["id"] for n in helped["memory"]] == [item.id]
            kept = await store.get_scec(helped["scec"])
            assert kept is not None
            scec = decode_scec(kept.body)
            assert scec.prompt == "What is 30 + 5?"  # the task before its notes went in
            assert scec.memory == (note,) and scec.memory_ids == (item.id,)
            assert scec.output == "35" and scec.score == 1.0
            record = await store.get(item.id)
            assert record is not None
            assert (record.stats.uses, record.stats.delta_sum) == (1, 1.0)
            assert record.stats.weight > 0.5
            assert memory.baseline.count("arithmetic") == 1  # a run given notes: unmoved

            # GET shows the same score and SCEC, from the record
            again = (await client.get(f"/v1/tasks/{helped['id']}")).json()
            assert (again["score"], again["scec"]) == (1.0, helped["scec"])

        # the reference reached no worker: not in a task request, not on gossip
        assert len(solver.requests) == 2
        for request in solver.requests:
            assert SECRET.encode() not in encode(request)
        assert published and not any(SECRET.encode() in data for data in published)


async def test_a_scored_task_without_a_memory_is_scored_and_kept_nowhere(
        tmp_path: Path) -> None:
    async with swarm(2, tmp_path, connect="star") as (a, b), \
            symphonies([a, b], [None, FakeSolver()], skills=[[], ["arithmetic"]]) as _:
        await ready_to_elect(a, [b])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(a, TOKEN)),
                                     base_url="http://peerd", headers=AUTH,
                                     timeout=30.0) as client:
            r = await client.post("/v1/tasks", json={
                "question": "What is 2 + 2?", "workers": 1, "answer_format": "number",
                "bid_window_s": 3, "reference": "The answer is 4.", "scorer": "number"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["score"] == 1.0 and body["scec"] is None


@pytest.mark.parametrize(("scorer", "reference", "score"), [
    ("exact", "42", 1.0), ("exact", "42.0", 0.0), ("contains", "4", 1.0),
    ("number", "42.0", 1.0)])
def test_the_settled_answer_is_scored_by_the_named_scorer(scorer: str, reference: str,
                                                          score: float) -> None:
    from peerd.agents.record import TaskRecord, TaskSpec
    from peerd.agents.scored import score_of

    record = TaskRecord("t", TaskSpec("What is 40 + 2?", reference=reference, scorer=scorer))
    record.answer = "42"
    assert score_of(record) == score
    record.answer = None  # no answer settled: nothing scores
    assert score_of(record) == 0.0
