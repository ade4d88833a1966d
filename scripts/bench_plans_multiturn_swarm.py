"""The swarm half of scripts/bench_plans.py multiturn (bench_plans_multiturn.py has
BFCL's half): 4 real `peerd start` processes, peer 0 serving the model and planning,
each peer's `--mcp` servers holding its classes (PLACEMENT); a case run as one plan per
user turn (`run_case`) or, as the reference, its ground-truth calls dispatched one by one
in order through peer 0's `POST /v1/tools/dispatch` (`run_reference`: the same
dispatcher and peers the plans use, no model), both scored by BFCL's checker.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_plans_multiturn import (
    CLASSES,
    EXECUTED,
    PLACEMENT,
    Case,
    case_tools,
    class_tools,
    executed_steps,
    goal_of,
    ground_truth_calls,
    peer_texts,
    replayed,
    reset_tool,
    same_result,
    score,
    server_command,
    step_parses,
)


@dataclass(frozen=True, slots=True)
class TurnBudget:
    steps: int = 3
    tokens: int = 1024
    wall_s: float = 300.0
    calls: int = 16

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "wall_s": self.wall_s,
                "calls": self.calls}


def peer_args(python: str, model: str, threads: int, model_args: Sequence[str] = (),
              placement: Sequence[Sequence[str]] = PLACEMENT) -> list[list[str]]:
    """Each peer's own `peerd start` flags: its classes' servers, one call at a time a
    server (its calls mutate one instance: BFCL runs a step's calls in order); peer 0
    also serves the model."""
    out = []
    for i, held in enumerate(placement):
        args = ["--memory-embedder", "hashing", "--mcp-capacity", "1"]
        for c in held:
            args += ["--mcp", server_command(python, c)]
        if i == 0:
            args += ["--model", model, "--torch-threads", str(threads), *model_args]
        out.append(args)
    return out


def start_swarm(run_dir: Path, model: str, threads: int, model_args: Sequence[str] = (),
                *, ready_s: float = 600.0) -> list[Any]:
    """4 peers up, peer 0's model ready, every class's tools in peer 0's ledger."""
    from testnet import launcher
    from testnet.peer_api import api_get
    from testnet.state import TestnetError

    each = peer_args(sys.executable, model, threads, model_args)
    for attempt in range(5):  # other runs on this machine may hold a base port
        base = random.Random().randrange(20000, 60000, 100)
        try:
            peers = launcher.up(len(each), run_dir, base, each_peer_args=each, settle_s=15.0)
            break
        except TestnetError as exc:
            if "in use" not in str(exc) or attempt == 4:
                raise
    want = {n for c in CLASSES for n in (*class_tools(c), reset_tool(c))}
    deadline = time.monotonic() + ready_s
    while True:
        state = api_get(peers[0], "/status").get("model", {}).get("state")
        offered = {r["tool"] for r in api_get(peers[0], "/v1/tools")}
        if state == "ready" and want <= offered:
            return list(peers)
        if state == "failed" or time.monotonic() > deadline:
            launcher.down(run_dir)
            raise TestnetError(f"swarm not ready: model {state}, tools missing "
                               f"{sorted(want - offered)[:8]}")
        time.sleep(1.0)


def run_plan(peer: Any, goal: str, tools: Sequence[str], budget: TurnBudget,
             constrained: bool) -> dict[str, Any]:
    """One plan on `peer` (its steps under the tools' grammar or not), waited for; its
    record."""
    from testnet.peer_api import api_get, api_request

    plan = api_request(peer, "POST", "/v1/plans", json={
        "goal": goal, "tools": list(tools), "budget": budget.to_json(),
        "constrained": constrained})
    deadline = time.monotonic() + budget.wall_s + 120.0
    while True:
        record: dict[str, Any] = api_get(peer, f"/v1/plans/{plan['id']}")
        if record["status"] != "running" or time.monotonic() > deadline:
            return record
        time.sleep(1.0)


def reset(peers: Sequence[Any], case: Case) -> None:
    """Each involved class on its peer loaded with the case's initial_config."""
    from testnet.peer_api import api_request

    for c in case.involved_classes:
        got = api_request(peers[0], "POST", "/v1/tools/call", json={
            "tool": reset_tool(c), "arguments": {"config": case.initial_config.get(c, {})}},
            timeout_s=60.0)
        if not got.get("ok"):
            raise RuntimeError(f"reset of {c} failed: {got.get('error')}")


def run_case(peers: Sequence[Any], case: Case, budget: TurnBudget, constrained: bool
             ) -> dict[str, Any]:
    """Reset the case's classes on their peers, a plan per turn, BFCL's verdict."""
    began = time.perf_counter()
    reset(peers, case)
    records = [run_plan(peers[0], goal_of(case, t), case_tools(case), budget, constrained)
               for t in range(len(case.turns))]
    return verdict(peers, case, records, time.perf_counter() - began)


def run_reference(peers: Sequence[Any], case: Case) -> dict[str, Any]:
    """The ground truth's calls dispatched one at a time, in order (a turn's calls
    depend on each other's effects), each turn as a plan record would show it."""
    from testnet.peer_api import api_request

    began = time.perf_counter()
    reset(peers, case)
    records = []
    for turn in ground_truth_calls(case):
        steps = []
        for tool, arguments in turn:
            got = api_request(peers[0], "POST", "/v1/tools/dispatch", json={
                "calls": [{"tool": tool, "arguments": arguments}]}, timeout_s=90.0)
            end = got["results"][0]
            steps.append({"calls": [{
                "tool": tool, "arguments": arguments, "peer": end.get("peer") or "",
                "code": EXECUTED if end["ok"] else end["error"]["code"],
                "observation": json.dumps({"result": end.get("result")})}]})
        records.append({"status": "answered", "steps": steps, "reason": "",
                        "used": {"steps": len(steps), "calls": len(steps)}})
    return verdict(peers, case, records, time.perf_counter() - began)


def verdict(peers: Sequence[Any], case: Case, records: Sequence[dict[str, Any]],
            seconds: float) -> dict[str, Any]:
    """BFCL's verdict on what the peers executed, and what the records say."""
    turns = [executed_steps(r) for r in records]
    got = score(case, turns)
    texts, replay = peer_texts(records), replayed(case, turns)
    names = {p.peer_id: p.name for p in peers}
    calls = [c for r in records for s in r.get("steps", []) for c in s.get("calls", [])]
    parsed = [step_parses(r) for r in records]
    return {
        "id": case.id, "classes": list(case.involved_classes), "turns": len(case.turns),
        "valid": bool(got["valid"]), "error_type": got.get("error_type"),
        "error_message": str(got.get("error_message", ""))[:300],
        "seconds": round(seconds, 1),
        "plans": [{"status": r["status"], "reason": r.get("reason", ""),
                   "used": r.get("used", {}), "answer": (r.get("answer") or "")[:200],
                   "first_step": (r.get("steps") or [{}])[0].get("thought", "")[:200]}
                  for r in records],
        "steps_parsed": sum(p for p, _ in parsed), "steps": sum(n for _, n in parsed),
        "calls": len(calls), "codes": _count(c.get("code") or "?" for c in calls),
        "executed": [[list(s) for s in t] for t in turns],
        "executed_by": _count(names.get(c.get("peer", ""), "?") for c in calls
                              if c.get("code") == EXECUTED),
        "peer_results_checked": sum(t is not None for t in texts),
        "peer_results_equal_local": sum(t is not None and same_result(t, r)
                                        for t, r in zip(texts, replay, strict=False)),
        "ground_truth": [list(t) for t in case.ground_truth],
    }


def summarise(arm: str, cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from peerd.rl.evaluate import wilson

    n = len(cases)
    right = sum(c["valid"] for c in cases)
    plans = [p for c in cases for p in c["plans"]]
    steps = sum(c["steps"] for c in cases)
    lo, hi = wilson(right, n)
    codes: dict[str, int] = {}
    for c in cases:
        for k, v in c["codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "arm": arm, "cases": n, "success": right, "success_rate": right / max(n, 1),
        "ci95": [lo, hi], "turns": sum(c["turns"] for c in cases),
        "plans_answered": sum(p["status"] == "answered" for p in plans),
        "plans_failed": _count(p["reason"] for p in plans if p["status"] != "answered"),
        "steps": steps, "steps_parsed": sum(c["steps_parsed"] for c in cases),
        "parse_rate": sum(c["steps_parsed"] for c in cases) / max(steps, 1),
        "calls": sum(c["calls"] for c in cases), "calls_by_code": codes,
        "calls_executed": codes.get(EXECUTED, 0),
        "seconds_per_case": sum(c["seconds"] for c in cases) / max(n, 1),
        "errors": _count(c["error_type"] or "?" for c in cases if not c["valid"]),
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[str(item)] = out.get(str(item), 0) + 1
    return out
