"""Generation at the entry peer, for one model: a request is prepared (routed, its
speculative options settled, its drafter built), then decoded round by round
(decoding.py) through pipeline sessions that the generator opens, pools, reuses and,
when they fail, blames; a given continuation can be scored in one pass.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import trio

from peerd import compute
from peerd.inference.decoding import Decoding
from peerd.inference.model.head import Head
from peerd.inference.options import SamplingParams, SpeculativeOptions
from peerd.inference.request import (
    GenerationRequest,
    GenerationStats,
    Logprobs,
    OnToken,
    TokenConstraint,
)
from peerd.inference.sampling import token_logprobs
from peerd.inference.speculative.acceptance import TokenClasses
from peerd.inference.speculative.catalog import DrafterCatalog
from peerd.inference.speculative.drafters import Drafter, DraftError, DraftSession
from peerd.inference.swarm.audit import Audits
from peerd.inference.swarm.pipeline import (
    Pipeline,
    PipelineFailure,
    PipelineSession,
    pooled_length,
)
from peerd.inference.swarm.routing import (
    BanList,
    NoRoute,
    Route,
    Server,
    find_route,
    servers_by_model,
)
from peerd.inference.swarm.warm import (
    WARM_MARGIN,
    WarmMargin,
    WarmRoute,
    prefer_warm,
    price,
    prompt_reuse_safe,
    reusable_prefix,
    route_dtypes,
)
from peerd.ledger.book import Ledger
from peerd.node import Node
from peerd.turns import Turns
from protocols.shard import FEATURE_TAGGED_ONLY

log = logging.getLogger(__name__)

MAX_FAILURES = 6  # per request: re-routes before giving up
PLAIN_ROUTES = 64  # routes whose plain round time a generator remembers
# What the entry's own work (embeddings, lm_head, drafting) is charged at the compute:
# little next to a shard's positions x layers, so it goes first among our turns.
ENTRY_COST = 1


class NoCoverage(Exception):
    """The swarm cannot serve the model end to end right now."""

    def __init__(self, model_id: str, route: NoRoute) -> None:
        super().__init__(f"no peer serves layers {route.describe()} of {model_id}")
        self.missing = route.missing
        self.layers = route.describe()  # the missing layers, as "[a, b), ..."


class GenerationFailed(Exception):
    pass


# What a shard says when it serves other peers within their shares and ours is full: it
# refused our session ("overloaded") or took it back ("evicted"). Not a fault.
SATURATED = frozenset({"overloaded", "evicted"})


class Saturated(GenerationFailed):
    """Every route goes through peers that refused or evicted our sessions for want of
    room (their capacity is taken, shared fairly among the peers asking, us among
    them): try again in `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def verify_mode(spec: SpeculativeOptions, params: SamplingParams) -> str:
    """The verification rule a request gets; DraftError when it contradicts the sampling."""
    greedy = params.temperature == 0.0
    if spec.verify == "auto" or not spec.enabled:
        return "greedy" if greedy else "sample"
    if spec.verify == "greedy" and not greedy:
        raise DraftError("verify=greedy needs temperature 0; use verify=sample (exactly the "
                         "target's distribution) to sample")
    if spec.verify == "adaptive" and not greedy:
        raise DraftError("verify=adaptive relaxes greedy decoding: set temperature 0, or use "
                         "verify=sample")
    if spec.verify == "sample" and greedy:
        return "greedy"  # the same rule at temperature 0
    return spec.verify


class Generator:
    """The entry peer's generation for one model: routes, pipeline sessions (opened,
    pooled, reused, blamed when they fail), requests prepared and decoded, and
    continuations scored."""

    def __init__(self, node: Node, ledger: Ledger, pipeline: Pipeline, head: Head, *,
                 model_id: str, num_layers: int, eos_ids: set[int],
                 compute: Turns,
                 wire_dtype: str = "float32", drafters: DrafterCatalog | None = None,
                 token_classes: Callable[[], TokenClasses] | None = None,
                 default_speculative: SpeculativeOptions | None = None,
                 max_session_length: int = 8192, prompt_cache: bool | None = None,
                 warm_margin: WarmMargin = WARM_MARGIN, audit_rate: float = 0.0) -> None:
        self.node = node
        self.ledger = ledger  # who serves which layers
        self.pipeline = pipeline
        self.head = head
        self.model_id = model_id
        self.num_layers = num_layers
        self.eos_ids = eos_ids
        self.compute = compute
        self.wire_dtype = wire_dtype
        self.drafters = drafters
        self.token_classes = token_classes
        self.default_speculative = default_speculative or SpeculativeOptions()
        self.max_session_length = max_session_length  # positions a shard session may hold
        # API requests ask for reuse_prefix: True/False as set, None where it is safe
        # (reuses_prompts)
        self.prompt_cache = prompt_cache
        self.warm_margin = warm_margin  # how much dearer a route keeping a warm prefix may be
        self.bans = BanList()
        self.audits = Audits(self, audit_rate)  # of the routes our requests took
        # route (its peers) -> a plain decoding round's ms there, as last measured
        self._plain_rounds: OrderedDict[tuple[str, ...], float] = OrderedDict()

    def plain_round(self, peers: Sequence[str], ms: float | None = None) -> float | None:
        """A plain decoding round's time on the route through `peers`: with `ms`,
        remember it (the newest routes only); the last figure (None: never measured),
        the estimate a speculative request starts from (gamma.TreeBudget)."""
        key = tuple(peers)
        if ms is not None:
            self._plain_rounds[key] = ms
            self._plain_rounds.move_to_end(key)
            while len(self._plain_rounds) > PLAIN_ROUTES:
                self._plain_rounds.popitem(last=False)
        return self._plain_rounds.get(key)

    def servers(self) -> list[Server]:
        """Who serves which layers of our model, from the ledger and our RTT probes;
        not the peers that take only tagged sessions (an RL run's pipeline shards)."""
        rtt = {**self.node.rtt_ms, self.node.peer_id: 0.0}
        entries = [e for e in self.ledger.entries() if FEATURE_TAGGED_ONLY not in e.features]
        return servers_by_model(entries, rtt).get(self.model_id, [])

    def route(self) -> Route | NoRoute:
        return find_route(self.servers(), self.num_layers, self.bans.banned(time.monotonic()))

    def reuses_prompts(self, route: Route) -> bool:
        """Whether an API request on `route` reuses a pooled session's prompt prefix:
        as --prompt-cache says, else where cached KV is as good as a fresh prefill
        (float32 on the wire and on every hop: warm.py)."""
        if self.prompt_cache is not None:
            return self.prompt_cache
        return self._reuse_safe(self.servers(), route)

    def _reuse_safe(self, servers: list[Server], route: Route) -> bool:
        return prompt_reuse_safe(self.wire_dtype, route_dtypes(servers, route))

    def warm_route(self, best: Route, max_length: int, tokens: Sequence[int],
                   drafting: bool) -> Route:
        """`best`, or the route of a pooled session whose caches spare a request reusing
        its prompt some of `tokens`, when that route costs within the warm margin of
        `best` now (warm.py)."""
        servers = self.servers()
        banned = self.bans.banned(time.monotonic())
        warm: list[WarmRoute] = []
        for hops, idle in self.pipeline.idle(max_length):
            priced = price(servers, hops, banned)
            if priced is None or (self.prompt_cache is None
                                  and not self._reuse_safe(servers, priced)):
                continue
            spared = max(reusable_prefix(s.cached, tokens, None if s.features is None
                                         else int(s.features.shape[0]), drafting)
                         for s in idle)
            warm.append(WarmRoute(priced, spared))
        return prefer_warm(best, warm, self.warm_margin)

    async def drafter(self, spec: SpeculativeOptions) -> Drafter | None:
        """The request's drafter, built on first use (in a thread: it may load weights)."""
        if not spec.enabled:
            return None
        if self.drafters is None:
            raise DraftError("this peer cannot draft (no drafter catalog)")
        catalog = self.drafters
        async with self.compute.take(self.node.peer_id, ENTRY_COST):
            return await compute.run(catalog.get, spec.draft)

    async def prepare(self, prompt_ids: Sequence[int], params: SamplingParams,
                      spec: SpeculativeOptions | None = None) -> GenerationRequest:
        """Settle everything that can refuse a request before it decodes: the route
        (NoCoverage when the swarm lacks layers), the speculative options (this peer's
        default when None; DraftError when they contradict the sampling) and their
        drafter (built on first use; DraftError when it cannot be had)."""
        spec = self.default_speculative if spec is None else spec
        route = self.route()
        if isinstance(route, NoRoute):
            raise self.no_route(route)
        verify = verify_mode(spec, params)
        drafter = await self.drafter(spec)
        return GenerationRequest(tuple(prompt_ids), params, spec, verify, drafter, route)

    async def generate(self, request: GenerationRequest, on_token: OnToken, *,
                       reuse_prefix: bool = False,
                       logprobs: Logprobs | None = None,
                       constraint: TokenConstraint | None = None) -> GenerationStats:
        """Decode up to request.params.max_tokens tokens after its prompt (decoding.py),
        handing each to on_token.

        reuse_prefix: take the pooled session whose caches hold the longest prefix of
        the prompt and compute only the rest (a fixed few-shot prompt, a chain resumed
        after a tool call). Its KV was computed in other passes, so its logits may
        differ from a fresh prefill's in the last bits: greedy output can part at a
        near-tie. A drafter is given the reused positions' features as the pooled
        session kept them (a session pooled by a plain request has none: then a
        speculative one reuses nothing).

        logprobs: report each token's log-probability under the target (the logits
        verification saw for its position, whatever the drafter proposed) there,
        before on_token gets the token.

        constraint: only the tokens its mask allows are chosen (the mask applies before
        greedy or sampled choice), the request decodes plain whatever its drafter,
        and generation ends once the constraint is finished (finish_reason "stop")."""
        return await Decoding(self, request, on_token, reuse_prefix=reuse_prefix,
                              logprobs=logprobs, constraint=constraint).run()

    async def score(self, prompt_ids: list[int], tokens: list[int]) -> list[float]:
        """log p(tokens[i] | prompt_ids + tokens[:i]) under the target, all of them from
        one pass through the pipeline; a pooled session's cached prefix of the prompt is
        not recomputed (the reused KV may move the last bits, as in `generate`). How a
        requester measures a chain of thought someone else wrote."""
        if not prompt_ids:
            raise ValueError("scoring needs at least one prompt token")
        history = prompt_ids + tokens
        if len(history) > self.max_session_length:
            raise ValueError(f"{len(history)} tokens to score, more than a session holds "
                             f"({self.max_session_length})")
        if not tokens:
            return []
        stats = GenerationStats(prompt_tokens=len(history))
        kept = self.audits.keeper()  # what the route returns, when drawn for an audit
        for failures in range(1, MAX_FAILURES + 1):
            session, fresh = await self.open(len(history), stats, history)
            if kept is not None:
                kept.forget()
            kv = 0
            if not fresh:  # the logits that score tokens[0] come after the prompt's last
                kv = min((await self.reuse(session, history, None))[0], len(prompt_ids) - 1)
            done = False
            try:
                hidden = await self.in_thread(self.embed, history[kv:])
                result = await session.step(hidden, kv, keep=kv if session.held > kv else -1)
                session.held = len(history)
                if kept is not None:
                    kept.keep(kv, result.hidden[0])
                rows = result.hidden[:, len(prompt_ids) - 1 - kv:-1, :]  # [1, len(tokens), H]
                scored: list[float] = await self.in_thread(self._logprobs, rows, tokens)
                done = True
                return scored
            except PipelineFailure as failure:
                if fresh:  # a pooled session that went stale is no one's fault
                    self.blame(failure, failures)
            finally:
                with trio.CancelScope(shield=True):
                    if done:
                        session.cached, session.features = tuple(history), None
                        await self.pipeline.release(session)
                        self.audits.after(session.route, history, kept)
                    else:
                        await session.close()
        raise GenerationFailed(f"could not score in {MAX_FAILURES} tries")

    async def reuse(self, session: PipelineSession, history: list[int],
                    drafting: DraftSession | None) -> tuple[int, torch.Tensor | None]:
        """How many leading tokens of `history` a pooled session's caches already hold
        for us (0 if none), and, when drafting, the features the session kept for them
        (the drafter has been told those tokens with all but the last one's)."""
        stored = session.features
        shared = reusable_prefix(session.cached, history, None if stored is None
                                 else int(stored.shape[0]), drafting is not None)
        if drafting is None or stored is None or shared == 0:
            return shared, None
        # features for all but the last told token, as DraftSession.extend wants
        await self.in_thread(drafting.extend, history[:shared], stored[:shared - 1])
        return shared, stored

    async def open(self, max_length: int, stats: GenerationStats, tokens: list[int],
                   route: Route | None = None, *, reuse: bool = False,
                   drafting: bool = False) -> tuple[PipelineSession, bool]:
        """A session on `route` (None: the best one now; a retry always routes again):
        an idle one from the pool (caching the longest prefix of `tokens`), else a new
        one (long enough for most later requests too); True if it is new. With `reuse`
        (the request reuses a pooled prefix; `drafting`: for a drafter), a route whose
        pooled session spares it some tokens is taken within the warm margin."""
        for attempt in range(1, MAX_FAILURES + 1):
            if route is None or attempt > 1:
                found = self.route()
                if isinstance(found, NoRoute):
                    raise self.no_route(found)
                route = found
            if reuse:
                route = self.warm_route(route, max_length, tokens, drafting)
            stats.route = [{"peer_id": s.peer_id, "layers": [s.start, s.end]}
                           for s in route.spans]
            pooled = self.pipeline.take(route, max_length, tokens)
            if pooled is not None:
                return pooled, False
            try:
                length = min(pooled_length(max_length), self.max_session_length)
                # its OPEN goes with the first FORWARD: a refusal fails that step
                session = await self.pipeline.start(route, length, self.wire_dtype)
            except PipelineFailure as failure:
                self.blame(failure, attempt)
                continue
            return session, True
        raise GenerationFailed(f"could not open a pipeline session in {MAX_FAILURES} tries")

    def blame(self, failure: PipelineFailure, failures: int, at_least_s: float = 0.0) -> None:
        log.info("pipeline failure (%s): %s", failure.code, failure)
        self.node.events.publish("inference.failure", culprit=failure.culprit,
                                 witness=failure.witness, code=failure.code,
                                 detail=str(failure)[:300])
        for peer in failure.at_fault:
            if peer != self.node.peer_id:
                banned_for = self.bans.ban(peer, time.monotonic(), failure.code, at_least_s)
                self.node.events.publish("inference.ban", peer_id=peer, seconds=banned_for,
                                         reason=failure.code)
        if failures >= MAX_FAILURES:
            if failure.code in SATURATED:
                raise Saturated(f"the swarm is saturated: {failures} tries found its peers "
                                f"busy; last: {failure}",
                                self._retry_after()) from failure
            raise GenerationFailed(f"gave up after {failures} pipeline failures; last: "
                                   f"{failure}") from failure

    async def forgive(self, peer_id: str) -> dict[str, Any]:
        """An operator's word that `peer_id` may serve our requests again: its ban and
        the audits' proofs against it forgotten. What there was to forget."""
        was = self.bans.remaining(peer_id, time.monotonic()) > 0
        self.bans.forgive(peer_id)
        proofs = await self.audits.forgive(peer_id)
        if was or proofs:
            self.node.events.publish("inference.forgiven", peer_id=peer_id, proofs=proofs)
        return {"peer_id": peer_id, "was_routed_around": was, "proofs_forgotten": proofs}

    def no_route(self, found: NoRoute) -> NoCoverage | Saturated:
        """Why there is no route now: nobody serves some layers (NoCoverage), or only
        peers that are saturated do (Saturated: they refused or evicted our sessions)."""
        now = time.monotonic()
        saturated = {p for p in self.bans.banned(now) if self.bans.why(p) in SATURATED}
        if saturated and not isinstance(
                find_route(self.servers(), self.num_layers,
                           self.bans.banned(now) - saturated), NoRoute):
            return Saturated(f"the swarm is saturated: every route to {self.model_id} goes "
                             "through peers that are busy now", self._retry_after())
        return NoCoverage(self.model_id, found)

    def _retry_after(self) -> float:
        """Seconds until a saturated peer may be tried again (at least one)."""
        now = time.monotonic()
        waits = [self.bans.remaining(p, now) for p in self.bans.banned(now)
                 if self.bans.why(p) in SATURATED]
        return max(1.0, min(waits, default=1.0))

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the compute thread, in one of our own turns (turns.py)."""
        async with self.compute.take(self.node.peer_id, ENTRY_COST):
            return await compute.run(fn, *args)

    def embed(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.head.embed(torch.tensor([ids], dtype=torch.long))  # [1, T, H]

    def _logprobs(self, hidden: torch.Tensor, tokens: list[int]) -> list[float]:
        """hidden [1, n, H], row i the position before tokens[i] -> log p(tokens[i])."""
        with torch.inference_mode():
            return [e.logprob for e in token_logprobs(self.head.logits(hidden)[0], tokens, 0)]
