"""The web view (`/ui`) of in-process peers, each serving the real API (hypercorn on
loopback), read by a real headless Chromium through selenium and chromedriver.

The page loads with the token cookie and shows a 3-peer swarm with a gap in a model's
coverage; `plan.*` events published on the node's bus (the planner's contract:
docs/plans.md) appear live as steps, and so does a real plan run by the planner through
POST /v1/plans (its second step held back until the first is on the page); so do a
task's votes and an inference route.
Without a token, or with a wrong one, `/ui` answers 401 (counted), and the cookie
opens GETs only. Without chromium the browser tests skip, saying why.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from click.testing import CliRunner
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from trio_typing import TaskStatus

from peerd.api.app import create_app
from peerd.api.server import bind, serve
from peerd.api.webui import session_value
from peerd.cli import main as cli_main
from peerd.node import Node
from peerd.plans.planning import Plans as RealPlans
from peerd.plans.service import Tools
from peerd.plans.thinker import StepText
from peerd.service import EntryFields, Service
from protocols.ledger import ModelServed
from tests.harness import converged, events, gossip, rejections, swarm, wait_for

TOKEN = "test-token-0123456789"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
T = TypeVar("T")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="the web view's browser tests need Debian's `chromium` and `chromedriver` "
           "(apt-get install chromium chromium-driver; .ci/run installs them)")


@contextlib.asynccontextmanager
async def api(node: Node, token: str = TOKEN) -> AsyncIterator[str]:
    """The node's API served as the daemon serves it, on a free loopback port."""
    config, sockets = bind("127.0.0.1", 0)
    port = sockets.insecure_sockets[0].getsockname()[1]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, create_app(node, token), config, sockets, shutdown)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            shutdown.set()
            nursery.cancel_scope.deadline = trio.current_time() + 3.0


async def off_loop(fn: Callable[[], T]) -> T:
    """Blocking clients (httpx, selenium) run in a thread while trio serves the API."""
    return await trio.to_thread.run_sync(fn)


class Shards(Service):
    """A stand-in for the model service: advertises layer ranges, loads nothing."""

    name = "shards"

    def __init__(self, *models: ModelServed) -> None:
        self.models = models

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()

    def entry_fields(self) -> EntryFields:
        return {"models": self.models}


def shard(start: int, end: int, layers: int = 6) -> ModelServed:
    return ModelServed("tiny", start, end, "float32", tokens_per_s=50.0, num_layers=layers)


# ---- the token, the cookie, and what the cookie opens (no browser needed) -------------


