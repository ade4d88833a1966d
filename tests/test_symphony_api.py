"""POST /v1/tasks and GET /v1/tasks/{id} on the real app of an in-process node whose
task service elects a fake-solver worker: the response shape, 202 while running, and
400s in OpenAI's error shape for bad requests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from peerd.agents.symphony import Symphony
from peerd.api.app import create_app
from tests.harness import swarm, wait_for
from tests.symphony import FakeSolver, ready_to_elect, symphonies

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def api(tmp_path: Path, solver: FakeSolver | None = None,
              ) -> AsyncIterator[httpx.AsyncClient]:
    """A's API; B is a worker with `solver` (a prompt fake by default)."""
    async with swarm(2, tmp_path, connect="star") as (a, b), \
            symphonies([a, b], [None, solver or FakeSolver()],
                       skills=[[], ["arithmetic"]]) as (service, _):
        await ready_to_elect(a, [b])
        app = create_app(a, TOKEN)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://peerd",
                                     headers=AUTH, timeout=30.0) as client:
            client.service = service  # type: ignore[attr-defined]
            yield client


async def test_post_runs_the_task_and_get_returns_it(tmp_path: Path) -> None:
    async with api(tmp_path) as client:
        r = await client.post("/v1/tasks", json={
            "question": "What is 40 + 2?", "workers": 1, "answer_format": "number",
            "deadline_s": 10, "bid_window_s": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"id", "status", "answer", "votes", "elected", "fallbacks",
                             "timings"}
        assert body["answer"] == "42" and body["status"] == "done"
        (vote,) = body["votes"]
        assert set(vote) == {"peer_id", "answer", "confidence", "measured", "weight", "cot"}
        assert vote["measured"] is None  # A has no model to measure chains with
        assert vote["answer"] == "42" and "Answer: 42" in vote["cot"]
        assert body["elected"] == [vote["peer_id"]]
        assert set(body["timings"]) == {"beacon_ms", "solve_ms", "measure_ms", "total_ms"}
        again = await client.get(f"/v1/tasks/{body['id']}")
        assert again.status_code == 200 and again.json() == body
        missing = await client.get("/v1/tasks/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "task_not_found"
        # a restarted daemon (a new service on the same data directory) still has it
        service: Symphony = client.service  # type: ignore[attr-defined]
        restarted = Symphony(service.node, service.ledger)
        assert restarted.requester.records == {}
        assert await restarted.task(body["id"]) == body


async def test_get_shows_a_running_task_with_202(tmp_path: Path) -> None:
    async with api(tmp_path, FakeSolver(delay_s=1.0)) as client, \
            trio.open_nursery() as nursery:
        service: Symphony = client.service  # type: ignore[attr-defined]
        results: list[httpx.Response] = []

        async def post() -> None:
            results.append(await client.post("/v1/tasks", json={
                "question": "What is 1 + 1?", "workers": 1, "answer_format": "number"}))

        nursery.start_soon(post)
        await wait_for(lambda: service.requester.records, 10, "the task to start")
        (task_id,) = service.requester.records
        r = await client.get(f"/v1/tasks/{task_id}")
        assert r.status_code == 202
        assert r.json()["answer"] is None and r.json()["id"] == task_id
        await wait_for(lambda: results, 10, "the POST to return")
        assert results[0].status_code == 200
        done = await client.get(f"/v1/tasks/{task_id}")
        assert done.status_code == 200 and done.json()["answer"] == "2"


BAD = [
    ({}, "question"),
    ({"question": ""}, "question"),
    ({"question": 42}, "question"),
    ({"question": "q", "workers": 0}, "workers"),
    ({"question": "q", "workers": 17}, "workers"),
    ({"question": "q", "workers": "3"}, "workers"),
    ({"question": "q", "workers": True}, "workers"),
    ({"question": "q", "answer_format": "poem"}, "answer_format"),
    ({"question": "q", "deadline_s": 0}, "deadline_s"),
    ({"question": "q", "deadline_s": 1e9}, "deadline_s"),
    ({"question": "q", "max_tokens": 0}, "max_tokens"),
    ({"question": "q", "requirement": ["x"]}, "requirement"),
    ({"question": "q", "wokers": 3}, "wokers"),
    # a reference answer to score the settled one against (never sent to a worker)
    ({"question": "q", "reference": 42}, "reference"),
    ({"question": "q", "reference": "  "}, "reference"),
    ({"question": "q", "reference": "4" * 501}, "reference"),
    ({"question": "q", "reference": "no number here"}, "reference"),  # `number` needs one
    ({"question": "q", "reference": "42", "scorer": "fuzzy"}, "scorer"),
    ({"question": "q", "reference": "42", "scorer": 1}, "scorer"),
    ({"question": "q", "scorer": "exact"}, "scorer"),  # nothing to score against
    ({"question": "q", "reference": "42", "domain": "Not A Domain"}, "domain"),
    ({"question": "q", "reference": "42", "domain": 7}, "domain"),
    ({"question": "q", "domain": "arithmetic"}, "domain"),  # no SCEC to keep under it
    ([], None),
]


async def test_bad_requests_get_400_in_openai_shape(tmp_path: Path) -> None:
    async with api(tmp_path) as client:
        for body, param in BAD:
            r = await client.post("/v1/tasks", json=body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error", body
            assert error["param"] == param, body
            assert error["message"]
        r = await client.post("/v1/tasks", content=b"{not json")
        assert r.status_code == 400
        r = await client.post("/v1/tasks", json={"question": "q"},
                              headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401


async def test_a_task_nobody_can_work_on_is_503(tmp_path: Path) -> None:
    async with api(tmp_path, FakeSolver(able=False)) as client:
        r = await client.post("/v1/tasks", json={"question": "What is 1 + 1?",
                                                 "bid_window_s": 0.3})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_workers"


async def test_a_task_with_memory_gives_the_workers_its_notes(tmp_path: Path) -> None:
    from peerd.memory.controller import ControllerSettings, admission_stats
    from peerd.memory.item import Record, sign_item
    from peerd.memory.service import Memory

    solver = FakeSolver()
    async with swarm(2, tmp_path, connect="star") as (a, b), \
            symphonies([a, b], [None, solver], skills=[[], ["arithmetic"]]) as (service, _):
        memory = Memory(a, None, tmp_path / "mem", embedder="hashing",
                        settings=ControllerSettings(min_similarity=1e-6))
        await a.start(memory)
        service.recall = memory
        note = "What is asked: add the two numbers, give the sum alone."
        item, signed = sign_item(a.key_pair.private_key, a.peer_id, note, "arithmetic",
                                 "rule")
        store = memory.live_store()
        await store.put(Record(item, signed, admission_stats(0.5, time.time(), memory.settings)),
                        (await store.embed([note]))[0])
        await ready_to_elect(a, [b])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(a, TOKEN)),
                                     base_url="http://peerd", headers=AUTH,
                                     timeout=30.0) as client:
            r = await client.post("/v1/tasks", json={
                "question": "What is 40 + 2?", "workers": 1, "answer_format": "number",
                "deadline_s": 10, "bid_window_s": 3,
                "memory": {"k": 2, "domain": "arithmetic"}})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["answer"] == "42"
            assert [n["id"] for n in body["memory"]] == [item.id]
            (asked,) = solver.requests
            assert note in asked.question and asked.question.endswith("What is 40 + 2?")
            bad = await client.post("/v1/tasks", json={"question": "What is 1 + 1?",
                                                       "memory": {"k": 99}})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "memory"
