"""Plans as a service: a goal in, a ReAct plan over the swarm's tools run in the
background, its record and its events out (Gradientsys, issue 27).

`start(spec)` checks what can be refused at once (a peer with no model to plan with, a
tool nobody offers, MAX_RUNNING plans running already), fetches the offered tools' full
schemas, and runs the plan (run.py) in the service's nursery: the thinker is the
swarm's model through the inference face (thinker.py), its calls go out through
`Tools.dispatch`, in parallel, within each peer's capacity, with retry elsewhere. Every
plan event is published on the peer's `/events`, kept with the plan for
`GET /v1/plans/{id}/events`, and counted on /metrics (plans/metrics.py). Records live in
SQLite in the data dir (records.py), written at the start and the end of each plan; a
plan that was running when the daemon stopped is marked failed "interrupted" when it
starts again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd.api.recall import Recall, ScoredRuns
from peerd.inference.face import LanguageModel, ModelUnavailable
from peerd.node import Node
from peerd.plans.caller import ToolResult
from peerd.plans.dispatch import Attempt, Call, Dispatched
from peerd.plans.metrics import PlanMetrics
from peerd.plans.planner import (
    ASYNC_WAIT_S,
    BUDGET_REASONS,
    SYNC,
    Budget,
    PlannedCall,
    Planner,
)
from peerd.plans.records import INTERRUPTED, KEEP, PlanStore
from peerd.plans.retry import DEFAULT_POLICY, RetryPolicy
from peerd.plans.run import Attempted, Ended, run_plan
from peerd.plans.scored import PLANS_DOMAIN, plan_scec, plan_score
from peerd.plans.service import Tools
from peerd.plans.thinker import MakeConstraint, ModelThinker, StepText, Thinker
from peerd.service import Service
from protocols.errors import WireError

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

log = logging.getLogger(__name__)

MAX_RUNNING = 16  # plans this peer runs at once (as Symphony's requester its tasks)
BUSY_RETRY_S = 5.0  # what a plan refused for MAX_RUNNING is told to wait
KEPT_LIVE = 64  # finished plans whose events stay in memory (the rest: from the store)
KEEP_S = 30.0  # the memory's time to keep a scored plan's run (an SQLite write, an embedding)
MAX_GOAL_CHARS = 2000


class CannotPlan(Exception):
    """A plan cannot be made here as asked; `status` is the HTTP status (400: the
    request, 429: this peer runs as many plans as it takes, try again in
    `retry_after_s`; 503: this peer has no model to plan with now)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.retry_after_s = status, param, retry_after_s


@dataclass(frozen=True, slots=True)
class PlanSpec:
    goal: str
    tools: tuple[str, ...] | None = None  # None: every tool in the live ledger
    budget: Budget = field(default_factory=Budget)
    mode: str = SYNC
    constrained: bool = True  # steps decoded under the tools' grammar (where there is one)
    # the memory's notes for the goal, which the planner sees before it (texts, ids)
    memory: tuple[str, ...] = ()
    memory_ids: tuple[str, ...] = ()
    # a scored plan (scored.py): its answer scored against `reference` by `scorer`, and
    # the run kept by the memory as an SCEC in `domain`
    reference: str | None = None
    scorer: str = "number"
    domain: str = PLANS_DOMAIN


class LivePlan:
    """A plan in memory: its planner and its events as published."""

    def __init__(self, planner: Planner, spec: PlanSpec) -> None:
        self.planner, self.spec = planner, spec
        self.scored: dict[str, Any] = {}  # a scored plan's score and SCEC, once it ended
        self.events: list[dict[str, Any]] = []
        self.changed = trio.Event()
        self.done = False

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = trio.Event()


