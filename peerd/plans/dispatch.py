"""One step's tool calls, run in parallel across the peers that offer each tool, never
beyond a peer's declared capacity, with retry elsewhere (Gradientsys, issue 27).

`dispatch(calls, offers, call_one, slots=...)` starts every call at once; each call
takes a slot at the best peer with one free (retry.py's rules, choice.rank's order),
waits here when every candidate is full, and runs one attempt under the policy's
deadline. A failure that says nothing about the call (busy, deadline, unreachable,
silence, a forged or garbled answer) is retried after a jittered backoff on another
peer when there is one; a peer that was unreachable, silent or lying is passed over by
the rest of the batch. A peer that dies mid-call is routed around at once: its
connection's end ends the streams of the calls there (`unreachable`, caller.py), and
the node's disconnect notification cancels whatever attempt is still at that peer
(`Departures`), so neither waits out the attempt's deadline. The callee's
verdict on the call itself is the observation and is not retried. After the budget the
call's failure is a `Dispatched` with `ok` false: the tool, what failed, on which peers,
how many attempts. Nothing a peer does makes `dispatch` raise; the results come back
in the calls' order.

`call_one(offer, call, deadline_s)` is the transport (Tools wires it to call_tool; the
tests script it); `offers(tool)` is read again before each attempt, so a peer that
leaves the ledger is no longer a candidate.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from peerd.plans.caller import (
    TIMEOUT,
    UNREACHABLE,
    Outcome,
    ToolFailure,
    ToolResult,
    new_call_id,
)
from peerd.plans.choice import Offer
from peerd.plans.retry import (
    DEFAULT_POLICY,
    NO_OFFER,
    SUSPECT,
    RetryPolicy,
    Slots,
    backoff_s,
    candidates,
    pick,
    retried,
)
from protocols import tool as wire

ATTEMPT_MARGIN_S = 5.0  # past an attempt's deadline: the callee's own "deadline" answer

CallOne = Callable[[Offer, "Call", float], Awaitable[Outcome]]
Offers = Callable[[str], Sequence[Offer]]
Observe = Callable[["Call", "Attempt"], None]
Done = Callable[["Dispatched"], None]


class Limiter(Slots):
    """The slots, and a wakeup for the calls waiting on one: shared by every batch of a
    peer, so a slot freed by one batch wakes the calls of all."""

    def __init__(self) -> None:
        super().__init__()
        self._freed = trio.Event()

    def give(self, peer: str, tool: str) -> None:
        super().give(peer, tool)
        self._freed.set()
        self._freed = trio.Event()

    async def freed(self) -> None:
        await self._freed.wait()


class Departures:
    """The attempts in flight, by peer, each with a cancel scope: `left(peer)` (wired to
    the node's disconnect notification, Node.on_disconnect) cancels those at a peer
    that left, so each ends at once as `unreachable` instead of waiting out its
    deadline. No polling: the notification does it."""

    def __init__(self) -> None:
        self._scopes: dict[str, set[trio.CancelScope]] = {}

    @contextlib.contextmanager
    def watch(self, peer: str) -> Iterator[trio.CancelScope]:
        """A cancel scope (for the caller to enter) that `left(peer)` cancels while
        this block runs."""
        scope = trio.CancelScope()
        scopes = self._scopes.setdefault(peer, set())
        scopes.add(scope)
        try:
            yield scope
        finally:
            scopes.discard(scope)
            if not scopes and self._scopes.get(peer) is scopes:
                del self._scopes[peer]

    def left(self, peer: str) -> None:
        for scope in self._scopes.pop(peer, set()):
            scope.cancel()

    def watched(self, peer: str) -> int:
        return len(self._scopes.get(peer, ()))


def left_mid_call(peer: str, tool: str, call_id: str) -> ToolFailure:
    return ToolFailure(peer, tool, call_id, UNREACHABLE,
                       "the peer disconnected during the call", "caller")


@dataclass(frozen=True, slots=True)
class Call:
    tool: str
    arguments: dict[str, Any]
    call_id: str = field(default_factory=new_call_id)
    schema: str = ""  # the schema hash its arguments were written for ("": any)


@dataclass(frozen=True, slots=True)
class Attempt:
    peer: str
    code: str  # "ok" or the failure's code
    by: str  # "callee" | "caller" ("" for ok)
    message: str
    queued_s: float  # waiting for a free slot (the backoff not included)
    elapsed_s: float  # the attempt itself

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "code": self.code, "by": self.by, "message": self.message,
                "queued_s": round(self.queued_s, 6), "elapsed_s": round(self.elapsed_s, 6)}


@dataclass(frozen=True, slots=True)
class Dispatched:
    """One call's end: its result, or its failure as an observation."""

    call: Call
    outcome: Outcome | None  # the last attempt's; None: never sent (no offer)
    attempts: tuple[Attempt, ...]
    elapsed_s: float  # from the batch's start to this call's end
    message: str = ""  # with ok false: what failed, in words

    @property
    def ok(self) -> bool:
        return isinstance(self.outcome, ToolResult)

    @property
    def peer(self) -> str:
        return self.outcome.peer if self.outcome is not None else ""

    @property
    def code(self) -> str:
        if self.outcome is None:
            return NO_OFFER
        return self.outcome.code if isinstance(self.outcome, ToolFailure) else wire.OK

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok, "tool": self.call.tool, "call_id": self.call.call_id,
            "peer": self.peer, "attempts": [a.to_json() for a in self.attempts],
            "elapsed_s": round(self.elapsed_s, 6)}
        if isinstance(self.outcome, ToolResult):
            out["result"] = self.outcome.value
        else:
            by = self.outcome.by if self.outcome is not None else "caller"
            out["error"] = {"code": self.code, "message": self.message, "by": by,
                            "peers": sorted({a.peer for a in self.attempts})}
        return out


