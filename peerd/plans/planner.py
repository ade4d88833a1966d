"""The ReAct planner as a sans-I/O state machine: goal -> step -> calls -> observations
-> ... -> answer, within a budget (Gradientsys, issue 27).

`Planner` holds one plan's state and its rules; it reads no clock and does no I/O. Its
driver (run.py) asks `next(now)` what to do and feeds back what happened:

- `Think(transcript)`: ask the thinker for a step; hand its text to `stepped`.
- `Dispatch(calls)`: run these calls (in parallel); each attempt's failure goes to
  `attempted`, each call's end to `ended`.
- `Wait(until)`: nothing to do until a call ends, or until `until`.
- `Finished`: the plan answered or failed.

Every change is told as a plan event (`take_events`, the contract's `plan.*` types),
and the record (`record()`) is what GET /v1/plans/{id} shows.

The rules:
- A step that does not parse (step.py), a call the dispatcher gave up on, and an answer
  given while calls still run are observations for the next step, each told as
  `plan.replan`: the model sees what went wrong and plans again.
- Sync mode: the next step waits for every call of the last. Async mode: it waits for
  the first result (or `async_wait_s`), long calls keep running, and their results are
  folded into a later step's observations. Each call's result is shown exactly once,
  and the plan does not answer while its calls run: such an answer is refused (an
  observation) and the next step waits for a result.
- Budgets (`Budget`): steps (thinker turns), tokens (the planner model's output, all
  steps), wall time (from the start), calls (dispatched, invalid ones not counted). When
  one runs out the plan fails with its reason (budget_steps, budget_tokens, budget_wall,
  budget_calls): no extra "final answer" turn, so a budget is a hard bound. Steps and
  tokens are checked before a step, calls before a dispatch (a step that would go past
  the budget is not run in part), wall time always; calls still running are cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from peerd.plans.retry import retried
from peerd.plans.schema import SchemaCheck, SchemaInvalid
from peerd.plans.step import PARSED, Step, Unparsed, parse_step

SYNC, ASYNC = "sync", "async"
MODES = (SYNC, ASYNC)
ASYNC_WAIT_S = 2.0  # async: the longest a step waits with calls running and no result
STEP_TOKENS = 512  # the most one step may generate (the budget's rest, if less)
MAX_OBSERVATION_CHARS = 500
CANCELLED, INVALID_CALL = "cancelled", "invalid_call"
BUDGET_REASONS = ("budget_steps", "budget_tokens", "budget_wall", "budget_calls")


@dataclass(frozen=True, slots=True)
class Budget:
    steps: int = 8  # thinker turns
    tokens: int = 4096  # tokens the planner's model generates, all steps together
    wall_s: float = 120.0  # from the plan's start to its end
    calls: int = 32  # tool calls dispatched

    LIMITS = {"steps": (1, 64), "tokens": (1, 65536), "wall_s": (1, 3600),
              "calls": (1, 512)}

    def __post_init__(self) -> None:
        for name, (lo, hi) in self.LIMITS.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"budget {name} {v} outside {lo}..{hi}")

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "wall_s": self.wall_s,
                "calls": self.calls}


class ToolSpecLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def input_schema(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Turn:
    """One step as the model wrote it, and the observations that came after it."""

    step: str
    observations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Transcript:
    """What the thinker sees: the goal, the tools, the steps so far with their
    observations, the calls still running (async), and the tokens it may use."""

    goal: str
    tools: tuple[ToolSpecLike, ...]
    turns: tuple[Turn, ...]
    running: tuple[str, ...]  # "2.1 read_file" for each call still running
    max_tokens: int
    step: int  # the number of the step asked for
    notes: tuple[str, ...] = ()  # the memory's items for the goal, best first


@dataclass(frozen=True, slots=True)
class PlannedCall:
    call_id: str  # "<step>.<i>": unique in the plan
    tool: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Think:
    transcript: Transcript


@dataclass(frozen=True, slots=True)
class Dispatch:
    calls: tuple[PlannedCall, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    until: float  # wake then even if no call ended


@dataclass(frozen=True, slots=True)
class Finished:
    status: str  # answered | failed
    answer: str | None
    reason: str


Action = Think | Dispatch | Wait | Finished


@dataclass(slots=True)
class CallRecord:
    call_id: str
    tool: str
    arguments: dict[str, Any]
    peer: str = ""
    ok: bool | None = None  # None: running
    code: str = ""
    elapsed_s: float = 0.0
    attempts: int = 0
    observation: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "tool": self.tool, "arguments": self.arguments,
                "peer": self.peer, "ok": self.ok, "code": self.code,
                "elapsed_s": round(self.elapsed_s, 6), "attempts": self.attempts,
                "observation": self.observation}


@dataclass(slots=True)
class StepRecord:
    step: int
    thought: str
    calls: list[CallRecord] = field(default_factory=list)
    parsed: bool = True  # False: the text is kept as the thought, and nothing ran

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "thought": self.thought, "parsed": self.parsed,
                "calls": [c.to_json() for c in self.calls]}


Event = tuple[str, dict[str, Any]]  # (type, data) without the plan's id


class Planner:
    def __init__(self, plan_id: str, goal: str, tools: Sequence[ToolSpecLike],
                 budget: Budget, mode: str, now: float, created: float, *,
                 async_wait_s: float = ASYNC_WAIT_S, max_attempts: int = 3,
                 notes: Sequence[str] = ()) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.id, self.goal, self.budget, self.mode = plan_id, goal, budget, mode
        self.tools, self.notes = tuple(tools), tuple(notes)
        self.checks = {t.name: _check(t) for t in self.tools}
        self.started, self.created = now, created
        self.async_wait_s, self.max_attempts = async_wait_s, max_attempts
        self.status, self.reason = "running", ""
        self.answer: str | None = None
        self.finished_at: float | None = None
        self.steps: list[StepRecord] = []
        self.tokens = self.calls_used = 0
        self.turns: list[Turn] = []
        self.inbox: list[str] = []  # observations the thinker has not seen yet
        self.running: dict[str, CallRecord] = {}
        self.outbox: list[PlannedCall] = []
        self.fresh = False  # a call ended since the last step
        self.need_result = False  # an answer was refused while calls run
        self.last_step_at = now
        self.attempt_counts: dict[str, int] = {}
        self.events: list[Event] = [("plan.created", {
            "step": 0, "goal": goal, "mode": mode, "budget": budget.to_json()})]

    # ---- what to do next ------------------------------------------------------------

    def next(self, now: float) -> Action:
        if self.status == "running" and now - self.started >= self.budget.wall_s:
            self.fail("budget_wall", now)
        if self.status != "running":
            return Finished(self.status, self.answer, self.reason)
        if self.outbox:
            calls, self.outbox = tuple(self.outbox), []
            return Dispatch(calls)
        wall_end = self.started + self.budget.wall_s
        if self.running and (self.mode == SYNC or self.need_result or not self.fresh):
            until = wall_end
            if self.mode == ASYNC and not self.need_result:
                until = min(until, self.last_step_at + self.async_wait_s)
            if self.mode == SYNC or self.need_result or now < until:
                return Wait(until)
        if len(self.steps) >= self.budget.steps:
            self.fail("budget_steps", now)
        elif self.tokens >= self.budget.tokens:
            self.fail("budget_tokens", now)
        if self.status != "running":
            return Finished(self.status, self.answer, self.reason)
        if self.turns and self.inbox:
            last = self.turns[-1]
            self.turns[-1] = Turn(last.step, last.observations + tuple(self.inbox))
        elif self.inbox:  # nothing before the first step sees these; keep them
            self.turns.append(Turn("", tuple(self.inbox)))
        self.inbox, self.fresh = [], False
        return Think(Transcript(
            self.goal, self.tools, tuple(self.turns),
            tuple(f"{c.call_id} {c.tool}" for c in self.running.values()),
            min(STEP_TOKENS, self.budget.tokens - self.tokens), len(self.steps) + 1,
            self.notes))

    # ---- what happened --------------------------------------------------------------

    def stepped(self, text: str, tokens: int, now: float) -> str:
        """The thinker's step; returns the parse's outcome (ok, or the failure's kind)."""
        if self.status != "running":
            return PARSED
        n = len(self.steps) + 1
        self.tokens += max(0, tokens)
        self.last_step_at = now
        try:
            step = parse_step(text, self.checks)
        except Unparsed as exc:
            self.steps.append(StepRecord(n, text[:300], parsed=False))
            self._event("plan.thought", n, text=text[:300], tokens=tokens,
                        elapsed_s=self._elapsed(now))
            self.turns.append(Turn(text[:1000]))
            self._replan(n, f"step {n} did not parse: {exc}")
            return exc.kind
        self.steps.append(StepRecord(n, step.thought))
        self._event("plan.thought", n, text=step.thought, tokens=tokens,
                    elapsed_s=self._elapsed(now))
        self.turns.append(Turn(step.text()))
        if step.answer is not None:
            self._answered(n, step, now)
        else:
            self._calls(n, step, now)
        return PARSED

    def attempted(self, call_id: str, peer: str, code: str, message: str) -> None:
        """One attempt of a running call ended (ok or not); a retry event if another
        attempt follows."""
        call = self.running.get(call_id)
        if call is None:
            return
        n = self.attempt_counts[call_id] = self.attempt_counts.get(call_id, 0) + 1
        if code != "ok" and retried(code) and n < self.max_attempts:
            self._event("plan.retry", _step_of(call_id), call_id=call_id, tool=call.tool,
                        peer=peer, attempt=n + 1, reason=f"{code}: {message}"[:300])

    def ended(self, call_id: str, *, ok: bool, code: str, peer: str, elapsed_s: float,
              attempts: int, result: Any = None, message: str = "") -> None:
        """A running call's end: its result, or its failure after the retries."""
        call = self.running.pop(call_id, None)
        if call is None or self.status != "running":
            return  # unknown, or already ended: each result is shown once
        call.ok, call.code, call.peer = ok, code, peer
        call.elapsed_s, call.attempts = elapsed_s, attempts
        shown: dict[str, Any] = {"call": call_id, "tool": call.tool}
        if ok:
            shown["result"] = result
        else:
            shown["error"] = f"{code}: {message}"
        call.observation = _observation(shown)
        self.inbox.append(call.observation)
        self.fresh = True
        self.need_result = False
        self._event("plan.result", _step_of(call_id), call_id=call_id, tool=call.tool,
                    peer=peer, ok=ok, code=code, elapsed_s=round(elapsed_s, 6),
                    attempts=attempts, observation=call.observation)
        if not ok:
            # the observation already says what failed: the event alone
            self._replan(len(self.steps), f"call {call_id} ({call.tool}) failed: {code}: "
                         f"{message}", observe=False)

    def fail(self, reason: str, now: float) -> None:
        """End the plan failed; the calls still running are cancelled."""
        if self.status != "running":
            return
        for call in self.running.values():
            call.ok, call.code = False, CANCELLED
        self.running.clear()
        self.outbox.clear()
        self.status, self.reason = "failed", reason[:500]
        self.finished_at = now
        self._event("plan.failed", len(self.steps), reason=self.reason)

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    # ---- the rules of a step --------------------------------------------------------

    def _answered(self, n: int, step: Step, now: float) -> None:
        if self.running:
            ids = ", ".join(sorted(self.running))
            self._replan(n, f"step {n} answered while calls {ids} still run; their results "
                         "come first, then answer")
            self.need_result = True
            return
        self.status, self.answer, self.finished_at = "answered", step.answer, now
        self._event("plan.answer", n, text=step.answer)

    def _calls(self, n: int, step: Step, now: float) -> None:
        if self.calls_used + len(step.calls) > self.budget.calls:
            self.fail("budget_calls", now)
            return
        self.calls_used += len(step.calls)
        for i, c in enumerate(step.calls, 1):
            call = CallRecord(f"{n}.{i}", c.tool, c.arguments)
            self.steps[-1].calls.append(call)
            self.running[call.call_id] = call
            self.outbox.append(PlannedCall(call.call_id, c.tool, c.arguments))
            self._event("plan.call", n, call_id=call.call_id, tool=c.tool,
                        arguments=c.arguments)

    def _replan(self, n: int, reason: str, *, observe: bool = True) -> None:
        reason = reason[:MAX_OBSERVATION_CHARS]
        if observe:
            self.inbox.append(reason)
        self._event("plan.replan", n, reason=reason)

    def _event(self, kind: str, step: int, **data: Any) -> None:
        self.events.append((kind, {"step": step, **data}))

    def _elapsed(self, now: float) -> float:
        return round(now - self.started, 6)

    # ---- the record -----------------------------------------------------------------

    def record(self, now: float) -> dict[str, Any]:
        end = self.finished_at if self.finished_at is not None else now
        return {
            "id": self.id, "goal": self.goal, "mode": self.mode, "status": self.status,
            "created": self.created,
            "finished": None if self.finished_at is None
            else round(self.created + self.finished_at - self.started, 6),
            "budget": self.budget.to_json(),
            "used": {"steps": len(self.steps), "tokens": self.tokens,
                     "wall_s": round(end - self.started, 6), "calls": self.calls_used},
            "steps": [s.to_json() for s in self.steps],
            "answer": self.answer, "reason": self.reason}


def _check(tool: ToolSpecLike) -> SchemaCheck:
    try:
        return SchemaCheck(tool.input_schema, f"{tool.name}: inputSchema")
    except SchemaInvalid as exc:
        raise ValueError(str(exc)) from None


def _step_of(call_id: str) -> int:
    return int(call_id.split(".", 1)[0])


def _observation(shown: dict[str, Any]) -> str:
    text = json.dumps(shown, ensure_ascii=False, separators=(", ", ": "), default=str)
    return text if len(text) <= MAX_OBSERVATION_CHARS else \
        text[:MAX_OBSERVATION_CHARS - 1] + "…"
