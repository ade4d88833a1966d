"""Plans between real in-process peers: a scripted thinker's plan calls the calculator
on two peers through POST /v1/plans, its events stream in order over SSE and on
/events, its record is kept (and marked interrupted after a restart); bad requests get
400 in words, a peer without a model 503."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from peerd.api.app import create_app
from peerd.memory.controller import ControllerSettings, admission_stats
from peerd.memory.item import Record, sign_item
from peerd.memory.prompting import NOTE_HEADER
from peerd.memory.scec import decode_scec
from peerd.memory.service import Memory
from peerd.node import Node
from peerd.plans.planning import Plans
from peerd.plans.records import PlanStore
from peerd.plans.service import Tools
from peerd.plans.thinker import ScriptedThinker, messages_of
from tests.harness import events, gossip, swarm, wait_for

TOKEN = "t0ken"
STEP1 = json.dumps({"thought": "two sums at once", "calls": [
    {"tool": "calculator", "arguments": {"expression": "6 * 7"}},
    {"tool": "calculator", "arguments": {"expression": "1 / 0"}},
    {"tool": "calculator", "arguments": {"expression": "2 + 2"}}]})
STEP2 = json.dumps({"thought": "got them", "answer": "42 and 4"})


def offers_of(node: Node, peer: str) -> list[str]:
    entry = gossip(node).book.get(peer)
    return [] if entry is None else [t.name for t in entry.tools]


@contextlib.asynccontextmanager
async def planning(tmp_path: Path, thinker: Any = None, model: Any = None,
                   memory: Callable[[Node], Memory] | None = None
                   ) -> AsyncIterator[tuple[Node, Node, httpx.AsyncClient]]:
    """A plans on A (calculator, capacity 1) with B (calculator) beside it; `memory`:
    the memory A keeps, made for A."""
    async with swarm(2, tmp_path, connect="star") as (a, b):
        ta = Tools(a, gossip(a), builtins=[("calculator", 1)])
        tb = Tools(b, gossip(b), builtins=[("calculator", None)])
        plans = Plans(a, ta, tmp_path / "n0", thinker=thinker, model=model)
        if memory is not None:
            kept = memory(a)
            plans.recall = plans.scored = kept
            await a.start(kept)
        await a.start(ta, plans)
        await b.start(tb)
        gossip(a).refresh()
        gossip(b).refresh()
        await wait_for(lambda: offers_of(a, b.peer_id) == ["calculator"]
                       and offers_of(a, a.peer_id) == ["calculator"], what="tools")
        transport = httpx.ASGITransport(app=create_app(a, TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://peerd",
                                     headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=30.0) as client:
            yield a, b, client


def sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def test_a_plan_calls_tools_on_two_peers_and_streams_its_steps(tmp_path: Path) -> None:
    thinker = ScriptedThinker([STEP1, STEP2])
    async with planning(tmp_path, thinker=lambda: thinker) as (a, b, client):
        got = await client.post("/v1/plans", json={"goal": "6*7 and 2+2",
                                                   "tools": ["calculator"]})
        assert got.status_code == 200, got.text
        plan_id = got.json()["id"]
        streamed = sse((await client.get(f"/v1/plans/{plan_id}/events")).text)
        types = [e["type"] for e in streamed]
        assert types[:2] == ["plan.created", "plan.thought"]
        assert types.count("plan.call") == 3 and types.count("plan.result") == 3
        assert types.index("plan.result") > max(i for i, t in enumerate(types)
                                                if t == "plan.call")
        assert "plan.replan" in types and types[-1] == "plan.answer"
        assert all(e["plan"] == plan_id for e in streamed)
        assert [e["id"] for e in streamed] == sorted(e["id"] for e in streamed)
        results = {e["call_id"]: e for e in streamed if e["type"] == "plan.result"}
        assert results["1.1"]["ok"] and '"42"' in results["1.1"]["observation"]
        assert results["1.2"]["code"] == "tool_error"
        assert {r["peer"] for r in results.values()} == {a.peer_id, b.peer_id}
        # the second step saw every result, the failure among them
        seen = thinker.seen[1].turns[0].observations
        assert len(seen) == 3 and any("tool_error" in o for o in seen)
        record = (await client.get(f"/v1/plans/{plan_id}")).json()
        assert record["status"] == "answered" and record["answer"] == "42 and 4"
        assert record["used"]["calls"] == 3 and record["used"]["steps"] == 2
        assert [c["call_id"] for c in record["steps"][0]["calls"]] == ["1.1", "1.2", "1.3"]
        listed = (await client.get("/v1/plans")).json()
        assert listed[0]["id"] == plan_id and listed[0]["status"] == "answered"
        # the peer's own /events has them too, and /metrics counts them
        assert [e.data["step"] for e in events(a, "plan.answer", plan=plan_id)] == [2]
        text = a.metrics.render().decode()
        assert 'peerd_plans_total{outcome="answered"} 1.0' in text
        assert 'peerd_plan_steps_total{constrained="no",parse="ok"} 2.0' in text
        assert "peerd_plan_replans_total 1.0" in text
        assert "peerd_plans_running 0.0" in text


async def test_bad_plans_get_400_and_a_peer_without_a_model_503(tmp_path: Path) -> None:
    async with planning(tmp_path) as (_, _, client):
        for body, words in [
                ({"goal": "x", "colour": 1}, "unknown parameter 'colour'"),
                ({"goal": "  "}, "'goal'"),
                ({"goal": "x", "budget": {"steps": 0}}, "budget.steps"),
                ({"goal": "x", "budget": {"wall_s": 1e9}}, "budget.wall_s"),
                ({"goal": "x", "budget": {"tokens": 5, "x": 1}}, "unknown parameter"),
                ({"goal": "x", "mode": "later"}, "'mode'"),
                ({"goal": "x", "tools": ["shell"]}, "no live peer offers a tool 'shell'")]:
            got = await client.post("/v1/plans", json=body)
            if "shell" in words:  # a tool nobody offers: asked only with a planner
                assert got.status_code == 503
                continue
            assert got.status_code == 400, (body, got.text)
            assert words in got.json()["error"]["message"], got.text
        for body, param in [({"goal": "x", "scorer": "exact"}, "scorer"),
                            ({"goal": "x", "domain": "plans"}, "domain"),
                            ({"goal": "x", "reference": "no number"}, "reference"),
                            ({"goal": "x", "reference": "4", "scorer": "best"}, "scorer"),
                            ({"goal": "x", "memory": {"k": 0}}, "memory"),
                            ({"goal": "x", "memory": True}, "memory")]:  # none kept here
            got = await client.post("/v1/plans", json=body)
            assert got.status_code == 400 and got.json()["error"]["param"] == param, got.text
        got = await client.post("/v1/plans", json={"goal": "x"})
        assert got.status_code == 503 and "serves no model" in got.json()["error"]["message"]
        assert (await client.get("/v1/plans/nope")).status_code == 404
        assert (await client.get("/v1/plans/nope/events")).status_code == 404
        assert (await client.get("/health")).status_code == 200


async def test_an_unknown_tool_is_refused_and_a_budget_failure_recorded(
        tmp_path: Path) -> None:
    thinker = ScriptedThinker(["not json at all", "still not"])
    async with planning(tmp_path, thinker=lambda: thinker) as (a, _, client):
        got = await client.post("/v1/plans", json={"goal": "x", "tools": ["shell"]})
        assert got.status_code == 400 and "'shell'" in got.json()["error"]["message"]
        got = await client.post("/v1/plans", json={"goal": "x", "budget": {"steps": 2}})
        plan_id = got.json()["id"]
        streamed = sse((await client.get(f"/v1/plans/{plan_id}/events")).text)
        assert [e["type"] for e in streamed] == [
            "plan.created", "plan.thought", "plan.replan", "plan.thought", "plan.replan",
            "plan.failed"]
        assert streamed[-1]["reason"] == "budget_steps"
        record = (await client.get(f"/v1/plans/{plan_id}")).json()
        assert record["status"] == "failed" and record["reason"] == "budget_steps"
        assert 'peerd_plan_steps_total{constrained="no",parse="not_json"} 2.0' in \
            a.metrics.render().decode()


async def test_a_plan_running_at_shutdown_is_interrupted_at_the_next_start(
        tmp_path: Path) -> None:
    thinker = ScriptedThinker(["{}"], delay_s=60)
    async with planning(tmp_path, thinker=lambda: thinker) as (_, _, client):
        plan_id = (await client.post("/v1/plans", json={"goal": "slow"})).json()["id"]
        await wait_for(lambda: bool(thinker.seen), what="the plan thinking")
    store = PlanStore(tmp_path / "n0" / "plans.db")
    assert store.interrupt(1.0) == 1
    got = store.get(plan_id)
    assert got is not None
    record, streamed = got
    assert (record["status"], record["reason"]) == ("failed", "interrupted")
    assert streamed[-1]["type"] == "plan.failed"
    assert store.recent()[0]["status"] == "failed"
    store.close()


async def test_a_scored_plan_is_given_notes_and_kept_by_the_memory(tmp_path: Path) -> None:
    thinker = ScriptedThinker([json.dumps({"thought": "known", "answer": "It is 42."}),
                               json.dumps({"thought": "guess", "answer": "7"})])
    memories: list[Memory] = []

    def kept(node: Node) -> Memory:
        memories.append(Memory(node, None, tmp_path / "mem", embedder="hashing",
                               settings=ControllerSettings(min_similarity=1e-6),
                               diffuse=False, abstract_every_s=0))
        return memories[0]

    async with planning(tmp_path, thinker=lambda: thinker, memory=kept) as (a, _, client):
        (memory,) = memories
        store = memory.live_store()
        note = "What is asked: multiply first, then answer with the number."
        item, signed = sign_item(a.key_pair.private_key, a.peer_id, note, "plans", "rule")
        await store.put(Record(item, signed, admission_stats(0.2, time.time(),
                                                             memory.settings)),
                        (await store.embed([note]))[0])

        given: list[list[str]] = []  # the notes each response named

        async def finished(body: dict[str, Any]) -> dict[str, Any]:
            got = await client.post("/v1/plans", json=body)
            assert got.status_code == 200, got.text
            plan_id = got.json()["id"]
            sse((await client.get(f"/v1/plans/{plan_id}/events")).text)  # to its end
            record: dict[str, Any] = (await client.get(f"/v1/plans/{plan_id}")).json()
            given.append([n["id"] for n in got.json().get("memory", [])])
            return record

        # with notes: the planner sees them before the goal; the answer scores 1
        r = await finished({"goal": "What is 6 * 7?", "tools": ["calculator"],
                            "memory": True, "reference": "42"})
        assert given[-1] == r["memory"] == [item.id]  # the response's, the record's
        assert thinker.seen[0].notes == (note,)
        user = messages_of(thinker.seen[0])[1]["content"]
        assert user.startswith(NOTE_HEADER) and user.endswith("Goal: What is 6 * 7?")
        assert (r["status"], r["score"], r["domain"], r["scorer"]) == ("answered", 1.0,
                                                                      "plans", "number")
        stored = await store.get_scec(r["scec"])
        assert stored is not None and stored.domain == "plans"
        scec = decode_scec(stored.body)
        assert (scec.prompt, scec.output, scec.answer, scec.score) == (
            "What is 6 * 7?", "It is 42.", "42", 1.0)
        assert scec.memory == (note,) and scec.memory_ids == (item.id,)
        # without notes, a wrong answer: scored 0, the domain's no-memory baseline moves
        r = await finished({"goal": "What is 3 + 4?", "reference": "8", "domain": "sums"})
        assert (r["score"], r["domain"]) == (0.0, "sums") and "memory" not in r
        assert thinker.seen[1].notes == ()
        assert memory.baseline.snapshot()["sums"] == (0.0, 1)
        assert r["scec"] in {s.hash for s, _ in await store.similar_scecs(
            (await store.embed(["What is 3 + 4?"]))[0], 5, "sums")}
        # an unscored plan has none of it
        thinker.steps.append(json.dumps({"thought": "t", "answer": "a"}))
        r = await finished({"goal": "Say a."})
        assert "score" not in r and "scec" not in r
