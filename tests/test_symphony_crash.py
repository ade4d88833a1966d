"""Symphony across real `peerd start` processes serving a tiny random Llama.

An elected worker is killed mid-task (it announced `task.solving`, then sits in the
test-only delay PEERD_TEST_TASK_DELAY_S): the task completes through the next
bidder. The answers of a random model mean nothing; the fallback path is what is
tested. Then `peerd task` prints the vote and who was elected.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    Daemon,
    daemon_logs_on_failure,
    run_cli,
    running,
    start_daemon,
    wait_for,
)
from models import tiny_llama_dir

SKILL = "arithmetic word problems"
LEXICAL = {"PEERD_SKILL_MATCHER": "lexical"}
READY_TIMEOUT_S = 60.0


def events(daemon: Daemon, types: str, timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """Recent events of these types (GET /events?replay=256), until the replay runs dry."""
    out: list[dict[str, Any]] = []
    try:
        with httpx.stream("GET", f"{daemon.url}/events",
                          params={"replay": "256", "types": types},
                          headers={"Authorization": f"Bearer {daemon.token}"},
                          timeout=httpx.Timeout(5.0, read=timeout_s)) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(json.loads(line[6:]))
    except httpx.ReadTimeout:
        pass
    return out


def post_task(daemon: Daemon, **body: Any) -> httpx.Response:
    return httpx.post(f"{daemon.url}/v1/tasks", json=body, timeout=120.0,
                      headers={"Authorization": f"Bearer {daemon.token}"})


@pytest.fixture(scope="module")
def trio_of_peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, ...]]:
    """A: requester, no model. B: the best match, slow on purpose. C: a poor match."""
    tiny = tiny_llama_dir(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("symphony")
    model = ("--model", str(tiny), "--layers", "0:4", "--torch-threads", "1")
    with contextlib.ExitStack() as stack:
        a = start_daemon(tmp / "a", "--name", "alpha", env=LEXICAL)
        stack.enter_context(running(a))
        # B and C start side by side: a daemon's start-up is mostly imports.
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(start_daemon, tmp / "b", "--name", "beta", "--bootstrap",
                            a.p2p_addr, *model, "--skill", SKILL,
                            env={**LEXICAL, "PEERD_TEST_TASK_DELAY_S": "60"}),
                pool.submit(start_daemon, tmp / "c", "--name", "gamma", "--bootstrap",
                            a.p2p_addr, *model, "--skill", "poetry", env=LEXICAL),
            ]
        for future in futures:  # stop whatever started, even if another failed
            with contextlib.suppress(Exception):
                stack.enter_context(running(future.result()))
        b, c = (future.result() for future in futures)

        def ready() -> bool:
            served = {row["peer_id"] for row in a.get("/ledger") if row.get("models")}
            return served >= {b.peer_id, c.peer_id}

        wait_for(ready, READY_TIMEOUT_S, "A's ledger to list both model peers", (a, b, c))
        yield a, b, c


def both_bid(a: Daemon, b: Daemon, c: Daemon) -> bool:
    """One quick task that C wins; True when A got bids from B and C (beacons reach
    both: gossip meshes form within a heartbeat or two of connecting)."""
    r = post_task(a, question="Write a poem.", workers=1, requirement="poetry",
                  max_tokens=4, bid_window_s=2.0, deadline_s=30.0)
    assert r.status_code == 200, r.text
    task_id = r.json()["id"]
    bidders = {e["peer_id"] for e in events(a, "task.bid") if e["task_id"] == task_id}
    return bidders == {b.peer_id, c.peer_id}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killing_the_elected_worker_mid_task_falls_back_to_the_next_bidder(
        trio_of_peers: tuple[Daemon, Daemon, Daemon]) -> None:
    a, b, c = trio_of_peers
    wait_for(lambda: both_bid(a, b, c), 30.0, "beacons to reach both workers", (a, b, c))
    replies: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: replies.append(post_task(
        a, question="What is 2 + 3?", workers=1, requirement=SKILL, answer_format="text",
        max_tokens=8, deadline_s=60.0)))
    thread.start()
    try:
        solving = wait_for(lambda: events(b, "task.solving", timeout_s=0.5), 30.0,
                           "B to start solving", (a, b, c))
        b.kill()
    finally:
        thread.join(timeout=120)
    assert replies, "the task never returned"
    assert replies[0].status_code == 200, replies[0].text
    result = replies[0].json()
    assert result["id"] == solving[0]["task_id"]
    assert result["elected"] == [b.peer_id]
    assert [(f["seat"], f["peer_id"], f["replacement"]) for f in result["fallbacks"]] == [
        (0, b.peer_id, c.peer_id)]
    assert [v["peer_id"] for v in result["votes"]] == [c.peer_id]
    assert result["timings"]["total_ms"] < 60_000  # not the deadline: the crash was seen
    done = a.get(f"/v1/tasks/{result['id']}")
    assert done == result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_peerd_task_prints_the_vote_and_who_was_elected(
        trio_of_peers: tuple[Daemon, Daemon, Daemon]) -> None:
    a, _, c = trio_of_peers
    conn = ("--api", a.url, "--token", a.token)
    poetry = ("--workers", "1", "--requirement", "poetry", "--max-tokens", "8")
    out = run_cli("task", "What is 2 + 3?", *poetry, "--deadline-s", "30", "--json", *conn,
                  timeout_s=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["elected"] == [c.peer_id]
    assert [v["peer_id"] for v in result["votes"]] == [c.peer_id]
    out = run_cli("task", "What is 2 + 3?", *poetry, *conn, timeout_s=120)
    assert out.returncode == 0, out.stderr
    assert "elected gamma" in out.stdout
    assert "weight" in out.stdout and "chain of thought" in out.stdout  # the vote table
    bad = run_cli("task", "q", "--workers", "99", *conn)
    assert bad.returncode == 2 and "--workers" in bad.stderr
    # an earlier task, by id: the same JSON as POST gave, and the same table
    shown = run_cli("task", "--get", result["id"], "--json", *conn)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == result
    shown = run_cli("task", "--get", result["id"], *conn)
    assert shown.returncode == 0 and "elected gamma" in shown.stdout, shown.stderr
    missing = run_cli("task", "--get", "nosuchtask", *conn)
    assert missing.returncode != 0 and "no such task" in missing.stderr
    for args in ((), ("q", "--get", result["id"])):
        both = run_cli("task", *args, *conn)
        assert both.returncode != 0 and "--get ID" in both.stderr