async def dispatch(calls: Sequence[Call], offers: Offers, call_one: CallOne, *,
                   slots: Limiter, policy: RetryPolicy = DEFAULT_POLICY,
                   rng: random.Random | None = None, observe: Observe | None = None,
                   done: Done | None = None, departures: Departures | None = None
                   ) -> list[Dispatched]:
    """Run `calls` at once; their ends in the same order. `slots` is shared by every
    batch of this peer, so two batches together stay within each capacity. `observe`
    hears each attempt, `done` each call's end as it comes (a planner in async mode
    goes on with the first). `departures` ends the attempts at a peer that leaves."""
    batch = _Batch(offers, call_one, slots, policy, rng or random.Random(), observe,
                   departures or Departures())
    results: list[Dispatched | None] = [None] * len(calls)

    async def run(i: int, call: Call) -> None:
        results[i] = end = await batch.run(call)
        if done is not None:
            done(end)

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(run, i, call)
    return [r for r in results if r is not None]


class _Batch:
    def __init__(self, offers: Offers, call_one: CallOne, slots: Limiter,
                 policy: RetryPolicy, rng: random.Random, observe: Observe | None,
                 departures: Departures) -> None:
        self.offers = offers
        self.departures = departures
        self.call_one = call_one
        self.slots = slots
        self.policy = policy
        self.rng = rng
        self.observe = observe
        self.suspects: set[str] = set()
        self.started = trio.current_time()

    async def run(self, call: Call) -> Dispatched:
        attempts: list[Attempt] = []
        tried: set[str] = set()
        outcome: Outcome | None = None
        for n in range(1, self.policy.max_attempts + 1):
            await trio.sleep(backoff_s(self.policy, n, self.rng))
            queued_at = trio.current_time()
            offer = await self._slot(call, tried)
            if offer is None:
                break
            began = trio.current_time()
            try:
                outcome = await self._attempt(offer, call)
            finally:
                self.slots.give(offer.peer, call.tool)
            attempt = _attempt_of(offer.peer, outcome, began - queued_at,
                                  trio.current_time() - began)
            attempts.append(attempt)
            tried.add(offer.peer)
            if attempt.code in SUSPECT:
                self.suspects.add(offer.peer)
            if self.observe is not None:
                self.observe(call, attempt)
            if not (isinstance(outcome, ToolFailure) and retried(outcome.code)):
                break
        return Dispatched(call, outcome, tuple(attempts), trio.current_time() - self.started,
                          _failure_words(call, outcome, attempts))

    async def _slot(self, call: Call, tried: set[str]) -> Offer | None:
        """A slot taken at the best candidate peer, waiting for one to free; None when
        nobody offers the tool."""
        tool = call.tool
        while True:
            offers = candidates(self.offers(tool), tried, self.suspects, call.schema)
            if not offers:
                return None
            offer = pick(offers, tool, self.slots)
            if offer is not None and self.slots.try_take(offer.peer, tool, offer.capacity):
                return offer
            await self.slots.freed()

    async def _attempt(self, offer: Offer, call: Call) -> Outcome:
        deadline_s = self.policy.attempt_deadline_s
        with self.departures.watch(offer.peer) as lost, \
                trio.move_on_after(deadline_s + ATTEMPT_MARGIN_S):
            with lost:
                return await self.call_one(offer, call, deadline_s)
            return left_mid_call(offer.peer, call.tool, call.call_id)
        return ToolFailure(offer.peer, call.tool, call.call_id, TIMEOUT,
                           f"no answer within {deadline_s + ATTEMPT_MARGIN_S:g} s", "caller")


def _attempt_of(peer: str, outcome: Outcome, queued_s: float, elapsed_s: float) -> Attempt:
    if isinstance(outcome, ToolResult):
        return Attempt(peer, wire.OK, "", "", queued_s, elapsed_s)
    return Attempt(peer, outcome.code, outcome.by, outcome.message, queued_s, elapsed_s)


def _failure_words(call: Call, outcome: Outcome | None, attempts: list[Attempt]) -> str:
    if isinstance(outcome, ToolResult):
        return ""
    if outcome is None:
        return (f"no live peer offers a tool {call.tool!r:.80}; `peerd tools` lists who "
                "offers what")
    peers = ", ".join(sorted({a.peer[-8:] for a in attempts}))
    if not retried(outcome.code):
        return f"{call.tool}: {outcome.code} on {peers}: {outcome.message}"
    return (f"{call.tool} failed {len(attempts)} times on {peers}; last: {outcome.code}: "
            f"{outcome.message}")