async def test_ui_token_cookie_and_refusals(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as (node,), api(node) as url:
        def check() -> dict[str, Any]:
            out: dict[str, Any] = {}
            bare = httpx.get(f"{url}/ui", timeout=5.0)
            out["bare"] = (bare.status_code, bare.headers["content-type"], bare.text)
            out["asset_bare"] = httpx.get(f"{url}/ui/app.js", timeout=5.0).status_code
            wrong = httpx.get(f"{url}/ui", params={"token": "nope"}, timeout=5.0)
            out["wrong"] = (wrong.status_code, wrong.text)
            login = httpx.get(f"{url}/ui", params={"token": TOKEN}, timeout=5.0)
            out["login"] = (login.status_code, login.headers.get("location"),
                            login.headers.get("set-cookie", ""))
            with httpx.Client(base_url=url, cookies=login.cookies, timeout=5.0) as c:
                out["page"] = (c.get("/ui").status_code, c.get("/ui").text)
                js = c.get("/ui/app.js")
                out["js"] = (js.status_code, js.headers["content-type"],
                             js.headers["content-security-policy"])
                out["css"] = c.get("/ui/app.css").status_code
                out["unknown_asset"] = c.get("/ui/secret.py").status_code
                out["status"] = c.get("/status").status_code
                out["ledger"] = c.get("/ledger").status_code
                out["post"] = c.post("/capabilities", json={"skills": ["x"]}).status_code
            bearer = httpx.get(f"{url}/ui", timeout=5.0,
                               headers={"Authorization": f"Bearer {TOKEN}"})
            out["bearer"] = bearer.status_code
            forged = httpx.get(f"{url}/status", timeout=5.0,
                               cookies={next(iter(login.cookies.keys())): "0" * 64})
            out["forged"] = forged.status_code
            return out

        before = rejections(node).get("api_unauthorized", 0.0)
        got = await off_loop(check)
        after = rejections(node).get("api_unauthorized", 0.0)

    status, ctype, text = got["bare"]
    assert status == 401 and ctype.startswith("text/html") and "peerd ui" in text
    assert got["asset_bare"] == 401
    assert got["wrong"][0] == 401 and "not this daemon" in got["wrong"][1]
    code, location, cookie = got["login"]
    assert code == 303 and location == "/ui"
    port = url.rsplit(":", 1)[1]
    assert cookie.startswith(f"peerd_ui_{port}={session_value(TOKEN)};"), cookie
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert TOKEN not in cookie  # a MAC of the token, never the token itself
    assert got["page"][0] == 200 and '<script src="/ui/app.js">' in got["page"][1]
    assert got["js"][0] == 200 and got["js"][1].startswith("text/javascript")
    assert "script-src 'self'" in got["js"][2]
    assert got["css"] == 200 and got["unknown_asset"] == 404
    assert got["status"] == 200 and got["ledger"] == 200
    assert got["post"] == 401  # changing state stays bearer-only
    assert got["bearer"] == 200 and got["forged"] == 401
    # bare page, bare asset, wrong token, forged cookie, cookie on a POST
    assert after - before == 5


async def test_peerd_ui_prints_the_address_with_the_token(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as (node,), api(node) as url:
        result = await off_loop(lambda: CliRunner().invoke(
            cli_main, ["ui", "--json", "--api", url, "--token", TOKEN]))
        refused = await off_loop(lambda: CliRunner().invoke(
            cli_main, ["ui", "--api", url, "--token", "wrong"]))
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out == {"url": f"{url}/ui?token={TOKEN}", "api": url, "opened": False}
    assert refused.exit_code == 1


# ---- the page in a real browser -------------------------------------------------------


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--disable-extensions"):
        options.add_argument(flag)
    driver = await off_loop(lambda: webdriver.Chrome(
        service=DriverService(CHROMEDRIVER or ""), options=options))
    try:
        yield driver
    finally:
        await off_loop(driver.quit)


async def until(driver: Any, what: str, predicate: Callable[[Any], T],
                timeout_s: float = 10.0) -> T:
    """Wait in the browser for `predicate(driver)` and return its value; on timeout, say
    what and show the page's text. The page re-renders every poll, so a predicate
    returns text, never elements (they go stale), and an element that went stale
    while it was read means: look again."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    def wait() -> T:
        try:
            return WebDriverWait(driver, timeout_s, poll_frequency=0.05, ignored_exceptions=(
                NoSuchElementException, StaleElementReferenceException)).until(predicate)
        except TimeoutException:
            body = driver.find_element("tag name", "body").text
            raise AssertionError(f"the page never showed {what}; it shows:\n{body}") from None

    return await off_loop(wait)


def texts(driver: Any, css: str) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", css)]


def attribute(driver: Any, css: str, name: str) -> str | None:
    found = driver.find_elements("css selector", css)
    return found[0].get_attribute(name) if found else None


@needs_browser
async def test_page_shows_the_swarm_its_gap_and_a_plan_live(tmp_path: Path) -> None:
    async with swarm(3, tmp_path, connect="star") as nodes:
        # tiny has 6 layers: [0, 2) and [1, 4) are served, [4, 6) by nobody
        for node, served in zip(nodes, [(shard(0, 2),), (shard(1, 4),), ()], strict=True):
            await node.start(Shards(*served))
            gossip(node).refresh()
        await wait_for(lambda: converged(nodes), what="the ledgers to converge")
        hub = nodes[0]
        async with api(hub) as url, browser() as driver:
            await off_loop(lambda: driver.get(f"{url}/ui?token={TOKEN}"))
            assert driver.current_url == f"{url}/ui"  # the token left the address bar
            assert await off_loop(lambda: driver.execute_script("return document.cookie")) == ""
            rows = await until(driver, "three peers", lambda d: len(
                found := texts(d, "#peer-table tbody tr")) == 3 and found)
            assert [r.split()[0] for r in rows] == ["n0", "n1", "n2"], rows
            states = await until(driver, "their states", lambda d: texts(
                d, "#peer-table td.state"))
            assert states == ["this peer", "connected", "connected"]
            assert "tiny [0, 2)" in rows[0] and "tiny [1, 4)" in rows[1]
            gap = await until(driver, "the gap [4, 6)", lambda d: texts(
                d, '.model[data-model="tiny"] .gap[data-gap="4-6"]'))
            assert [g.strip() for g in gap] == ["layers [4, 6)"]
            # the planner is not on this branch: /v1/plans is 404 and the page says so
            await until(driver, "the no-plans-API note", lambda d: d.find_element(
                "id", "plans-note").is_displayed())

            # A plan, event by event, as the planner publishes it: each shows up live.
            bus = hub.events
            peer1, peer2 = nodes[1].peer_id, nodes[2].peer_id
            plan = '.plan[data-plan="p-1"]'
            bus.publish("plan.created", plan="p-1", step=0, goal="add two numbers",
                        mode="sync", budget={"steps": 4, "tokens": 512, "wall_s": 60,
                                             "calls": 8})
            bus.publish("plan.thought", plan="p-1", step=1, text="use the calculator",
                        tokens=12, elapsed_s=0.4)
            await until(driver, "the plan's thought", lambda d: "use the calculator" in
                        d.find_element("css selector", f"{plan} .step").text)
            bus.publish("plan.call", plan="p-1", step=1, call_id="c1", tool="calculator",
                        arguments={"expression": "2 + 3"})
            bus.publish("plan.call", plan="p-1", step=1, call_id="c2", tool="calculator",
                        arguments={"expression": "4 * 5"})
            call1 = f'{plan} .call[data-call="c1"]'
            await until(driver, "the running call", lambda d: attribute(
                d, call1, "data-outcome") == "running")
            bus.publish("plan.retry", plan="p-1", step=1, call_id="c2", tool="calculator",
                        peer=peer2, attempt=1, reason="deadline")
            bus.publish("plan.result", plan="p-1", step=1, call_id="c1", tool="calculator",
                        peer=peer1, ok=True, code="ok", elapsed_s=0.12, attempts=1,
                        observation='{"value": "5"}')
            bus.publish("plan.result", plan="p-1", step=1, call_id="c2", tool="calculator",
                        peer=peer1, ok=True, code="ok", elapsed_s=1.5, attempts=2,
                        observation='{"value": "20"}')
            first, second = await until(driver, "both results", lambda d: len(
                found := texts(d, f"{plan} .call")) == 2 and all(
                " ok" in t for t in found) and found)
            assert "calculator" in first and "n1" in first and '"value": "5"' in first
            assert "2 attempts" in second and "retry: attempt 1" in second
            assert "n2" in second and "deadline" in second
            bus.publish("plan.replan", plan="p-1", step=2, reason="second call was slow")
            bus.publish("plan.answer", plan="p-1", step=3, text="5 and 20")
            await until(driver, "the answer", lambda d: attribute(
                d, plan, "data-status") == "answered")
            ends = await until(driver, "the answer and replan", lambda d: (
                texts(d, f"{plan} .answer"), texts(d, f"{plan} .replan"), len(
                    d.find_elements("css selector", f"{plan} .step"))))
            assert ends == (["answer: 5 and 20"], ["replan: second call was slow"], 2)

            # A Symphony task and an inference route, from their events.
            bus.publish("task.beacon", task_id="t-1", workers=2, requirement="arithmetic",
                        answer_format="number")
            bus.publish("task.answer", task_id="t-1", seat=0, peer_id=peer1, answer="42",
                        confidence=0.9, elapsed_s=0.3)
            bus.publish("task.done", task_id="t-1", status="done", answer="42",
                        total_ms=420.0)
            bus.publish("inference.completed", model="tiny", chat=True, stream=False,
                        route=[{"peer_id": hub.peer_id, "layers": [0, 2]},
                               {"peer_id": peer1, "layers": [2, 4]}],
                        prompt_tokens=7, completion_tokens=5, tokens_per_s=20.0,
                        wall_ms=250.0, pipeline_ms=200.0, compute_ms=50.0, head_ms=10.0,
                        draft_ms=0.0, steps=5, reroutes=0, cached_tokens=0, draft="none",
                        finish_reason="length")
            task = await until(driver, "the task's vote", lambda d: texts(
                d, '.task[data-task="t-1"] td'))
            assert task[:2] == ["n1 " + peer1[-8:], "42"]
            hops = await until(driver, "the route's hops", lambda d: texts(
                d, "tr.inference .hop"))
            assert hops == [f"n0 {hub.peer_id[-8:]} [0, 2)",
                                              f"n1 {peer1[-8:]} [2, 4)"]
            logs = await off_loop(lambda: driver.get_log("browser"))
            assert not [entry for entry in logs if entry["level"] == "SEVERE"
                        and "/v1/" not in entry["message"]], logs


class Plans(Service):
    """A stand-in for the planner's API (docs/plans.md's record shape): one finished
    plan whose events the page never saw."""

    name = "plans"

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()

    def routes(self) -> list[Route]:
        async def listing(request: Request) -> Response:
            return JSONResponse([{k: self.record[k] for k in ("id", "goal", "status",
                                                               "created")}])

        async def one(request: Request) -> Response:
            if request.path_params["plan_id"] != self.record["id"]:
                return JSONResponse({"error": {"message": "no such plan"}}, 404)
            return JSONResponse(self.record)

        return [Route("/v1/plans", listing), Route("/v1/plans/{plan_id}", one)]


@needs_browser
async def test_page_reads_plan_records_it_missed(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as (node,):
        record = {
            "id": "p-old", "goal": "find the file size", "mode": "async",
            "status": "failed", "created": 1.0, "finished": 3.5,
            "budget": {"steps": 2, "tokens": 256, "wall_s": 30, "calls": 4},
            "used": {"steps": 2, "tokens": 100, "wall_s": 2.5, "calls": 1},
            "steps": [{"step": 1, "thought": "read it", "calls": [{
                "call_id": "k1", "tool": "read_file", "arguments": {"path": "a.txt"},
                "peer": node.peer_id, "ok": False, "code": "tool_error", "elapsed_s": 0.2,
                "attempts": 3, "observation": "no such file"}]}],
            "answer": None, "reason": "budget_steps"}
        await node.start(Plans(record))
        async with api(node) as url, browser() as driver:
            await off_loop(lambda: driver.get(f"{url}/ui?token={TOKEN}"))
            plan = '.plan[data-plan="p-old"]'
            shown = await until(driver, "the plan's record", lambda d: (
                attribute(d, plan, "data-status"), texts(d, f"{plan} .call"),
                texts(d, f"{plan} .failed-reason"), d.find_element(
                    "id", "plans-note").is_displayed()) if texts(d, f"{plan} .call")
                else None)
    status, calls, reason, note = shown
    assert status == "failed" and reason == ["failed: budget_steps"] and not note
    assert len(calls) == 1 and "read_file" in calls[0] and "tool_error" in calls[0]
    assert "3 attempts" in calls[0] and "no such file" in calls[0]


class GatedThinker:
    """A scripted plan whose second step waits for the test: the first step's call and
    result must be on the page while the plan still runs."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.steps = 0

    async def think(self, transcript: Any) -> StepText:
        self.steps += 1
        if self.steps == 1:
            return StepText(json.dumps({"thought": "multiply with the calculator", "calls": [
                {"tool": "calculator", "arguments": {"expression": "6 * 7"}}]}), 12)
        await self.release.wait()
        return StepText(json.dumps({"thought": "the calculator said 42",
                                    "answer": "6 * 7 = 42"}), 9)


@needs_browser
async def test_a_real_plan_appears_live_step_by_step(tmp_path: Path) -> None:
    async with swarm(2, tmp_path, connect="star") as (a, b):
        thinker = GatedThinker()
        tools = Tools(a, gossip(a), builtins=[("calculator", None)])
        await a.start(tools, RealPlans(a, tools, tmp_path, thinker=lambda: thinker))
        await b.start(Tools(b, gossip(b), builtins=[("calculator", None)]))
        for node in (a, b):
            gossip(node).refresh()
        await wait_for(lambda: len(list(tools.offers())) == 2, what="both calculators")
        async with api(a) as url, browser() as driver:
            await off_loop(lambda: driver.get(f"{url}/ui?token={TOKEN}"))
            async with httpx.AsyncClient(base_url=url, timeout=30.0, headers={
                    "Authorization": f"Bearer {TOKEN}"}) as client:
                got = await client.post("/v1/plans", json={"goal": "What is 6 * 7?"})
                assert got.status_code == 200, got.text
                plan_id = got.json()["id"]
            plan = f'.plan[data-plan="{plan_id}"]'
            call = await until(driver, "the first step's call and its result", lambda d: (
                found := texts(d, f"{plan} .call")) and "42" in found[0] and found)
            assert "calculator" in call[0]
            # read through `until`: the page re-renders, so an element can go stale
            status, answers = await until(driver, "the plan still running", lambda d: (
                attribute(d, plan, "data-status"), texts(d, f"{plan} .answer")))
            assert (status, answers) == ("running", [])
            thinker.release.set()
            answer = await until(driver, "the answer", lambda d: texts(d, f"{plan} .answer"))
            assert answer == ["answer: 6 * 7 = 42"]
            assert await until(driver, "the plan answered", lambda d: attribute(
                d, plan, "data-status") == "answered")
            note = await until(driver, "the plans note's state", lambda d: (
                d.find_element("id", "plans-note").is_displayed(),))
            assert note == (False,)  # the planner's API answers


STALE_MERGE = """
const pid = arguments[0], peer = arguments[1];
onPlanEvent({type: "plan.created", plan: pid, goal: "What is 6 * 7?", mode: "sync", ts: 1});
onPlanEvent({type: "plan.thought", plan: pid, step: 1, text: "use the calculator"});
onPlanEvent({type: "plan.call", plan: pid, step: 1, call_id: "c1", tool: "calculator",
             arguments: {expression: "6 * 7"}});
onPlanEvent({type: "plan.result", plan: pid, step: 1, call_id: "c1", tool: "calculator",
             peer: peer, ok: true, code: "ok", elapsed_s: 0.1, attempts: 1,
             observation: '{"call": "c1", "result": 42}'});
onPlanEvent({type: "plan.answer", plan: pid, step: 2, text: "42", ts: 2});
// the plan as GET /v1/plans/ID answered it before the result: its reply came last
mergePlanRecord({id: pid, goal: "What is 6 * 7?", mode: "sync", status: "running",
  created: 1, finished: null, answer: null, reason: null,
  steps: [{step: 1, thought: "use the calculator", parsed: true, calls: [
    {call_id: "c1", tool: "calculator", arguments: {expression: "6 * 7"}, peer: "",
     ok: null, code: "", elapsed_s: 0, attempts: 0, observation: ""}]}]});
"""


@needs_browser
async def test_a_snapshot_read_before_live_events_does_not_undo_them(tmp_path: Path) -> None:
    """The page reads a plan over the API (GET /v1/plans/ID) while its events stream in;
    a reply that left the daemon before the call's result and arrives after it must not
    take the result's peer and observation, or the plan's answer, back off the page."""
    async with swarm(1, tmp_path) as (node,), api(node) as url, browser() as driver:
        await off_loop(lambda: driver.get(f"{url}/ui?token={TOKEN}"))
        await until(driver, "the page's plans section", lambda d: d.find_elements(
            "id", "plan-list"))
        await off_loop(lambda: driver.execute_script(STALE_MERGE, "p-stale", node.peer_id))
        plan = '.plan[data-plan="p-stale"]'
        call = await until(driver, "the call with its result", lambda d: (
            found := texts(d, f"{plan} .call")) and found)
        assert "42" in call[0] and "ok" in call[0]
        assert node.peer_id[-8:] in call[0], call  # the page shows a peer by its last 8
        assert attribute(driver, plan, "data-status") == "answered"
        assert texts(driver, f"{plan} .answer") == ["answer: 42"]


@needs_browser
async def test_page_without_a_token_says_how_to_open_it(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as (node,), api(node) as url, browser() as driver:
        before = rejections(node).get("api_unauthorized", 0.0)
        await off_loop(lambda: driver.get(f"{url}/ui"))
        assert "peerd ui" in driver.find_element("tag name", "body").text
        await off_loop(lambda: driver.get(f"{url}/ui?token=wrong"))
        assert "not this daemon" in driver.find_element("tag name", "body").text
        assert driver.find_elements("id", "peer-table") == []
        assert rejections(node).get("api_unauthorized", 0.0) - before == 2


# ---- the inference route the page shows: `inference.completed` -----------------------


async def test_openai_requests_publish_their_route(tmp_path: Path) -> None:
    """A request through a 2-peer pipeline, posted whole and streamed, each ends with an
    `inference.completed` event naming its hops and timings."""
    from peerd.inference.slot import ModelOptions
    from tests.harness import book, serve_model
    from tests.models import tiny_llama_dir

    tiny = tiny_llama_dir(tmp_path / "models")
    async with swarm(2, tmp_path, connect="star", heartbeat_s=2.0) as (entry, other):
        for node, layers in ((entry, (0, 2)), (other, (2, 4))):
            await serve_model(node, ModelOptions(str(tiny), layers=layers,
                                                 dtype="float32", torch_threads=1))
        await wait_for(lambda: sum(1 for e in book(entry).entries() if e.models) == 2,
                       15, "the entry peer to know both shards")
        async with api(entry) as url:
            def post() -> list[int]:
                auth = {"Authorization": f"Bearer {TOKEN}"}
                with httpx.Client(base_url=url, headers=auth, timeout=60.0) as c:
                    model = c.get("/v1/models").json()["data"][0]["id"]
                    body = {"model": model, "prompt": "hello", "max_tokens": 3}
                    whole = c.post("/v1/completions", json=body)
                    streamed = c.post("/v1/completions", json={**body, "stream": True})
                    return [whole.status_code, streamed.status_code]

            assert await off_loop(post) == [200, 200]
            await wait_for(lambda: len(events(entry, "inference.completed")) == 2, 10,
                           "two inference.completed events")
    done = [e.data for e in events(entry, "inference.completed")]
    assert [d["stream"] for d in done] == [False, True]
    for d in done:
        assert d["route"] == [{"peer_id": entry.peer_id, "layers": [0, 2]},
                              {"peer_id": other.peer_id, "layers": [2, 4]}]
        assert d["completion_tokens"] == 3 and d["chat"] is False
        assert d["wall_ms"] > 0 and d["pipeline_ms"] > 0 and d["reroutes"] == 0
