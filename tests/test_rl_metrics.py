"""Echo on /metrics, scraped through the real app after a short run on in-process
hosts: a trainer and two samplers (tiny random Llama), one of them lying about its
log-probs so that refusals are counted by reason. Every figure is checked against
what the run and the samplers counted themselves (GET /v1/rl/runs/ID, /status)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from peerd.api.app import create_app
from peerd.node import Node
from tests.models import tiny_llama_dir
from tests.rl_swarm import lie, rl_swarm, seven_task

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return seven_task(tmp_path)


@contextlib.asynccontextmanager
async def client(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(node, TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://peerd", headers=AUTH,
                                 timeout=30.0) as c:
        yield c


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(c: httpx.AsyncClient) -> Samples:
    r = await c.get("/metrics")
    assert r.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no {name}{labels} in {sorted(k for k, _ in samples)}"
    return samples[key]


async def test_a_run_and_its_samplers_on_metrics(tmp_path: Path, tiny: Path,
                                                 task: Path) -> None:
    async with rl_swarm(tmp_path, tiny) as (training, (honest, liar)):
        lie(liar, 0.5)
        async with client(training.node) as c:
            r = await c.post("/v1/rl/runs", json={
                "model": str(tiny), "task": str(task), "run_id": "m", "group": 8,
                "batch": 4, "steps": 3, "max_tokens": 3, "lr": 0.02, "seed": 1})
            assert r.status_code == 202, r.text
            run = training.runs["m"]
            with trio.fail_after(120):
                await run.ended.wait()
            out = (await c.get("/v1/rl/runs/m")).json()
            assert out["state"] == "done", out
            got = await scrape(c)
        m = {"run": "m"}
        assert value(got, "peerd_rl_run_info", run="m", mode="sync", update="full",
                     state="done") == 1
        trained = 3 * 4 * 8
        assert value(got, "peerd_rl_rollouts_trained_total", **m) == out["samples"] == trained
        assert value(got, "peerd_rl_rollouts_admitted_total", **m) == out["admitted"]
        # the liar's groups were admitted, then refused at verification
        assert out["refused"].get("verification", 0) > 0
        for reason, n in out["refused"].items():
            assert value(got, "peerd_rl_rollouts_refused_total", run="m", reason=reason) == n
        assert out["admitted"] == trained + out["refused"]["verification"] + out["waiting"]
        # sync: every rollout trained on at staleness 0
        assert value(got, "peerd_rl_trained_staleness_bucket", le="0.0", **m) == trained
        assert value(got, "peerd_rl_trained_staleness_bucket", le="+Inf", **m) == trained
        assert value(got, "peerd_rl_trained_staleness_count", **m) == trained
        assert value(got, "peerd_rl_trained_staleness_sum", **m) == 0
        assert value(got, "peerd_rl_steps_total", **m) == 3
        assert value(got, "peerd_rl_policy_version", **m) == 3
        for name, key in (("peerd_rl_trainer_idle_seconds_total", "trainer_idle_s"),
                          ("peerd_rl_train_seconds_total", "train_s"),
                          ("peerd_rl_verify_seconds_total", "verify_s"),
                          ("peerd_rl_weight_sync_seconds_total", "sync_s")):
            seconds = value(got, name, **m)
            assert seconds > 0 and abs(seconds - out[key]) < 0.01, (name, seconds, out)
        assert value(got, "peerd_rl_last_weight_sync_seconds", **m) == out["last"]["sync_s"]
        assert value(got, "peerd_rl_samples_per_second", **m) > 0
        assert value(got, "peerd_rl_skipped_groups_total", **m) == out["skipped_groups"]

        for service in (honest, liar):
            s = service.sampler
            async with client(service.node) as c:
                got = await scrape(c)
                status = (await c.get("/status")).json()["rollout"]
            served = value(got, "peerd_rl_sampler_requests_served_total")
            assert served == s.requests_served == status["requests_served"] > 0
            produced = value(got, "peerd_rl_sampler_rollouts_produced_total")
            # a request carries the sampler's share of a step's prompts, 8 rollouts each
            assert produced == s.rollouts_produced and produced % 8 == 0
            assert produced >= 8 * served
            assert value(got, "peerd_rl_sampler_policy_version") == s.policy.version
            assert value(got, "peerd_rl_sampler_requests_in_hand") == 0
            assert 0 < value(got, "peerd_rl_sampler_idle_seconds_total") <= s.idle_s()
            # pulls are the weights service's, not counted twice
            pulls = value(got, "peerd_weights_pulls_total")
            assert pulls >= 1 or service is liar  # the liar may be dropped before a pull
            assert not any(name.startswith("peerd_rl_sampler_pull") for name, _ in got)
        assert honest.sampler.policy.version >= 2


async def test_async_staleness_is_a_cumulative_histogram(tmp_path: Path, tiny: Path,
                                                         task: Path) -> None:
    async with rl_swarm(tmp_path, tiny) as (training, _), client(training.node) as c:
        r = await c.post("/v1/rl/runs", json={
            "model": str(tiny), "task": str(task), "run_id": "a", "mode": "async",
            "staleness": 1, "group": 8, "batch": 4, "steps": 3, "max_tokens": 3,
            "lr": 0.02, "seed": 1})
        assert r.status_code == 202, r.text
        with trio.fail_after(120):
            await training.runs["a"].ended.wait()
        out = (await c.get("/v1/rl/runs/a")).json()
        got = await scrape(c)
    assert out["state"] == "done", out
    histogram = {int(k): v for k, v in out["staleness"].items()}
    assert set(histogram) <= {0, 1} and sum(histogram.values()) == 3 * 4 * 8
    a = {"run": "a"}
    assert value(got, "peerd_rl_trained_staleness_bucket", le="0.0", **a) == histogram.get(0, 0)
    assert value(got, "peerd_rl_trained_staleness_bucket", le="1.0", **a) == 3 * 4 * 8
    assert value(got, "peerd_rl_trained_staleness_bucket", le="+Inf", **a) == 3 * 4 * 8
    assert value(got, "peerd_rl_trained_staleness_sum", **a) == histogram.get(1, 0)
    assert value(got, "peerd_rl_run_info", run="a", mode="async", update="full",
                 state="done") == 1
    for reason, n in out["refused"].items():  # async may refuse stale groups
        assert value(got, "peerd_rl_rollouts_refused_total", run="a", reason=reason) == n
