"""scripts/bench_plans.py schedule: a fan-out of independent tool calls dispatched by
peerd's dispatcher (peerd/plans/dispatch.py, through Tools.dispatch) across 1, 2 and 4
real in-process libp2p peers, against one agent making the same calls one after the
other.

The peers: a coordinator (it dispatches; it offers no tool) and N workers, each a real
peerd node on loopback (Noise, yamux, the ledger's gossip) wired as a star around the
coordinator, as tests/harness.py builds them. Every worker offers one tool, `work`, of
declared capacity WORK_CAPACITY. Its "work" is a sleep of the call's `seconds`: these
figures are about scheduling (slots, queueing, retries, routing), not compute.

The coordinator fetches the workers' tool schemas before the clock starts (a planner
has them: it builds its grammar from them). The runs:
- sequential: one worker; the coordinator calls `work` for each call in turn
  (Tools.call), waiting for each answer: what a single agent without fan-out does.
- fan-out on 1, 2, 4 workers: every call handed to Tools.dispatch at once.
- failures: 4 workers whose `work` hangs on a random HANG_RATE of its executions (the
  callee's per-attempt deadline ends it with "deadline", which the dispatcher retries on
  another peer after a jittered backoff): a stuck tool, nothing in peerd's own code
  changed or hooked.
- kill: 4 workers, one of them (opened last) closed KILL_AT of the way into the clean
  4-worker makespan while it holds calls: its streams reset, the dispatcher routes
  around it. The node is closed in-process (its host and every stream go down at once),
  not a process killed with SIGKILL.

In every run each worker's `work` counts its own executions in flight (the callee's
side): the most at once against the declared capacity, and how many executions began
above it (violations; target 0). The caller's own count (Tools.slots.peak) is reported
beside it.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from pydantic import BaseModel, Field

from peerd.node import Node
from peerd.plans.dispatch import Call, Dispatched
from peerd.plans.retry import RetryPolicy
from peerd.plans.service import Tools
from peerd.plans.tool import Tool, typed_tool
from tests.harness import connect_nodes, gossip, open_test_node, wait_for

TOOL = "work"
WORK_CAPACITY = 2  # calls of `work` a worker runs at once
ATTEMPT_DEADLINE_S = 3.0  # past the longest call (2 s): a hang ends here
POLICY = RetryPolicy(max_attempts=3, attempt_deadline_s=ATTEMPT_DEADLINE_S)
HANG_RATE = 0.2
KILL_AT = 1 / 3  # of the clean 4-worker makespan


# ---- the workload and its ideal (pure) ----------------------------------------------

@dataclass(frozen=True, slots=True)
class Workload:
    durations: tuple[float, ...]  # seconds of each call, in the calls' order

    @classmethod
    def draw(cls, n: int, low_s: float, high_s: float, seed: int) -> Workload:
        """n durations uniform in [low_s, high_s], rounded to the millisecond."""
        if n < 1 or not 0 < low_s <= high_s:
            raise ValueError("need n >= 1 and 0 < low_s <= high_s")
        rng = random.Random(seed)
        return cls(tuple(round(rng.uniform(low_s, high_s), 3) for _ in range(n)))

    @property
    def total_s(self) -> float:
        return sum(self.durations)

    @property
    def longest_s(self) -> float:
        return max(self.durations)

    def ideal_s(self, slots: int) -> float:
        """The makespan no schedule beats on `slots` slots: the work spread perfectly,
        and never less than the longest call."""
        if slots < 1:
            raise ValueError("slots must be >= 1")
        return max(self.total_s / slots, self.longest_s)

    def list_schedule_s(self, slots: int) -> float:
        """The makespan of greedy list scheduling in the calls' order (each call to the
        slot that frees first): what a scheduler gets that does not know durations
        ahead, with no overhead. Graham: at most ideal + longest."""
        if slots < 1:
            raise ValueError("slots must be >= 1")
        free = [0.0] * slots
        for d in self.durations:
            heapq.heapreplace(free, free[0] + d)
        return max(free)


# ---- the callee's count of its executions (pure) --------------------------------------

@dataclass
class CapacityMeter:
    """Executions in flight by (peer, tool), counted by the tool itself: the most at
    once, and how many began above the declared capacity."""

    capacity: dict[tuple[str, str], int] = field(default_factory=dict)
    now: Counter[tuple[str, str]] = field(default_factory=Counter)
    peak: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: int = 0
    started: int = 0

    def declare(self, peer: str, tool: str, capacity: int) -> None:
        self.capacity[(peer, tool)] = capacity

    def enter(self, peer: str, tool: str) -> None:
        key = (peer, tool)
        self.now[key] += 1
        self.started += 1
        self.peak[key] = max(self.peak[key], self.now[key])
        if self.now[key] > self.capacity[key]:
            self.violations += 1

    def leave(self, peer: str, tool: str) -> None:
        key = (peer, tool)
        if self.now[key] <= 0:
            raise AssertionError(f"{key} left more often than entered")
        self.now[key] -= 1

    def to_json(self) -> dict[str, Any]:
        return {"executions": self.started, "violations": self.violations,
                "peak_over_capacity": max((self.peak[k] - c for k, c in self.capacity.items()),
                                          default=0),
                "peaks": {f"{peer[-8:]}/{tool}": f"{self.peak[(peer, tool)]}/{cap}"
                          for (peer, tool), cap in sorted(self.capacity.items())}}


# ---- the tool -------------------------------------------------------------------------

class Work(BaseModel):
    i: int
    seconds: float = Field(ge=0, le=30)


class Done(BaseModel):
    i: int


def work_tool(peer: str, meter: CapacityMeter, hang_rate: float, rng: random.Random,
              hangs: list[int]) -> Tool:
    """`work` on `peer`: sleeps the call's seconds; hangs on `hang_rate` of executions
    (until the callee's deadline ends it), appending the call's i to `hangs`."""
    meter.declare(peer, TOOL, WORK_CAPACITY)

    async def work(args: Work) -> Done:
        meter.enter(peer, TOOL)
        try:
            if rng.random() < hang_rate:
                hangs.append(args.i)
                await trio.sleep_forever()
            await trio.sleep(args.seconds)
        finally:
            meter.leave(peer, TOOL)
        return Done(i=args.i)

    return typed_tool(TOOL, "Sleeps `seconds` (a stand-in for a tool's work).", work,
                      capacity=WORK_CAPACITY)


# ---- the peers ------------------------------------------------------------------------

@dataclass
class Fleet:
    coordinator: Node
    tools: Tools
    workers: list[Node]
    meter: CapacityMeter
    hangs: list[int]
    victim: Node | None = None
    stop_victim: trio.Event = field(default_factory=trio.Event)
    victim_gone: trio.Event = field(default_factory=trio.Event)


@contextlib.asynccontextmanager
async def open_fleet(root: Path, workers: int, *, hang_rate: float = 0.0, seed: int = 0,
                     victim: bool = False) -> AsyncIterator[Fleet]:
    """A coordinator and `workers` workers offering `work` (the last of them the victim
    when asked: opened last, closed first, in a task of its own), every tool in the
    coordinator's ledger."""
    meter = CapacityMeter()
    hangs: list[int] = []

    async def start_worker(node: Node, k: int) -> None:
        await connect_nodes(node, coordinator)
        tool = work_tool(node.peer_id, meter, hang_rate, random.Random(f"{seed}-{k}"), hangs)
        await node.start(Tools(node, gossip(node), extra=[tool]))
        gossip(node).refresh()

    async with contextlib.AsyncExitStack() as stack:
        coordinator = await stack.enter_async_context(open_test_node(root / "coordinator"))
        tools = Tools(coordinator, gossip(coordinator))
        await coordinator.start(tools)
        nodes = []
        for k in range(workers - int(victim)):
            node = await stack.enter_async_context(open_test_node(root / f"w{k}"))
            await start_worker(node, k)
            nodes.append(node)
        fleet = Fleet(coordinator, tools, nodes, meter, hangs)

        async def run_victim(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with open_test_node(root / f"w{workers - 1}") as node:
                    await start_worker(node, workers - 1)
                    fleet.victim = node
                    fleet.workers.append(node)
                    task_status.started()
                    await fleet.stop_victim.wait()
            finally:
                fleet.victim_gone.set()

        async with trio.open_nursery() as nursery:
            if victim:
                await nursery.start(run_victim)
            gossip(coordinator).refresh()
            await wait_for(lambda: len(tools.offers(TOOL)) == workers, timeout_s=30.0,
                           what=f"{workers} workers' `work` in the coordinator's ledger")
            # the schema fetched and cached before the clock starts, as a planner has it
            # (it builds its grammar from it): 40 calls at once would each fetch it first
            for node in fleet.workers:
                specs = await tools.tools_of(node.peer_id)
                assert isinstance(specs, list), specs
            try:
                yield fleet
            finally:
                fleet.stop_victim.set()


# ---- the runs -------------------------------------------------------------------------

def calls_of(workload: Workload) -> list[Call]:
    return [Call(TOOL, {"i": i, "seconds": d}) for i, d in enumerate(workload.durations)]


async def sequential(fleet: Fleet, workload: Workload) -> dict[str, Any]:
    """Each call in turn on the one worker, waiting for its answer."""
    peer = fleet.workers[0].peer_id
    began = time.perf_counter()
    ok = 0
    for call in calls_of(workload):
        got = await fleet.tools.call(TOOL, call.arguments, peer=peer,
                                     deadline_s=ATTEMPT_DEADLINE_S)
        ok += got.ok
    return {"makespan_s": time.perf_counter() - began, "completed": ok}


async def fan_out(fleet: Fleet, workload: Workload, *, kill_at_s: float | None = None
                  ) -> dict[str, Any]:
    """Every call at once through Tools.dispatch; with `kill_at_s`, the victim closed
    that many seconds in."""
    killed: dict[str, Any] = {}
    results: list[Dispatched] = []

    async def kill() -> None:
        assert kill_at_s is not None and fleet.victim is not None
        await trio.sleep(kill_at_s)
        killed["held_calls"] = fleet.tools.slots.held(fleet.victim.peer_id, TOOL)
        killed["at_s"] = time.perf_counter() - began
        fleet.stop_victim.set()
        await fleet.victim_gone.wait()

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        if kill_at_s is not None:
            nursery.start_soon(kill)
        results = await fleet.tools.dispatch(calls_of(workload), POLICY)
        makespan = time.perf_counter() - began
    codes = Counter(a.code for r in results for a in r.attempts)
    out: dict[str, Any] = {
        "makespan_s": makespan, "completed": sum(r.ok for r in results),
        "attempts": sum(len(r.attempts) for r in results), "attempt_codes": dict(codes),
        "retried_calls": sum(len(r.attempts) > 1 for r in results),
        "queued_s_mean": _mean([a.queued_s for r in results for a in r.attempts]),
        "failures": [r.message for r in results if not r.ok][:5],
        "caller_peak": max(fleet.tools.slots.peak.values(), default=0),
        "hung_executions": len(fleet.hangs)}
    if killed:
        victim = fleet.victim.peer_id if fleet.victim else ""
        out["killed"] = killed | {"peer": victim[-8:], "calls_ending_there": sum(
            r.ok and r.peer == victim for r in results)}
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


async def run_schedule(workload: Workload, peer_counts: Sequence[int], seed: int
                       ) -> dict[str, Any]:
    """Every run of the section, each on a fresh fleet; the figures by run."""
    runs: dict[str, Any] = {}
    plan: list[tuple[str, int, dict[str, Any]]] = [("sequential", 1, {})]
    plan += [(f"fan_out_{n}", n, {}) for n in peer_counts]
    plan += [("failures_4", 4, {"hang_rate": HANG_RATE}), ("kill_4", 4, {"victim": True})]
    with tempfile.TemporaryDirectory(prefix="peerd_bench_plans_") as tmp:
        for name, workers, kw in plan:
            async with open_fleet(Path(tmp) / name, workers, seed=seed, **kw) as fleet:
                print(f"{name}: {workers} worker(s) ready", flush=True)
                if name == "sequential":
                    got = await sequential(fleet, workload)
                elif name == "kill_4":
                    clean = runs.get("fan_out_4", {}).get("makespan_s", workload.ideal_s(8))
                    got = await fan_out(fleet, workload, kill_at_s=KILL_AT * clean)
                else:
                    got = await fan_out(fleet, workload)
                callee = fleet.meter.to_json()
            slots = workers * WORK_CAPACITY
            got |= {"workers": workers, "slots": 1 if name == "sequential" else slots,
                    "callee": callee}
            ideal = workload.total_s if name == "sequential" else workload.ideal_s(slots)
            got["ideal_s"] = ideal
            got["ratio_to_ideal"] = got["makespan_s"] / ideal
            if name != "sequential":
                got["list_schedule_s"] = workload.list_schedule_s(slots)
            runs[name] = got
            print(f"{name}: makespan {got['makespan_s']:.2f} s, ideal {ideal:.2f} s, "
                  f"completed {got['completed']}/{len(workload.durations)}", flush=True)
    return runs
