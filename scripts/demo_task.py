"""The demo's Symphony step: a question answered by an elected set of peers.

`demo_task(peers, console)` gives every peer of a running model testnet the skills
below, asks peer0 `POST /v1/tasks` (workers elected by beacon, chains of thought,
reputation-weighted vote) and prints who was elected, the vote table and the timings.
Any peer that can generate end to end (its own whole model, or the swarm's pipeline
behind its model's head) works on tasks, so this runs on the demo's 3-stage testnet.

    from demo_task import demo_task
    demo_task(peers, console)            # after the testnet is up
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console

from peerd.cli.task import vote_table

SKILLS = ["arithmetic word problems", "grade school math"]
QUESTION = ("Tom has 3 boxes with 4 apples in each box. He eats 2 apples. "
            "How many apples are left?")


def _headers(peer: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {peer.token}"}


def demo_task(peers: list[Any], console: Console, question: str = QUESTION,
              workers: int = 3, max_tokens: int = 96, deadline_s: float = 300.0,
              ) -> dict[str, Any]:
    """Run one task on peer0 of `peers` (testnet PeerInfo objects); the response."""
    for p in peers:
        httpx.post(p.api + "/capabilities", json={"skills": SKILLS}, headers=_headers(p),
                   timeout=10).raise_for_status()
    requester = peers[0]
    deadline = time.monotonic() + 30
    with console.status("waiting for every peer's skills to reach peer0's ledger"):
        while time.monotonic() < deadline:
            rows = httpx.get(requester.api + "/ledger", headers=_headers(requester),
                             timeout=10).json()
            if sum(1 for r in rows if r.get("skills")) >= len(peers):
                break
            time.sleep(0.2)
    names = {p.peer_id: p.name for p in peers}
    console.print(f"[bold]task[/] to {requester.name}, {workers} workers: {question}",
                  highlight=False)
    with console.status("beacon out, bids in, elected workers thinking step by step"):
        r = httpx.post(requester.api + "/v1/tasks", headers=_headers(requester),
                       timeout=4 * deadline_s + 60,
                       json={"question": question, "workers": workers,
                             "answer_format": "number", "max_tokens": max_tokens,
                             "deadline_s": deadline_s})
    if r.status_code != 200:
        console.print(f"[red]the task failed ({r.status_code}): {r.text[:300]}[/]")
        return {}
    result: dict[str, Any] = r.json()
    console.print("elected: " + ", ".join(names.get(p, p[-8:]) for p in result["elected"]),
                  highlight=False)
    console.print(vote_table(result["votes"], lambda p: names.get(p, p[-8:]),
                             f"votes (answer: {result['answer']})"))
    for f in result["fallbacks"]:
        console.print(f"seat {f['seat']}: {names.get(f['peer_id'], f['peer_id'])} dropped "
                      f"({f['reason']}) -> {names.get(f['replacement'] or '', 'nobody')}",
                      highlight=False)
    timings = result["timings"]
    console.print(f"beacon round {timings['beacon_ms']:.0f} ms, solving "
                  f"{timings['solve_ms'] / 1e3:.1f} s, total {timings['total_ms'] / 1e3:.1f} s",
                  highlight=False)
    return result
