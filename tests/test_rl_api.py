"""POST /v1/rl/runs and GET /v1/rl/runs[/{id}] on the real app of an in-process peer
running the RL service (as every daemon does): every bad body is refused in OpenAI's
error shape naming the field, and the peer goes on serving; a good one starts a run
that GET shows and lists."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from peerd.api.app import create_app
from peerd.rl.training import Training
from peerd.rl.weights import WeightStore
from tests.harness import gossip, swarm, wait_for
from tests.models import tiny_llama_dir
from tests.rl_swarm import seven_task

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return seven_task(tmp_path)


@contextlib.asynccontextmanager
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Training]]:
    """A trainer peer's API, with no sampler anywhere."""
    async with swarm(1, tmp_path, connect="none") as (node,):
        weights = WeightStore(node)
        training = Training(node, gossip(node), weights, tmp_path / "data")
        await node.start(weights, training)
        app = create_app(node, TOKEN)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://peerd", headers=AUTH,
                                     timeout=30.0) as client:
            yield client, training


def bad_bodies(tiny: Path, task: Path) -> list[tuple[Any, str]]:
    """(body, the field the 400 names) for each kind of mistake."""
    ok = {"model": str(tiny), "task": str(task)}
    return [
        ([], "body"), ("model", "body"), (None, "body"), (42, "body"),
        ({}, "model"),  # the one required setting
        ({"task": str(task)}, "model"),
        ({**ok, "modle": "x"}, "modle"),  # unknown field
        # wrong types, one of each kind of field
        ({**ok, "model": 7}, "model"), ({**ok, "task": ["add"]}, "task"),
        ({**ok, "mode": None}, "mode"),
        ({**ok, "steps": "10"}, "steps"), ({**ok, "steps": 2.5}, "steps"),
        ({**ok, "steps": True}, "steps"), ({**ok, "group": {"n": 4}}, "group"),
        ({**ok, "lr": "0.1"}, "lr"), ({**ok, "lr": False}, "lr"),
        ({**ok, "resume": 1}, "resume"), ({**ok, "resume": "yes"}, "resume"),
        # out of range, and values that are not one of a few
        ({**ok, "group": 1}, "group"), ({**ok, "batch": 0}, "batch"),
        ({**ok, "steps": 10**30}, "steps"), ({**ok, "lr": 10**400}, "lr"),
        ({**ok, "seed": -1}, "seed"), ({**ok, "staleness": 65}, "staleness"),
        ({**ok, "temperature": 0.0}, "temperature"), ({**ok, "top_p": 1.5}, "top_p"),
        ({**ok, "max_tokens": 100_000}, "max_tokens"),
        ({**ok, "mode": "turbo"}, "mode"), ({**ok, "update": "qlora"}, "update"),
        ({**ok, "aggregation": "max"}, "aggregation"),
        ({**ok, "run_id": "../../etc"}, "run_id"), ({**ok, "model": "  "}, "model"),
        ({**ok, "out": "/tmp/a\0b"}, "out"),  # no such path: it was a 500
        # what the run needs must be here: the model SPEC and the task
        ({**ok, "model": "no/such-model-here"}, "model"),
        ({**ok, "model": str(tiny / "nope")}, "model"),
        ({**ok, "task": str(task.parent / "missing.jsonl")}, "task"),
        ({**ok, "task": "chess"}, "task"),
        ({**ok, "task": str(task.parent / "broken.jsonl")}, "task"),
    ]


