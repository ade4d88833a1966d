"""The memory as a service of a real peer, through its HTTP API: admission by replay on
the peer's own (tiny, random) model, retrieval, the OpenAI `memory` option, the log,
export and import, learning from scored runs, and every bad input refused in words.

"Helps" and "hurts" are made honest as in test_memory_admission.py: the references of
the recorded runs are what the model answers with the planted text (it helps) or
without it (it hurts)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from peerd.api.app import create_app
from peerd.inference.slot import ModelOptions, ModelSlot
from peerd.memory.admissions import quotes, refusal_key
from peerd.memory.controller import ControllerSettings, admission_stats
from peerd.memory.item import Record, sign_item
from peerd.memory.scec import Task, scec_hash
from peerd.memory.service import Memory
from tests.harness import gossip, swarm, wait_for
from tests.models import tiny_llama_dir
from tests.test_memory_admission import PARAMS, PROMPTS, changing_candidate

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# the hashing embedder's cosines are not MiniLM's: take every task and item it finds
LOOSE = ControllerSettings(min_similarity=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@contextlib.asynccontextmanager
async def peer(tmp_path: Path, tiny: Path, **options: Any
               ) -> AsyncIterator[tuple[httpx.AsyncClient, Memory]]:
    async with swarm(1, tmp_path, connect="none") as (node,):
        slot = ModelSlot(node, gossip(node), ModelOptions(str(tiny), torch_threads=1))
        options.setdefault("task_similarity", 0.0)
        memory = Memory(node, slot, tmp_path / "data", embedder="hashing", settings=LOOSE,
                        **options)
        slot.recall = memory
        await node.start(slot, memory)
        await slot.settled.wait()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(node, TOKEN)),
                                     base_url="http://peerd", headers=AUTH,
                                     timeout=60.0) as client:
            yield client, memory


async def planted(memory: Memory, domain: str, *, helps: bool) -> tuple[str, list[str]]:
    """A text that changes the model's answer to some of PROMPTS, and the hashes of the
    runs recorded (without memory) in `domain`, their references chosen so that the
    text helps or hurts."""
    face = memory._face()
    baseline = [(await memory.solve(Task(p, "", "exact", domain), memory=False,
                                    params=PARAMS))[0].output for p in PROMPTS]
    candidate, with_it = await changing_candidate(face, baseline)
    references = with_it if helps else baseline
    hashes = []
    for p, ref in zip(PROMPTS, references, strict=True):
        _, scec, _ = await memory.solve(Task(p, ref, "exact", domain), memory=False,
                                        params=PARAMS)
        hashes.append(scec_hash(scec))
    changed = [i for i, (a, b) in enumerate(zip(with_it, baseline, strict=True))
               if a.strip() != b.strip()]
    return candidate, [hashes[changed[0]], *hashes]


async def test_admission_retrieval_and_the_chat_option(tmp_path: Path, tiny: Path) -> None:
    async with peer(tmp_path, tiny) as (api, memory):
        candidate, runs = await planted(memory, "chat", helps=True)
        r = await api.post("/v1/memory", json={"text": candidate, "domain": "chat",
                                               "kind": "rule", "origin": runs[0],
                                               "wait": True})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["state"] == "admitted", got
        assert got["utility"]["total"] > 0 and got["utility"]["score"] > 0
        assert got["tasks"] >= 1
        item_id = got["item_id"]

        # it is kept, signed by this peer, with its measured utility as its weight
        item = (await api.get(f"/v1/memory/items/{item_id}")).json()
        assert item["text"] == candidate and item["author"] == memory.node.peer_id
        assert item["stats"]["admitted_utility"] == pytest.approx(got["utility"]["total"])
        found = (await api.get("/v1/memory/search",
                               params={"q": candidate, "k": 3})).json()
        assert [f["id"] for f in found] == [item_id]

        # the same text again is a near-duplicate: refused at once, no replay
        again = (await api.post("/v1/memory", json={"text": candidate,
                                                    "domain": "chat"})).json()
        assert (again["state"], again["reason"]) == ("refused", "duplicate")

        # the OpenAI option puts it before the prompt and says so
        body = {"model": memory._face().model_id, "max_tokens": 4,
                "messages": [{"role": "user", "content": candidate}],
                "memory": {"k": 2, "domain": "chat"}}
        r = await api.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        noted = r.json()["peerd"]["memory"]
        assert [n["id"] for n in noted] == [item_id]
        plain = await api.post("/v1/chat/completions", json={**body, "memory": False})
        assert "memory" not in plain.json()["peerd"]
        assert r.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]

        # stats and the log say what happened, refusals with their reason
        stats = (await api.get("/v1/memory/stats")).json()
        assert stats["items"] == 1 and stats["domains"]["chat"]["items"] == 1
        assert stats["baseline"]["chat"]["runs"] == 2 * len(PROMPTS)
        assert stats["decisions"] == {"admitted": 1, "refused:duplicate": 1}
        log = (await api.get("/v1/memory/log")).json()
        assert [row["action"] for row in log] == ["refused", "admitted"]
        assert log[1]["utility"] == pytest.approx(got["utility"]["total"])

        # abstracted into an insight, which must prove itself by its own replay
        r = await api.post(f"/v1/memory/items/{item_id}/abstract",
                           json={"domain": "chat", "wait": True})
        if r.status_code == 422:  # the random model wrote nothing usable: said in words
            assert r.json()["error"]["code"] == "no_insight"
        else:
            insight = r.json()
            assert r.status_code == 200, r.text
            assert insight["kind"] == "insight" and insight["parent"] == item_id
            assert insight["text"].startswith("Tip: ")
            assert insight["state"] in ("admitted", "refused") and insight["tasks"] >= 1
        r = await api.post(f"/v1/memory/items/{'0' * 64}/abstract", json={"domain": "chat"})
        assert r.status_code == 404
        r = await api.post(f"/v1/memory/items/{item_id}/abstract", json={"domain": "A B"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "domain")

        # deleted, it is gone
        assert (await api.delete(f"/v1/memory/items/{item_id}")).status_code == 200
        assert (await api.get(f"/v1/memory/items/{item_id}")).status_code == 404


async def test_a_harmful_item_is_refused_with_its_utility(tmp_path: Path, tiny: Path) -> None:
    async with peer(tmp_path, tiny) as (api, memory):
        candidate, runs = await planted(memory, "chat", helps=False)
        got = (await api.post("/v1/memory", json={"text": candidate, "domain": "chat",
                                                  "origin": runs[0], "wait": True})).json()
        assert (got["state"], got["reason"]) == ("refused", "no_gain")
        assert got["utility"]["score"] < 0 and got["item_id"] is None
        assert (await api.get("/v1/memory/stats")).json()["items"] == 0
        refused = (await api.get("/v1/memory/log", params={"action": "refused"})).json()
        assert refused[0]["utility"] == pytest.approx(got["utility"]["total"])
        # offered again word for word: that measurement stands, no second replay
        hits = memory.desk().baselines.hits
        again = (await api.post("/v1/memory", json={"text": candidate, "domain": "chat",
                                                    "origin": runs[0], "wait": True})).json()
        assert (again["state"], again["reason"]) == ("refused", "refused_before")
        assert again["utility"] is None and again["tasks"] == 0
        assert memory.desk().baselines.hits == hits  # no A arm was even looked up
        # the refusal measured this model: for another, it does not stand
        store = memory.live_store()
        served = memory._face().model_id
        assert await store.refusal(refusal_key("chat", candidate, served)) is not None
        assert await store.refusal(refusal_key("chat", candidate, served + "-v2")) is None
        # in another domain it is another candidate
        other = (await api.post("/v1/memory", json={"text": candidate, "domain": "math",
                                                    "wait": True})).json()
        assert other["reason"] == "no_tasks"
        # a candidate with nothing to be judged on is refused, saying what to do
        got = (await api.post("/v1/memory", json={"text": "Carry the one.",
                                                  "domain": "arithmetic",
                                                  "wait": True})).json()
        assert (got["state"], got["reason"]) == ("refused", "no_tasks")


async def test_export_import_and_learning(tmp_path: Path, tiny: Path) -> None:
    async with peer(tmp_path, tiny) as (api, memory):
        candidate, runs = await planted(memory, "chat", helps=True)
        got = (await api.post("/v1/memory", json={"text": candidate, "domain": "chat",
                                                  "origin": runs[0], "wait": True})).json()
        assert got["state"] == "admitted"
        exported = (await api.get("/v1/memory/export")).text
        assert len(exported.splitlines()) == 1
        await api.delete(f"/v1/memory/items/{got['item_id']}")

        # another author's item goes through admission; a forged line is refused
        kp = create_new_key_pair()
        other = ID.from_pubkey(kp.public_key).to_base58()
        _, signed = sign_item(kp.private_key, other, "Say it twice.", "chat", "rule")
        foreign = json.dumps({"body": base64.b64encode(signed.body).decode(),
                              "sig": base64.b64encode(signed.sig).decode()})
        forged = json.dumps({"body": base64.b64encode(signed.body).decode(),
                             "sig": base64.b64encode(b"x" * 64).decode()})
        lines = "\n".join([exported.strip(), foreign, forged, "not json", ""])
        summary = (await api.post("/v1/memory/import", content=lines.encode())).json()
        assert (summary["restored"], summary["queued_for_admission"], summary["bad"]) == \
            (1, 1, 2)
        assert [b["line"] for b in summary["bad_lines"]] == [3, 4]
        restored = (await api.get(f"/v1/memory/items/{got['item_id']}")).json()
        assert restored["text"] == candidate
        again = (await api.post("/v1/memory/import", content=exported.encode())).json()
        assert again["already_here"] == 1

        # learning: scored runs of `add`, each offering what it teaches for admission
        r = await api.post("/v1/memory/learn", json={"task": "add", "n": 3,
                                                     "max_tokens": 6})
        assert r.status_code == 202, r.text
        assert (await api.post("/v1/memory/learn", json={"task": "add"})).status_code == 409

        job = r.json()
        with trio.fail_after(120):
            while job["state"] == "running":
                await trio.sleep(0.2)
                job = (await api.get("/v1/memory/learn")).json()
        assert job["state"] == "done", job
        assert job["runs"] == 3 and job["domain"] == "arithmetic"
        assert job["proposed"] == job["admitted"] + sum(job["refused"].values()) >= 1
        stats = (await api.get("/v1/memory/stats")).json()
        assert stats["baseline"]["arithmetic"]["runs"] >= 1  # the control runs
        # a job stops after the run in hand, keeping what it learnt
        job = (await api.post("/v1/memory/learn", json={"task": "add", "n": 500,
                                                        "seed": 1, "max_tokens": 6})).json()
        assert (await api.post("/v1/memory/learn/stop")).status_code == 202
        with trio.fail_after(120):
            while job["state"] == "running":
                await trio.sleep(0.2)
                job = (await api.get("/v1/memory/learn")).json()
        assert job["state"] == "stopped" and job["runs"] < 500
        assert (await api.post("/v1/memory/consolidate")).status_code == 200


BAD: list[tuple[str, str, Any, int, str | None]] = [
    ("POST", "/v1/memory", "not json", 400, "body"),
    ("POST", "/v1/memory", [1], 400, "body"),
    ("POST", "/v1/memory", {}, 400, "text"),
    ("POST", "/v1/memory", {"text": " "}, 400, "text"),
    ("POST", "/v1/memory", {"text": "x" * 5000}, 400, "text"),
    ("POST", "/v1/memory", {"text": "x", "domain": "Bad Domain"}, 400, "domain"),
    ("POST", "/v1/memory", {"text": "x", "kind": "gossip"}, 400, "kind"),
    ("POST", "/v1/memory", {"text": "x", "origin": "abc"}, 400, "origin"),
    ("POST", "/v1/memory", {"text": "x", "wait": "yes"}, 400, "wait"),
    # a misspelt field was dropped: the item went to the default domain
    ("POST", "/v1/memory", {"text": "x", "domian": "arithmetic"}, 400, "domian"),
    ("POST", "/v1/memory/items/" + "0" * 64 + "/abstract", {"domain": "x", "wiat": True},
     400, "wiat"),
    ("GET", "/v1/memory/search", None, 400, "q"),
    ("GET", "/v1/memory/search?q=x&k=99", None, 400, "k"),
    ("GET", "/v1/memory/search?q=x&k=two", None, 400, "k"),
    ("GET", "/v1/memory/search?q=x&domain=A%20B", None, 400, "domain"),
    ("GET", "/v1/memory/items/nothex", None, 400, "id"),
    ("GET", "/v1/memory/items/" + "0" * 64, None, 404, None),
    ("DELETE", "/v1/memory/items/" + "0" * 64, None, 404, None),
    ("GET", "/v1/memory/candidates/cand-0", None, 404, None),
    ("GET", "/v1/memory/log?limit=0", None, 400, "limit"),
    ("GET", "/v1/memory/learn", None, 404, None),
    ("POST", "/v1/memory/learn/stop", None, 409, None),
    ("POST", "/v1/memory/learn", {"n": 0}, 400, "n"),
    ("POST", "/v1/memory/learn", {"task": "nonsense"}, 400, "task"),
    ("POST", "/v1/memory/learn", {"task": "x" * 300 + ".jsonl"}, 400, "task"),  # ENAMETOOLONG
    ("POST", "/v1/memory/learn", {"bogus": 1}, 400, "bogus"),
    ("POST", "/v1/memory/learn", {"k": True}, 400, "k"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hi"}], "memory": {"k": 0}}, 400, "memory"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hi"}], "memory": "yes"}, 400, "memory"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hi"}], "memory": {"domain": "A B"}}, 400, "memory"),
]


async def test_bad_input_is_refused_in_words_and_the_peer_keeps_serving(
        tmp_path: Path, tiny: Path) -> None:
    async with peer(tmp_path, tiny) as (api, memory):
        for method, path, body, status, param in BAD:
            if isinstance(body, str):
                r = await api.request(method, path, content=body.encode())
            else:
                r = await api.request(method, path, json=body)
            assert r.status_code == status, (method, path, body, r.text)
            error = r.json()["error"]
            assert error["message"], (method, path)
            assert error["param"] == param, (method, path, body, error)
        bad_import = await api.post("/v1/memory/import", content=b"\xff\xfe")
        assert bad_import.status_code == 400
        # a line of our own with a count SQLite cannot hold (it was a 500, and the lines
        # after it were never read): reported by number, the rest restored
        me = memory.node.peer_id
        lines = []
        for text, uses in (("Count twice.", 2**63), ("Count once.", 1)):
            _, signed = sign_item(memory.node.key_pair.private_key, me, text, "chat", "rule")
            lines.append(json.dumps({
                "body": base64.b64encode(signed.body).decode(),
                "sig": base64.b64encode(signed.sig).decode(),
                "stats": {"weight": 1.0, "admitted_utility": 0.1, "uses": uses,
                          "delta_sum": 0.0, "last_used": 0.0, "admitted_at": 0.0}}))
        r = await api.post("/v1/memory/import", content="\n".join(lines).encode())
        assert r.status_code == 200, r.text
        summary = r.json()
        assert (summary["restored"], summary["bad"]) == (1, 1), summary
        assert summary["bad_lines"][0]["line"] == 1 and "uses" in summary["bad_lines"][0]["error"]
        big = await api.post("/v1/memory", content=b"{" + b"[" * 100 + b"}")
        assert big.status_code == 400
        assert (await api.get("/v1/memory/stats")).status_code == 200
        await wait_for(lambda: memory.ready.is_set())


async def test_a_client_that_leaves_mid_import_is_an_api_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not an exception out of the endpoint (logged as a crash of the ASGI app); and an
    import over the cap is a 413."""
    from types import SimpleNamespace

    from starlette.requests import Request
    from starlette.routing import Route

    from peerd.api.memory import routes

    (route,) = [r for r in routes(SimpleNamespace(store=object()))  # type: ignore[arg-type]
                if isinstance(r, Route) and r.path == "/v1/memory/import"]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"body": "', "more_body": True},
        {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    r = await route.endpoint(Request({"type": "http", "method": "POST", "headers": []},
                                     receive))
    assert r.status_code == 400 and b"left before sending the whole import" in r.body

    from peerd.api import memory as memory_api

    monkeypatch.setattr(memory_api, "MAX_IMPORT_BYTES", 1000)
    messages[:] = [{"type": "http.request", "body": b"x" * 1001, "more_body": False}]
    r = await route.endpoint(Request({"type": "http", "method": "POST", "headers": []},
                                     receive))
    assert r.status_code == 413 and b"split it" in r.body


async def test_an_import_line_with_a_lone_surrogate_is_reported_not_a_500(
        tmp_path: Path, tiny: Path) -> None:
    """JSON takes "\\ud800" alone: a line whose id is one was refused with a message
    echoing the id, and the answer could not encode it (a 500, the good lines' fate
    unreported). The line is reported, escaped; the others are imported."""
    async with peer(tmp_path, tiny) as (api, memory):
        me = memory.node.peer_id
        lines = []
        for text, extra in (("Count to three.", {"id": "\ud800" * 20}),
                            ("Count to four.", {}),
                            ("Count to five.", {"stats_source": "\udfff"})):
            _, signed = sign_item(memory.node.key_pair.private_key, me, text, "chat", "rule")
            stats = {"weight": 1.0, "admitted_utility": 0.1, "uses": 1, "delta_sum": 0.0,
                     "last_used": 0.0, "admitted_at": 0.0,
                     "source": extra.get("stats_source", "local")}
            row = {"body": base64.b64encode(signed.body).decode(),
                   "sig": base64.b64encode(signed.sig).decode(), "stats": stats}
            if "id" in extra:
                row["id"] = extra["id"]
            lines.append(json.dumps(row))  # ASCII: the surrogates as \ud800 escapes
        r = await api.post("/v1/memory/import", content="\n".join(lines).encode())
        assert r.status_code == 200, r.text
        summary = r.json()
        assert (summary["restored"], summary["bad"]) == (1, 2), summary
        assert [b["line"] for b in summary["bad_lines"]] == [1, 3]
        assert "\\ud800" in summary["bad_lines"][0]["error"]  # escaped, not the character
        assert (await api.get("/v1/memory/stats")).json()["items"] == 1


async def test_two_learning_jobs_asked_at_once_start_one(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The busy check and the job's start had an await between them (loading the task):
    two requests at once both started, and the second job replaced the first, which
    /v1/memory/learn/stop could no longer reach. One starts; the other is a 409."""
    import peerd.rl.tasks as tasks

    load = tasks.load_task

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # (a worker thread) the window a second request lands in
        return load(*args, **kwargs)

    monkeypatch.setattr(tasks, "load_task", slow_load)
    async with peer(tmp_path, tiny) as (api, memory):
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await api.post("/v1/memory/learn", json={
                "task": "add", "n": 200, "max_tokens": 4}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            nursery.start_soon(ask)
        assert sorted(a.status_code for a in answers) == [202, 409], \
            [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 409).json()["error"]
        assert refused["code"] == "busy" and "learning job is running" in refused["message"]
        started = next(a for a in answers if a.status_code == 202).json()
        assert memory.learning is not None
        assert memory.learning.started == started["started"]  # the one that runs
        assert (await api.post("/v1/memory/learn/stop")).status_code == 202
        job = memory.learning
        await wait_for(lambda: job.state != "running", 120)
        assert job.state == "stopped"
        assert (await api.post("/v1/memory/learn", json={"task": "add", "n": 1,
                                                         "max_tokens": 4})).status_code == 202


async def test_the_store_stays_under_its_cap_after_every_admission(tmp_path: Path,
                                                                   tiny: Path) -> None:
    async with peer(tmp_path, tiny) as (api, memory):
        memory.settings = ControllerSettings(min_similarity=1e-6, size_cap=2)
        store = memory.live_store()
        for text, utility in (("Be brief.", 0.9), ("Answer in one word.", 0.05)):
            item, signed = sign_item(memory.node.key_pair.private_key, memory.node.peer_id,
                                     text, "chat", "rule")
            await store.put(Record(item, signed, admission_stats(utility, time.time(),
                                                                 memory.settings)),
                            (await store.embed([text]))[0])
        candidate, runs = await planted(memory, "chat", helps=True)
        c = await memory.propose(candidate, "chat", "rule", origin=runs[0])
        await c.done.wait()
        assert c.state == "admitted", c.to_json()
        assert await store.count() == 2  # the least useful went, at once
        log = (await api.get("/v1/memory/log", params={"action": "evicted"})).json()
        assert len(log) == 1 and log[0]["cap"] == 2
        assert await store.get(log[0]["item_id"]) is None
        assert sorted(r.item.text for r in await store.records()) == sorted(
            ["Be brief.", candidate])


async def test_a_correction_is_not_judged_on_the_run_whose_answer_it_holds(
        tmp_path: Path, tiny: Path) -> None:
    async with peer(tmp_path, tiny) as (_api, memory):
        _, scec, _ = await memory.solve(Task("What is 2 + 2?", "4", "number", "solo"),
                                        memory=False, params=PARAMS)
        origin = scec_hash(scec)
        c = await memory.propose("Question: What is 2 + 2?\nCorrect answer: 4", "solo",
                                 "correction", origin=origin)
        await c.done.wait()
        assert (c.state, c.reason, c.tasks) == ("refused", "no_tasks", 0)
        # nor an example: the run passed, but a replay without notes need not, and the
        # example would then "help" by the answer it holds
        c = await memory.propose("Question: What is 2 + 2?\nAnswer: 4", "solo", "example",
                                 origin=origin)
        await c.done.wait()
        assert (c.state, c.reason, c.tasks) == ("refused", "no_tasks", 0)
        c = await memory.propose("Count on from the larger number.", "solo", "rule",
                                 origin=origin)
        await c.done.wait()
        assert c.tasks == 1  # a rule holding no answer is judged on the run it came from


async def test_a_candidate_with_nothing_to_be_judged_on_is_told_why(tmp_path: Path,
                                                                    tiny: Path) -> None:
    async with peer(tmp_path, tiny, task_similarity=0.9) as (api, memory):
        async def why(text: str, kind: str = "rule", origin: str = "") -> str:
            c = await memory.propose(text, "solo", kind, origin=origin)
            await c.done.wait()
            assert (c.state, c.reason, c.tasks) == ("refused", "no_tasks", 0)
            log = (await api.get("/v1/memory/log", params={"action": "refused"})).json()
            message: str = next(row for row in log if row["item_id"] == c.id)["message"]
            return message

        assert "no scored run in domain 'solo'" in await why("Carry the one.")
        _, scec, _ = await memory.solve(Task("What is 2 + 2?", "4", "number", "solo"),
                                        memory=False, params=PARAMS)
        unlike = await why("Paris is the capital of France.")
        assert "is at least 0.90 similar to it (the nearest: 0." in unlike, unlike
        held = await why("Question: What is 2 + 2?\nCorrect answer: 4", "correction",
                         scec_hash(scec))
        assert "holds the answer it states" in held, held

        # the run close enough (any run, at similarity 0) damaged in the store
        memory.desk().task_similarity = 0.0
        with contextlib.closing(sqlite3.connect(memory.live_store().store.db_path)) as db, db:
            db.execute("UPDATE scecs SET body = ? WHERE hash = ?",
                       (b"\xff not msgpack", scec_hash(scec)))
        damaged = await why("Paris is the capital of France.")
        assert "the 1 scored run(s) in domain 'solo' similar enough" in damaged, damaged
        assert "do not decode" in damaged


async def test_a_proven_item_is_abstracted_on_its_own_once_per_domain(tmp_path: Path,
                                                                     tiny: Path) -> None:
    async with peer(tmp_path, tiny, abstract_every_s=0.2) as (api, memory):
        candidate, runs = await planted(memory, "chat", helps=True)
        got = (await api.post("/v1/memory", json={"text": candidate, "domain": "chat",
                                                  "origin": runs[0], "wait": True})).json()
        assert got["state"] == "admitted", got
        store = memory.live_store()
        item_id = got["item_id"]
        record = await store.get(item_id)
        assert record is not None
        for p in PROMPTS[:4]:  # runs in another domain: where its insight can be judged
            await memory.solve(Task(p, "", "exact", "math"), memory=False, params=PARAMS)
        assert await store.abstracted() == set()  # not proven yet: admitted, never used
        # its uses proved it (how uses move the weight is tested in the controller's
        # tests): the next round abstracts it into math, and only math
        await store.update_stats(item_id, dataclasses.replace(
            record.stats, uses=10, delta_sum=5.0, last_used=time.time()))
        def abstractions() -> list[dict[str, Any]]:
            return [e.data for e in memory.node.events.recent()
                    if e.type == "memory.abstraction"]

        await wait_for(abstractions, 60, "a round of abstraction")
        assert await store.abstracted() == {(item_id, "math")}
        (event,) = abstractions()
        assert event["item_id"] == item_id and event["domains"] == ["math"]
        insight = event["insight"]
        if insight is None:  # the random model wrote nothing usable: said, and tried
            assert "no usable insight" in event["error"]
        else:  # offered to math, where only its own replay admits it
            offered = [c for c in memory.desk().candidates.values() if c.kind == "insight"]
            assert [(c.text, c.domain, c.parent) for c in offered] == [
                (insight, "math", item_id)]
        # tried once: later rounds leave it be
        await trio.sleep(0.6)
        assert await memory.abstract_due() == []
        assert await store.abstracted() == {(item_id, "math")}


async def test_a_note_holding_its_runs_answer_is_never_judged_on_that_run(
        tmp_path: Path, tiny: Path) -> None:
    """A worked example or a correction holds the answer of the run it came from, and a
    note quoting a question may hold its answer: a model copying it would "gain" there.
    Such a note is judged on the other questions' runs only; a rule from the same run
    that quotes no question is judged on it first."""
    questions = ["What is 12 plus 30?", "What is 13 plus 30?", "What is 14 plus 30?",
                 "What is 15 plus 30?"]
    async with peer(tmp_path, tiny) as (_, memory):
        runs: dict[str, list[str]] = {}
        for q, ref in [(questions[0], "42"), (questions[0], "41"), *(
                (q, "0") for q in questions[1:])]:  # the first question asked twice
            _, scec, _ = await memory.solve(Task(q, ref, "exact", "math"), memory=False,
                                            params=PARAMS)
            runs.setdefault(q, []).append(scec_hash(scec))
        origin, again = runs[questions[0]]
        others = {h for q in questions[1:] for h in runs[q]}
        desk = memory.desk()
        quoting = f"Question: {questions[0]}\nAnswer: 42"
        for text, kind, judged_on_origin in (
                (quoting, "example", False), (quoting, "correction", False),
                (f"For '{questions[0]}' add the tens first.", "rule", False),
                ("Add the tens first, then the ones.", "rule", True)):
            c = await desk.submit(text, "math", kind, origin=origin)
            tasks = [scec_hash(t) for t in (await desk._tasks(c))[0]]
            assert tasks and set(tasks) <= {origin, again} | others, (kind, tasks)
            if judged_on_origin:
                assert tasks[0] == origin
            else:  # neither that run nor the question's other run
                assert set(tasks) <= others, (text, kind, tasks)


def test_a_note_quotes_a_question_whitespace_aside_and_not_a_greeting() -> None:
    assert quotes("Question: What is  12 plus\n30?\nAnswer: 42", "What is 12 plus 30?")
    assert not quotes("Add the tens first.", "What is 12 plus 30?")
    assert not quotes("Hi there, add the tens.", "Hi")  # too short to say anything


@pytest.mark.parametrize("text", ['{"chat": [1e400, 2]}', '{"chat": [0.5, 1e400]}',
                                  '{"chat": [NaN, 2]}', '{"chat": [0.5, -2]}'])
def test_a_damaged_baseline_file_starts_afresh(tmp_path: Path, text: str) -> None:
    """1e400 reads as inf and int(inf) overflowed, which stopped the daemon at start; a
    NaN mean would have poisoned every later comparison with the baseline."""
    from types import SimpleNamespace

    from peerd.memory.service import BASELINE_FILE

    (tmp_path / BASELINE_FILE).write_text(text)
    baseline = Memory._load_baseline(SimpleNamespace(dir=tmp_path))  # type: ignore[arg-type]
    assert baseline.snapshot() == {}
