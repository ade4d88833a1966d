"""Typed tools as a service: this peer's tools served to the swarm, and the swarm's
tools called from here (Gradientsys, first slice: no planner yet).

Serving: the tools of `Toolbox` over `/peerd/tool/1.0.0` (protocols/tool.py), every
result signed with our key; each call counted on /metrics (plans/metrics.py) and told
on /events as `tool.served`. In our ledger entry the service owns `tools`: each tool's
name, schema hash and capacity.

Calling: `call(tool, arguments, peer=None)` picks the peer when none is named (choice.py:
free capacity, then RTT), fetches and caches the tool's full schema by its hash, checks
the arguments against it before anything is sent (a bad call costs no round trip), and
on "busy" or a peer that cannot be reached tries the next offer. Each call is told on
/events as `tool.called`. `dispatch(calls)` runs a step's calls in parallel across the
peers offering each tool, within their capacities, with retry elsewhere (dispatch.py).
A peer that leaves mid-call ends its attempts at once (the node's disconnect
notification, `Departures`), and a peer that failed as unreachable or silent ranks
last for a while in every later call and batch (suspects.py).
It serves `/v1/tools` in the local API (api/tools.py).

External MCP servers (`--mcp`, external.py) run in this service's nursery: each one's
tools are offered here while it is up and withdrawn when it is not.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import trio
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd.agents.reputation import views
from peerd.agents.sealing import seal
from peerd.api.recall import Recall
from peerd.inference.face import LanguageModel
from peerd.ledger.gossip import LedgerGossip
from peerd.node import Node
from peerd.plans.asking import RunTask
from peerd.plans.builtins import offered
from peerd.plans.caller import (
    MALFORMED,
    TIMEOUT,
    UNREACHABLE,
    Outcome,
    ToolFailure,
    call_tool,
    list_tools,
    new_call_id,
)
from peerd.plans.choice import Offer, rank
from peerd.plans.dispatch import (
    Attempt,
    Call,
    Departures,
    Dispatched,
    Done,
    Limiter,
    Observe,
    dispatch,
    left_mid_call,
)
from peerd.plans.mcp_settings import DEFAULT_SETTINGS, McpMetrics, McpSettings
from peerd.plans.metrics import DispatchMetrics, ToolMetrics
from peerd.plans.nodes import GrammarTooLarge, grammar_size
from peerd.plans.retry import DEFAULT_POLICY, RetryPolicy
from peerd.plans.schema import BadTool, Invalid, SchemaCheck, SchemaInvalid
from peerd.plans.suspects import SUSPECT_S, Suspects
from peerd.plans.tool import Tool
from peerd.plans.toolbox import Toolbox
from peerd.rpc import stream_handler
from peerd.service import EntryFields, Service
from protocols import tool as wire
from protocols.tool import SignedResult, ToolReply, ToolRequest, ToolSpec

if TYPE_CHECKING:
    from pathlib import Path

    from starlette.routing import BaseRoute

    from peerd.plans.external import ExternalServer

log = logging.getLogger(__name__)

MAX_TRIES = 3  # offers tried for one call when the caller named no peer
RETRY_ON = (wire.BUSY, UNREACHABLE, TIMEOUT)
MAX_CACHED_SCHEMAS = 256
# a schema refused (no JSON Schema, a grammar past its cap) is not fetched again for so
# long: every plan start asked its peer again and counted the same offence again
REFUSED_SCHEMA_S = 600.0
DEFAULT_DEADLINE_S = 30.0


class NoOffer(LookupError):
    """No live peer offers the tool (or not the named peer); the message says what to do."""


class Tools(Service):
    name = "tools"

    def __init__(self, node: Node, ledger: LedgerGossip, *,
                 builtins: Sequence[tuple[str, int | None]] = (),
                 tools_dir: Path | None = None, extra: Iterable[Tool] = (),
                 model: Callable[[], LanguageModel] | None = None,
                 run_task: RunTask | None = None,
                 mcp: Sequence[str] = (), mcp_settings: McpSettings = DEFAULT_SETTINGS,
                 suspect_s: float = SUSPECT_S) -> None:
        self.node = node
        self.ledger = ledger
        # the peer's memory, for memory_search (the daemon hands it over, as to Symphony)
        self.recall: Recall | None = None
        # ask and vote: the face of the model we serve and Symphony's run_task, when the
        # daemon hands them over (a peer that serves a model)
        self.toolbox = Toolbox(node.peer_id, [
            *offered(builtins, tools_dir, lambda: self.recall, model=model,
                     run_task=run_task), *extra])
        self.metrics = ToolMetrics(node.metrics.registry, self.toolbox)
        # (peer, tool) -> our calls there: the dispatcher never exceeds a capacity in it
        self.slots = Limiter()
        self.load: Counter[tuple[str, str]] = self.slots.load
        self.dispatch_metrics = DispatchMetrics(node.metrics.registry, self.slots)
        # our attempts in flight by peer, ended at once when the peer disconnects
        self.departures = Departures()
        # peers that failed as unreachable or silent: ranked last for `suspect_s`
        self.suspects = Suspects(suspect_s)
        self.rng = random.Random()
        self._checks: dict[str, SchemaCheck] = {}  # schema hash -> its inputSchema's check
        self._specs: dict[str, ToolSpec] = {}  # schema hash -> the tool's full contract
        self._refused: dict[str, float] = {}  # schema hash -> when we refused it
        # external MCP servers, re-exported (external.py), in this service's nursery
        self.mcp_metrics = McpMetrics(node.metrics.registry)
        self.external: list[ExternalServer] = []
        if mcp:  # (the SDK is imported only for them: mcp_settings.py)
            from peerd.plans.external import ExternalServer
            self.external = [ExternalServer(f"mcp{i}", command, self, self.mcp_metrics,
                                            mcp_settings) for i, command in enumerate(mcp)]

    # ---- the service ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self.node.set_stream_handler(wire.TOOL.id, stream_handler(wire.TOOL, self._serve,
                                                                  self.node.offence))
        self.node.on_disconnect(self.departures.left)
        self.node.on_connect(self._reconnected)
        async with trio.open_nursery() as nursery:
            for server in self.external:
                nursery.start_soon(server.run)
            task_status.started()

    def entry_fields(self) -> EntryFields:
        return {"tools": tuple(self.toolbox.tools[n].brief() for n in self.toolbox.names())}

    def routes(self) -> Sequence[BaseRoute]:
        from peerd.api.tools import routes

        return routes(self)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tools": {
            name: {"capacity": cap.limit, "in_flight": cap.in_flight}
            for name, cap in sorted(self.toolbox.capacity.items())}}
        if self.external:
            out["mcp_servers"] = {s.label: s.status() for s in self.external}
        return out

    def register(self, tool: Tool) -> None:
        """Offer one more tool (BadTool if its definition is refused); the new entry goes
        out on gossip at once."""
        self.toolbox.register(tool)
        self.ledger.republish()

    # ---- external MCP servers' tools (external.ToolHost) ----------------------------

    def offered(self, name: str) -> bool:
        return name in self.toolbox.tools

    def offer(self, tools: Sequence[Tool]) -> list[tuple[str, str]]:
        """Offer several tools, one new ledger entry; (name, reason) for each refused."""
        refused = []
        for tool in tools:
            try:
                self.toolbox.register(tool)
            except (BadTool, ValueError) as exc:
                refused.append((tool.name, str(exc)))
        self.ledger.republish()
        return refused

    def withdraw(self, names: Sequence[str]) -> None:
        for name in names:
            self.toolbox.withdraw(name)
        self.ledger.republish()

    # ---- serving --------------------------------------------------------------------

    async def _serve(self, caller: str, request: ToolRequest) -> ToolReply:
        request.check()  # WireError: the stream layer answers it and counts the offence
        if request.call is None:
            return ToolReply(tools=tuple(self.toolbox.tools[n].spec()
                                         for n in self.toolbox.names()))
        result = await self.toolbox.execute(request.call, caller)
        self.metrics.observe(result.tool, result.outcome, result.elapsed_s)
        self.node.events.publish("tool.served", tool=result.tool[:64], caller=caller,
                                 call_id=result.call_id, outcome=result.outcome,
                                 elapsed_ms=round(result.elapsed_s * 1000, 3))
        body, sig = seal(result, self.node.key_pair.private_key)
        return ToolReply(result=SignedResult(body=body, sig=sig))

    # ---- peers that left -------------------------------------------------------------

    async def _reconnected(self, peer: str) -> None:
        """A peer connected (the hook runs a moment later, after the other services'
        hooks): back, if still connected (a dying peer's listener can take a last dial
        as it shuts down) and connected after it failed."""
        connected_at = self.node.welcomed_at(peer)
        if self.node.link_up(peer) and connected_at is not None:
            self.suspects.clear(peer, connected_at)

    def _failed(self, peer: str, code: str) -> None:
        """An attempt at `peer` ended `code`: suspect the peer if it says it is gone."""
        if peer == self.node.peer_id:
            return
        if self.suspects.failed(peer, code, trio.current_time(), time.time()):
            log.info("peer %s failed as %s: ranked last for %g s", peer[-8:], code,
                     self.suspects.hold_s)

    # ---- the swarm's tools ----------------------------------------------------------

    def offers(self, tool: str | None = None) -> list[tuple[str, Offer, str]]:
        """(tool, offer, peer name) for every live ledger entry's tools."""
        out = []
        book = self.ledger.book.entries()
        entries = [e for e in book if any(tool is None or b.name == tool for b in e.tools)]
        # Symphony's reputation view of the peers offering: ours is what our own entry
        # publishes; the views are taken together in one walk of every entry's reports
        # (one view per entry walked them all: a full book took seconds on the loop)
        reports = {e.peer_id: e.reputation for e in book}
        own = reports.get(self.node.peer_id, {})
        standing = views([e.peer_id for e in entries], self.node.peer_id, own, reports)
        now = trio.current_time()
        for entry in entries:
            rtt = 0.0 if entry.peer_id == self.node.peer_id else \
                self.node.rtt_ms.get(entry.peer_id)
            suspect = self.suspects.suspected(entry.peer_id, entry.timestamp, now)
            for brief in entry.tools:
                if tool is None or brief.name == tool:
                    offer = Offer(entry.peer_id, brief.schema, brief.capacity,
                                  self.slots.held(entry.peer_id, brief.name), rtt,
                                  standing[entry.peer_id], suspect)
                    out.append((brief.name, offer, entry.name))
        return out

    async def dispatch(self, calls: Sequence[Call], policy: RetryPolicy = DEFAULT_POLICY, *,
                       observe: Observe | None = None, done: Done | None = None
                       ) -> list[Dispatched]:
        """Run a step's calls at once across the peers offering each tool (dispatch.py);
        every call's end, in order, a failure as an observation. `observe` hears each
        attempt and `done` each call's end as it comes (the planner's live events)."""
        def offers(tool: str) -> list[Offer]:
            return [o for _, o, _ in self.offers(tool)]

        async def call_one(offer: Offer, call: Call, deadline_s: float) -> Outcome:
            try:
                return await self._call_one(offer, call.tool, call.arguments, deadline_s,
                                            call_id=call.call_id, held=True)
            except ValueError as exc:  # arguments call_tool will not send (over the
                # wire's cap, not plain JSON): that call's failure, not the batch's
                return ToolFailure(offer.peer, call.tool, call.call_id,
                                   wire.INVALID_ARGUMENTS, str(exc)[:300], "caller")

        def counted(call: Call, attempt: Attempt) -> None:
            tool = call.tool[:64]
            self.dispatch_metrics.attempts.labels(tool, attempt.code).inc()
            self.dispatch_metrics.queued.labels(tool).observe(attempt.queued_s)
            self.dispatch_metrics.latency.labels(tool).observe(attempt.elapsed_s)
            self._failed(attempt.peer, attempt.code)
            if observe is not None:
                observe(call, attempt)

        return await dispatch(calls, offers, call_one, slots=self.slots, policy=policy,
                              rng=self.rng, observe=counted, done=done,
                              departures=self.departures)

    async def specs(self, names: Iterable[str] | None = None) -> dict[str, ToolSpec]:
        """The full contract of each tool named (default: every tool the live ledger
        offers): the schema most peers offer it under (then the lowest hash), ours from
        the toolbox, others' fetched at once from a peer offering it the first time it is
        seen (cached by hash). A tool no live peer offers, or whose contract cannot be
        fetched now, is left out."""
        wanted = None if names is None else set(names)
        by_name: dict[str, Counter[str]] = {}
        holders: dict[str, list[str]] = {}  # schema hash -> the peers offering it
        for name, offer, _ in self.offers():
            if wanted is None or name in wanted:
                by_name.setdefault(name, Counter())[offer.schema] += 1
                holders.setdefault(offer.schema, []).append(offer.peer)
        chosen = {name: min(tally, key=lambda h: (-tally[h], h))
                  for name, tally in by_name.items()}
        missing = sorted({h for h in chosen.values()
                          if self.spec_of(h) is None and not self.refused(h)})
        if missing:
            own = self.node.peer_id
            async with trio.open_nursery() as nursery:
                for schema in missing:
                    peer = own if own in holders[schema] else sorted(holders[schema])[0]
                    nursery.start_soon(self.tools_of, peer)  # a failure: left out
        found = {name: self.spec_of(schema) for name, schema in sorted(chosen.items())}
        return {name: spec for name, spec in found.items() if spec is not None}

    def find_peer(self, peer: str) -> str | None:
        """A peer id from an id or a ledger name."""
        for entry in self.ledger.book.entries():
            if peer in (entry.peer_id, entry.name):
                return entry.peer_id
        return None

    async def tools_of(self, peer: str) -> list[ToolSpec] | ToolFailure:
        specs = await list_tools(self.node, peer)
        if not isinstance(specs, ToolFailure):
            for spec in specs:
                self._remember(spec, peer)
        return specs

    async def call(self, tool: str, arguments: dict[str, Any], *, peer: str | None = None,
                   deadline_s: float = DEFAULT_DEADLINE_S) -> Outcome:
        """Call `tool` on `peer`, or on the best peer offering it (then up to MAX_TRIES
        offers while they are busy or gone). NoOffer when nobody offers it; ValueError
        for a call that cannot be sent (a deadline out of range)."""
        offers = [o for _, o, _ in self.offers(tool) if peer is None or o.peer == peer]
        if not offers:
            raise NoOffer((f"no live peer offers a tool {tool!r:.80}" if peer is None else
                           f"peer {peer[-8:]} offers no tool {tool!r:.80} in its ledger "
                           "entry") + "; `peerd tools` lists who offers what")
        outcome: Outcome | None = None
        for offer in rank(offers)[:MAX_TRIES if peer is None else 1]:
            call_id = new_call_id()
            with self.departures.watch(offer.peer) as lost:
                with lost:
                    outcome = await self._call_one(offer, tool, arguments, deadline_s,
                                                   call_id=call_id)
                if lost.cancelled_caught:
                    outcome = left_mid_call(offer.peer, tool, call_id)
            if isinstance(outcome, ToolFailure):
                self._failed(offer.peer, outcome.code)
            if not (isinstance(outcome, ToolFailure) and outcome.code in RETRY_ON):
                break
        assert outcome is not None
        return outcome

    async def _call_one(self, offer: Offer, tool: str, arguments: dict[str, Any],
                        deadline_s: float, *, call_id: str | None = None,
                        held: bool = False) -> Outcome:
        """One attempt; `held`: the dispatcher already holds a slot for it."""
        call_id = call_id or new_call_id()
        started = time.monotonic()
        check = await self._check_for(offer.peer, tool, offer.schema)
        if isinstance(check, tuple):
            outcome: Outcome = ToolFailure(offer.peer, tool, call_id, *check, "caller")
        else:
            try:
                check(arguments)
            except Invalid as exc:
                outcome = ToolFailure(offer.peer, tool, call_id, wire.INVALID_ARGUMENTS,
                                      f"arguments of {tool}: {exc}", "caller")
            else:
                if not held:
                    self.slots.take(offer.peer, tool)
                try:
                    outcome = await call_tool(self.node, offer.peer, tool, offer.schema,
                                              arguments, deadline_s=deadline_s,
                                              call_id=call_id)
                finally:
                    if not held:
                        self.slots.give(offer.peer, tool)
        self.node.events.publish(
            "tool.called", tool=tool, peer_id=offer.peer, call_id=call_id,
            outcome=outcome.code if isinstance(outcome, ToolFailure) else wire.OK,
            elapsed_ms=round((time.monotonic() - started) * 1000, 3))
        return outcome

    async def _check_for(self, peer: str, tool: str, schema: str
                         ) -> Callable[[Any], Any] | tuple[str, str]:
        """The check of `tool`'s arguments under the schema hash `schema`: cached, or
        fetched from `peer` (tools/list) and cached; else (code, message)."""
        check = self._checks.get(schema)
        if check is not None:
            return check
        specs = await self.tools_of(peer)
        if isinstance(specs, ToolFailure):
            return specs.code, f"cannot fetch {tool}'s schema: {specs.message}"
        check = self._checks.get(schema)
        if check is None:
            return MALFORMED, (f"the peer's tools/list has no {tool} of schema "
                               f"{schema[:12]}… (its ledger entry is stale, or its schema "
                               "unusable); try again shortly")
        return check

    def spec_of(self, schema: str) -> ToolSpec | None:
        """A tool's full contract by its schema hash, if we have seen it (our own tools
        are always known)."""
        for tool in self.toolbox.tools.values():
            if tool.schema == schema:
                return tool.spec()
        return self._specs.get(schema)

    def refused(self, schema: str) -> bool:
        """Whether we refused the tool contract of this hash lately (REFUSED_SCHEMA_S)."""
        at = self._refused.get(schema)
        return at is not None and time.monotonic() - at < REFUSED_SCHEMA_S

    def _refuse(self, schema: str) -> None:
        self._refused[schema] = time.monotonic()
        while len(self._refused) > MAX_CACHED_SCHEMAS:
            del self._refused[next(iter(self._refused))]

    def _remember(self, spec: ToolSpec, peer: str) -> None:
        """Keep `peer`'s tool `spec` for plans and calls, unless its inputSchema is no
        JSON Schema, or one whose grammar passes MAX_NODES (nodes.py): that one is
        counted against `peer`, for an honest schema's is far below it."""
        if spec.schema in self._checks or self.refused(spec.schema):
            return
        try:
            check = SchemaCheck(spec.input_schema, f"{spec.name}: inputSchema")
        except SchemaInvalid as exc:
            log.info("a peer's tool %r has a schema we cannot use: %s", spec.name, exc)
            self._refuse(spec.schema)
            return
        try:
            grammar_size(spec.input_schema)
        except GrammarTooLarge as exc:
            self.node.offence(peer, "tool_schema", f"tool {spec.name!r:.80}: inputSchema: "
                              f"{exc}")
            self._refuse(spec.schema)
            return
        if len(self._checks) >= MAX_CACHED_SCHEMAS:
            oldest = next(iter(self._checks))
            del self._checks[oldest]
            self._specs.pop(oldest, None)
        self._checks[spec.schema] = check
        self._specs[spec.schema] = spec