class Plans(Service):
    name = "plans"

    def __init__(self, node: Node, tools: Tools, data_dir: Path, *,
                 model: Callable[[], LanguageModel] | None = None,
                 thinker: Callable[[], Thinker] | None = None,
                 make_constraint: MakeConstraint | None = None,
                 budget: Budget | None = None, policy: RetryPolicy = DEFAULT_POLICY,
                 async_wait_s: float = ASYNC_WAIT_S, keep: int = KEEP,
                 max_running: int = MAX_RUNNING) -> None:
        self.node, self.tools, self.data_dir = node, tools, data_dir
        self.max_running = max_running
        self._starting = 0  # plans past the cap's check, fetching their tools' schemas
        self.model, self.make_thinker = model, thinker
        self.make_constraint = make_constraint
        self.budget = budget or Budget()  # a plan's, where its request names none
        self.policy, self.async_wait_s, self.keep = policy, async_wait_s, keep
        self.live: OrderedDict[str, LivePlan] = OrderedDict()
        # the peer's memory, when it keeps one (the daemon hands it over): the notes of
        # a plan that asks for them, and the keeping of a scored plan's run
        self.recall: Recall | None = None
        self.scored: ScoredRuns | None = None
        self.store: PlanStore | None = None
        self.metrics = PlanMetrics(node.metrics.registry, self.running)
        self._nursery: trio.Nursery | None = None

    # ---- the service ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        path = self.data_dir / "plans.db"
        self.store = store = await trio.to_thread.run_sync(PlanStore, path, self.keep)
        try:
            interrupted = store.interrupt(time.time())
            if interrupted:
                log.info("%d plans were running when the daemon stopped: marked failed",
                         interrupted)
                self.metrics.plans.labels(INTERRUPTED).inc(interrupted)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            store.close()

    def routes(self) -> Sequence[BaseRoute]:
        from peerd.api.plans import routes

        return routes(self)

    def status(self) -> dict[str, Any]:
        return {"plans": {"running": self.running()}}

    def running(self) -> int:
        return sum(not p.done for p in self.live.values())

    # ---- plans ----------------------------------------------------------------------

    def thinker(self, constrained: bool = True) -> Thinker:
        """Who writes the steps; CannotPlan(503) when this peer has no model now."""
        if self.make_thinker is not None:
            return self.make_thinker()
        if self.model is None:
            raise CannotPlan(503, "this peer serves no model to plan with; send the plan "
                             "to a peer started with --model, or restart this one with "
                             "--model SPEC")
        try:
            self.model()
        except ModelUnavailable as exc:
            raise CannotPlan(503, f"no model to plan with: {exc}") from None
        return ModelThinker(self.model, make_constraint=self.make_constraint if constrained
                            else None)

    async def start(self, spec: PlanSpec) -> str:
        """Start a plan; its id. CannotPlan for what can be refused at once."""
        if self._nursery is None or self.store is None:
            raise CannotPlan(503, "the planner is not running yet; try again shortly")
        if self.running() + self._starting >= self.max_running:
            raise CannotPlan(429, f"this peer runs {self.max_running} plans at once, its "
                             "most; try again when one has ended (GET /v1/plans lists "
                             "them)", retry_after_s=BUSY_RETRY_S)
        thinker = self.thinker(spec.constrained)
        self._starting += 1  # counted while its tools are fetched: no overshoot meanwhile
        try:
            specs = await self.tools.specs(spec.tools)
        finally:
            self._starting -= 1
        missing = [n for n in spec.tools or () if n not in specs]
        if missing:
            raise CannotPlan(400, f"no live peer offers a tool {missing[0]!r:.80} (or its "
                             "schema could not be fetched); `peerd tools` lists who offers "
                             "what", param="tools")
        plan_id = uuid.uuid4().hex[:16]
        planner = Planner(plan_id, spec.goal, list(specs.values()), spec.budget, spec.mode,
                          trio.current_time(), round(time.time(), 6),
                          async_wait_s=self.async_wait_s,
                          max_attempts=self.policy.max_attempts, notes=spec.memory)
        live = self.live[plan_id] = LivePlan(planner, spec)
        self._publish(live, *planner.take_events()[0])
        self.store.put(self._record(live), live.events)
        self._nursery.start_soon(self._run, live, thinker)
        return plan_id

    async def settle(self, goal: str) -> tuple[str, str, bool]:
        """Run a plan for `goal` with every live tool and wait for its end: (the answer,
        or the failure in words; the plan's id; whether it answered). CannotPlan as
        `start`. What `/mcp`'s `plan` tool runs."""
        plan_id = await self.start(PlanSpec(goal, budget=self.budget))
        live = self.live[plan_id]
        while not live.done:
            await live.changed.wait()
        planner = live.planner
        if planner.status == "answered":
            return planner.answer or "", plan_id, True
        return f"the plan failed: {planner.reason}", plan_id, False

    def record(self, plan_id: str) -> dict[str, Any] | None:
        live = self.live.get(plan_id)
        if live is not None:
            return self._record(live)
        got = self.store.get(plan_id) if self.store is not None else None
        return None if got is None else got[0]

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.store.recent(limit) if self.store is not None else []

    def events(self, plan_id: str) -> LivePlan | list[dict[str, Any]] | None:
        """The plan in memory (its events so far, more to come while it runs), or its
        stored events; None for an unknown plan."""
        live = self.live.get(plan_id)
        if live is not None:
            return live
        got = self.store.get(plan_id) if self.store is not None else None
        return None if got is None else got[1]

    # ---- running one ----------------------------------------------------------------

    async def _run(self, live: LivePlan, thinker: Thinker) -> None:
        planner = live.planner

        def on_step(outcome: str, step: StepText) -> None:
            self.metrics.steps.labels(outcome, "yes" if step.constrained else "no").inc()
            self.metrics.tokens.inc(max(0, step.tokens))

        try:
            await run_plan(planner, thinker, self._dispatcher(planner),
                           lambda kind, data: self._publish(live, kind, data),
                           on_step=on_step)
        except Exception as exc:  # our bug: this plan fails, the peer serves on
            log.exception("plan %s failed", planner.id)
            planner.fail(f"the planner failed ({type(exc).__name__}: {exc})",
                         trio.current_time())
            for kind, data in planner.take_events():
                self._publish(live, kind, data)
        finally:
            with trio.CancelScope(shield=True):
                await self._score(live)
            live.done = True
            live.changed.set()
            reason = planner.reason if planner.reason in BUDGET_REASONS else "error"
            self.metrics.plans.labels("answered" if planner.status == "answered"
                                      else reason).inc()
            if self.store is not None:
                self.store.put(self._record(live), live.events)
            self._forget_old()

    async def _score(self, live: LivePlan) -> None:
        """A scored plan that ended: its score, and its run handed to the memory (when
        this peer keeps one). A run the memory cannot keep is logged; the plan stands."""
        spec, planner = live.spec, live.planner
        if spec.reference is None or planner.status == "running":
            return
        live.scored = {"reference": spec.reference, "scorer": spec.scorer,
                       "domain": spec.domain, "scec": None,
                       "score": plan_score(spec.scorer, planner.answer, spec.reference)}
        if self.scored is None:
            return
        try:
            model = self.model().model_id if self.model is not None else ""
        except ModelUnavailable:
            model = ""
        try:
            with trio.move_on_after(KEEP_S):
                live.scored["scec"] = await self.scored.observe(plan_scec(
                    planner.goal, domain=spec.domain, model=model,
                    reference=spec.reference, scorer=spec.scorer, answer=planner.answer,
                    memory=spec.memory, memory_ids=spec.memory_ids,
                    wall_s=trio.current_time() - planner.started), spec.memory_ids)
        except (WireError, ModelUnavailable) as exc:
            log.warning("plan %s: its run is not kept by the memory: %s", planner.id, exc)
        except Exception:  # our bug, or a memory closing under us: the plan stands
            log.exception("plan %s: keeping its run failed", planner.id)

    def _record(self, live: LivePlan) -> dict[str, Any]:
        record = live.planner.record(trio.current_time())
        if live.spec.memory_ids:
            record["memory"] = list(live.spec.memory_ids)
        return record | live.scored

    def _dispatcher(self, planner: Planner
                    ) -> Callable[[Sequence[PlannedCall], Attempted, Ended], Any]:
        plan_id = planner.id
        # the schema each tool was shown to the thinker under: its peers are tried first
        shown = {t.name: str(getattr(t, "schema", "")) for t in planner.tools}

        async def dispatch(planned: Sequence[PlannedCall], attempted: Attempted,
                           ended: Ended) -> None:
            ours = {f"{plan_id}.{p.call_id}": p.call_id for p in planned}
            calls = [Call(p.tool, p.arguments, f"{plan_id}.{p.call_id}",
                          shown.get(p.tool, "")) for p in planned]

            def observe(call: Call, attempt: Attempt) -> None:
                attempted(ours[call.call_id], attempt.peer, attempt.code, attempt.message)

            def done(end: Dispatched) -> None:
                result = end.outcome.value if isinstance(end.outcome, ToolResult) else None
                ended(ours[end.call.call_id], ok=end.ok, code=end.code, peer=end.peer,
                      elapsed_s=end.elapsed_s, attempts=len(end.attempts), result=result,
                      message=end.message)

            await self.tools.dispatch(calls, self.policy, observe=observe, done=done)

        return dispatch

    def _publish(self, live: LivePlan, kind: str, data: dict[str, Any]) -> None:
        event = self.node.events.publish(kind, plan=live.planner.id, **data)
        live.add(event.to_json())
        if kind == "plan.replan":
            self.metrics.replans.inc()

    def _forget_old(self) -> None:
        finished = [k for k, p in self.live.items() if p.done]
        for plan_id in finished[:max(0, len(finished) - KEPT_LIVE)]:
            del self.live[plan_id]