def refused(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error
    return error


async def test_every_bad_body_is_a_400_naming_the_field(tmp_path: Path, tiny: Path,
                                                        task: Path) -> None:
    (task.parent / "broken.jsonl").write_text('{"prompt": "2+2?", "answer": "four"}\n')
    async with api(tmp_path) as (client, training):
        for body, param in bad_bodies(tiny, task):
            error = refused(await client.post("/v1/rl/runs", json=body), 400, param)
            assert param in error["message"] or param == "body", (body, error)
        for raw in (b"{not json", b"", b'{"model": "x"', "\u00e9".encode("latin-1"),
                    b"[" * 30_000 + b"]" * 30_000,
                    b'{"model": ' + b"[" * 40 + b"]" * 40 + b"}"):
            refused(await client.post("/v1/rl/runs", content=raw), 400, "body")
        refused(await client.post("/v1/rl/runs", content=b'{"model": "m", "lr": NaN}'), 400,
                "lr")  # Python's parser takes NaN; the range check does not
        refused(await client.post("/v1/rl/runs", json={"model": str(tiny), "task": str(task),
                                                       "pad": "x" * 70_000}), 413, "body")
        error = refused(await client.post("/v1/rl/runs", json={"model": str(tiny),
                                                               "task": "chess"}), 400, "task")
        assert error["code"] == "task_not_found" and "'add'" in error["message"]
        error = refused(await client.post("/v1/rl/runs", json={"model": "nope-x"}), 400,
                        "model")
        assert error["code"] == "model_not_found" and "nope-x" in error["message"]
        assert training.runs == {}  # nothing started, nothing half-made
        assert not (tmp_path / "data" / "rl").exists()
        # the peer goes on serving
        assert (await client.get("/v1/rl/runs")).json() == []
        assert (await client.get("/status")).status_code == 200


async def test_runs_that_cannot_start_here_are_409_naming_what_to_change(
        tmp_path: Path, tiny: Path, task: Path) -> None:
    ok = {"model": str(tiny), "task": str(task), "sampler_wait_s": 600.0}
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    held = tmp_path / "held"
    (held / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    async with api(tmp_path) as (client, training):
        error = refused(await client.post("/v1/rl/runs", json={**ok, "out": str(a_file / "run")}),
                        409, "out")
        assert error["code"] == "run_refused" and str(a_file) in error["message"]
        error = refused(await client.post("/v1/rl/runs", json={
            **ok, "out": str(tmp_path / "empty"), "resume": True}), 409, "resume")
        assert "nothing to resume" in error["message"]
        error = refused(await client.post("/v1/rl/runs", json={**ok, "out": str(held)}),
                        409, "out")
        assert "already holds a run" in error["message"]
        assert training.runs == {}
        # a good one: 202 with the run, then GET shows it and the list has it
        r = await client.post("/v1/rl/runs", json={**ok, "run_id": "good", "steps": 2})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["id"] == "good" and body["spec"]["steps"] == 2
        assert body["state"] in ("starting", "waiting") and body["step"] == 0
        assert Path(body["dir"]) == tmp_path / "data" / "rl" / "good"
        assert json.loads((Path(body["dir"]) / "run.json").read_text())["run_id"] == "good"
        got = (await client.get("/v1/rl/runs/good"))
        assert got.status_code == 200 and got.json()["id"] == "good"
        listed = (await client.get("/v1/rl/runs")).json()
        assert [x["id"] for x in listed] == ["good"]
        # one run at a time
        error = refused(await client.post("/v1/rl/runs", json={**ok, "run_id": "second"}),
                        409, None)
        assert "'good' is still going" in error["message"]
        # it waits for samplers (none here), and says so
        await wait_for(lambda: training.runs["good"].to_json()["state"] == "waiting", 60)
        got = (await client.get("/v1/rl/runs/good")).json()
        assert "samplers: 0 of 1" in got["waiting_for"]
        assert "second" not in training.runs


async def test_unknown_ids_are_404_and_a_missing_token_401(tmp_path: Path) -> None:
    async with api(tmp_path) as (client, _):
        for run_id in ("nope", "a.b_c-1", "%20", "x" * 300):
            r = await client.get(f"/v1/rl/runs/{run_id}")
            assert r.status_code == 404, (run_id, r.text)
            assert r.json()["error"]["code"] == "not_found"
        for method, path in (("GET", "/v1/rl/runs"), ("GET", "/v1/rl/runs/x"),
                             ("POST", "/v1/rl/runs")):
            r = await client.request(method, path, headers={"Authorization": ""})
            assert r.status_code == 401, (method, path)
            assert r.json()["error"]["type"] == "authentication_error"
            r = await client.request(method, path, headers={"Authorization": "Bearer no"})
            assert r.status_code == 401
        r = await client.put("/v1/rl/runs", json={})
        assert r.status_code == 405
        # the scrape works with no run, and shows the families
        text = (await client.get("/metrics")).text
        assert "# TYPE peerd_rl_rollouts_refused_total counter" in text
        assert "# TYPE peerd_rl_trained_staleness histogram" in text


async def test_two_runs_asked_at_once_start_one(tmp_path: Path, tiny: Path, task: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The busy check and the run's start had an await between them (preparing its
    dir): two requests at once both started a learner. One starts; the other is a 409."""
    import peerd.rl.training as training_module

    prepare = training_module._prepare_dir

    def slow_prepare(*args: Any) -> None:
        time.sleep(0.3)  # (a worker thread) the window a second request lands in
        prepare(*args)

    monkeypatch.setattr(training_module, "_prepare_dir", slow_prepare)
    ok = {"model": str(tiny), "task": str(task), "sampler_wait_s": 600.0}
    async with api(tmp_path) as (client, training):
        answers: dict[str, httpx.Response] = {}

        async def ask(run_id: str) -> None:
            answers[run_id] = await client.post("/v1/rl/runs", json={**ok, "run_id": run_id})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "one")
            nursery.start_soon(ask, "two")
        assert sorted(a.status_code for a in answers.values()) == [202, 409], \
            {k: a.text for k, a in answers.items()}
        (started,) = [k for k, a in answers.items() if a.status_code == 202]
        (other,) = set(answers) - {started}
        error = refused(answers[other], 409, None)
        assert error["code"] == "run_refused" and f"{started!r} is still going" in \
            error["message"]
        assert list(training.runs) == [started]
        assert not (tmp_path / "data" / "rl" / other).exists()

