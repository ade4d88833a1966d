"""Generation at the entry peer: route, open a pipeline session, decode token by token.

The entry peer keeps the session's token history. When a step fails, the peer at
fault is banned with back-off, a new route is found (a replica of the lost span),
the whole history is replayed through it in one step to rebuild the KV caches, and
decoding goes on from where it stopped: same tokens (greedy), or the same random
stream (sampling: the generator belongs to the request, not to the session).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio

from peerd import compute
from peerd.inference.options import MAX_GAMMA, SamplingParams, SpeculativeOptions
from peerd.inference.sampling import (
    Logprobs,
    TokenLogprob,
    distribution,
    make_generator,
    token_logprobs,
)
from peerd.inference.speculative.acceptance import (
    TokenClasses,
    TreeVerdict,
    verify_sample,
    verify_tree,
)
from peerd.inference.speculative.catalog import DrafterCatalog
from peerd.inference.speculative.drafters import (
    Drafter,
    DraftError,
    DraftSession,
    TreeDraftSession,
)
from peerd.inference.speculative.gamma import (
    MAX_TREE_NODES,
    TREE_DEPTH,
    GammaController,
    TreeBudget,
)
from peerd.inference.speculative.ngram import LOOKUP_BRANCHES
from peerd.inference.speculative.tree import TokenTree, chain_prefix
from peerd.inference.swarm.pipeline import (
    Pipeline,
    PipelineFailure,
    PipelineSession,
    common_prefix,
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
from peerd.node import Node

log = logging.getLogger(__name__)

MAX_FAILURES = 6  # per request: re-routes before giving up


class Head(Protocol):
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...  # [1, T] -> [1, T, H]
    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [1, T, H] -> [1, T, V]


class NoCoverage(Exception):
    """The swarm cannot serve the model end to end right now."""

    def __init__(self, model_id: str, route: NoRoute) -> None:
        super().__init__(f"no peer serves layers {route.describe()} of {model_id}")
        self.missing = route.missing


class GenerationFailed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Round:
    """One decoding round: drafted γ, kept `accepted`, where its time went."""

    drafted: int  # the draft's depth (its length, for a chain)
    accepted: int
    draft_ms: float
    pipeline_ms: float
    nodes: int = 0  # draft tokens sent (more than `drafted` for a tree)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    route: list[dict[str, Any]] = field(default_factory=list)
    pipeline_ms: float = 0.0  # wall time inside pipeline steps
    compute_ms: float = 0.0  # of which the shards computed
    head_ms: float = 0.0  # embeddings, lm_head, sampling and verification at the entry peer
    draft_ms: float = 0.0  # drafting at the entry peer
    wall_ms: float = 0.0
    steps: int = 0  # pipeline passes (the prompt's included)
    cached_tokens: int = 0  # prompt tokens whose KV a pooled session already held
    reroutes: int = 0
    finish_reason: str = "length"
    draft: str = "none"
    verify: str = "greedy"
    tree: bool = False  # drafts were token trees
    rounds: list[Round] = field(default_factory=list)  # decoding rounds (not the prompt's)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.wall_ms / 1e3) if self.wall_ms > 0 else 0.0

    def speculative_json(self) -> dict[str, Any]:
        n = len(self.rounds)
        drafted = sum(r.drafted for r in self.rounds)
        accepted = sum(r.accepted for r in self.rounds)
        by_position = [0] * max((r.drafted for r in self.rounds), default=0)
        for r in self.rounds:
            for i in range(r.accepted):
                by_position[i] += 1
        tried = [sum(1 for r in self.rounds if r.drafted > i) for i in range(len(by_position))]
        return {
            "draft": self.draft, "verify": self.verify, "rounds": n,
            "drafted_tokens": drafted, "accepted_tokens": accepted,
            # tokens committed per pipeline pass: accepted drafts + the target's own token
            "tokens_per_round": round((accepted + n) / n, 3) if n else 0.0,
            "accepted_per_round": round(accepted / n, 3) if n else 0.0,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
            # share of rounds that drafted position i where it was accepted
            "acceptance_by_position": [round(a / t, 3) if t else 0.0
                                       for a, t in zip(by_position, tried, strict=True)],
            "mean_gamma": round(drafted / n, 3) if n else 0.0,
            "tree": self.tree,  # then gamma is the depth, and nodes what was sent
            "mean_nodes": round(sum(r.nodes for r in self.rounds) / n, 3) if n else 0.0,
            "draft_ms": round(self.draft_ms, 3), "pipeline_ms": round(self.pipeline_ms, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route, "tokens_per_s": round(self.tokens_per_s, 3),
            "pipeline_ms": round(self.pipeline_ms, 3), "compute_ms": round(self.compute_ms, 3),
            "head_ms": round(self.head_ms, 3), "draft_ms": round(self.draft_ms, 3),
            "wall_ms": round(self.wall_ms, 3), "steps": self.steps, "reroutes": self.reroutes,
            "cached_tokens": self.cached_tokens,
            "speculative": self.speculative_json(),
        }


# Called with each new token id; returns False to stop (a stop string was reached).
OnToken = Callable[[int], Awaitable[bool]]


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
    def __init__(self, node: Node, pipeline: Pipeline, head: Head, *, model_id: str,
                 num_layers: int, eos_ids: set[int], compute: trio.CapacityLimiter,
                 wire_dtype: str = "float32", drafters: DrafterCatalog | None = None,
                 token_classes: Callable[[], TokenClasses] | None = None,
                 default_speculative: SpeculativeOptions | None = None,
                 max_session_length: int = 8192, prompt_cache: bool = False) -> None:
        self.node = node
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
        self.prompt_cache = prompt_cache  # API requests ask for reuse_prefix
        self.bans = BanList()

    def servers(self) -> list[Server]:
        """Who serves which layers of our model, from the ledger and our RTT probes."""
        rtt = {**self.node.rtt_ms, self.node.peer_id: 0.0}
        return servers_by_model(self.node.ledger.entries(), rtt).get(self.model_id, [])

    def route(self) -> Route | NoRoute:
        return find_route(self.servers(), self.num_layers, self.bans.banned(time.monotonic()))

    async def drafter(self, spec: SpeculativeOptions) -> Drafter | None:
        """The request's drafter, built on first use (in a thread: it may load weights)."""
        if not spec.enabled:
            return None
        if self.drafters is None:
            raise DraftError("this peer cannot draft (no drafter catalog)")
        catalog = self.drafters
        async with self.compute:
            return await compute.run(catalog.get, spec.draft)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       on_token: OnToken, spec: SpeculativeOptions | None = None,
                       *, reuse_prefix: bool = False,
                       logprobs: Logprobs | None = None) -> GenerationStats:
        """Decode up to params.max_tokens tokens after prompt_ids, in rounds: each round
        runs the uncached committed tokens plus a draft (if speculating) through the
        pipeline in one pass, then verification commits 1..γ+1 tokens. Plain decoding
        is the round without a draft. DraftError if `spec` cannot be honoured.

        reuse_prefix: take the pooled session whose caches hold the longest prefix of
        prompt_ids and compute only the rest (a fixed few-shot prompt, a chain resumed
        after a tool call). Its KV was computed in other passes, so its logits may
        differ from a fresh prefill's in the last bits: greedy output can part at a
        near-tie. A drafter is given the reused positions' features as the pooled
        session kept them (a session pooled by a plain request has none: then a
        speculative one reuses nothing).

        logprobs: report each token's log-probability under the target (the logits
        verification saw for its position, whatever the drafter proposed) there,
        before on_token gets the token."""
        spec = self.default_speculative if spec is None else spec
        mode = verify_mode(spec, params)
        drafter = await self.drafter(spec)
        classes = self.token_classes() if mode == "adaptive" and self.token_classes else None
        stats = GenerationStats(prompt_tokens=len(prompt_ids), draft=spec.draft, verify=mode)
        t_start = time.perf_counter()
        rng = make_generator(params)
        gamma = GammaController(fixed=spec.gamma)
        budget = TreeBudget()
        drafting = drafter.start() if drafter is not None else None
        # token trees where the drafter grows them and verification is greedy or adaptive
        tree_drafting = drafting if (spec.tree and mode != "sample" and isinstance(
            drafting, TreeDraftSession)) else None
        stats.tree = tree_drafting is not None
        history = list(prompt_ids)  # committed tokens
        told = 0  # history[:told] has been given to the drafter
        fed = 0  # positions whose features the drafter has
        # features of committed positions 0..fed-1 in order, pooled with the session for
        # the next request's drafter (only while drafting)
        collected: list[torch.Tensor] = []
        reused: torch.Tensor | None = None  # the pooled session's, for positions < kv
        kv = 0  # committed positions the pipeline's caches hold
        # drafts may run up to MAX_GAMMA positions past the last committed token (a
        # tree: its candidates and lookup branches)
        slack = 0 if drafter is None else MAX_GAMMA if tree_drafting is None else (
            MAX_TREE_NODES + LOOKUP_BRANCHES * MAX_GAMMA)
        max_length = min(len(prompt_ids) + params.max_tokens + slack, self.max_session_length)
        failures = 0
        session: PipelineSession | None = None
        fresh = True  # the session was opened for this request (not taken from the pool)
        finished = False
        try:
            while not finished:
                if session is None:
                    session, fresh = await self._open(max_length, stats, history)
                    kv = 0  # (re)play the whole history
                    if reuse_prefix and not fresh and told == 0:
                        kv, reused = await self._reuse(session, history, drafting)
                        stats.cached_tokens = kv
                        if reused is not None:  # the drafter knows history[:kv] now
                            told, fed = kv, kv - 1
                            collected = [reused[:fed]]
                pending = history[kv:]  # committed, not yet in the caches
                room = min(params.max_tokens - stats.completion_tokens - 1,
                           max_length - len(history))
                rng_state = rng.get_state()  # a failed round is redrafted identically
                draft = TokenTree([], [])
                probs: torch.Tensor | None = None  # what a sampled chain was drawn from
                grown = False  # a tree was grown this round (its size is then observed)
                t0 = t_round = time.perf_counter()
                # a drafter drafts after the last committed token: once it knows them all
                if drafting is not None and kv > 0 and told == len(history) and room > 0:
                    if tree_drafting is not None:
                        # auto with a head: TREE_DEPTH deep (its lookup branches), the
                        # head's levels stopping where they stop paying (deeper)
                        levels = tree_drafting.levels and gamma.fixed is None
                        depth = min(TREE_DEPTH if levels else gamma.next(), room)
                        grown = depth > 0 and budget.drafting()
                        if grown:
                            draft = await self._in_thread(
                                tree_drafting.propose_tree, depth, budget.choose,
                                budget.deeper if levels else None)
                            # every position this FORWARD writes must fit the session
                            draft = draft.head(max_length - len(history))
                    else:
                        depth = min(gamma.next(), room)
                        chain = await self._in_thread(drafting.propose, depth, params, rng)
                        draft, probs = TokenTree.chain(chain.tokens), chain.probs
                draft_ms = (time.perf_counter() - t0) * 1e3
                stats.draft_ms += draft_ms
                t0 = time.perf_counter()
                ids = pending + draft.tokens
                hidden = await self._in_thread(self._embed, ids)
                stats.head_ms += (time.perf_counter() - t0) * 1e3
                # a chain needs no parents; a tree hangs below the last pending token
                tree = () if draft.is_chain() else (
                    *range(-1, len(pending) - 1),
                    *(p + len(pending) if p >= 0 else len(pending) - 1 for p in draft.parents))
                try:
                    result = await session.step(hidden, kv, keep=kv if session.held > kv else -1,
                                                tree=tree)
                except PipelineFailure as failure:
                    await session.close()
                    session = None
                    rng.set_state(rng_state)
                    if not fresh and stats.steps == 0:
                        continue  # a pooled session that went stale: open a fresh one
                    failures += 1
                    self._blame(failure, failures)
                    stats.reroutes += 1
                    continue
                session.held = kv + len(ids)  # committed + this round's drafts
                stats.steps += 1
                stats.pipeline_ms += result.wall_ms
                stats.compute_ms += result.compute_ms
                t0 = time.perf_counter()
                verdict, scored = await self._in_thread(
                    self._verify, mode, result.hidden, len(pending), draft, probs, params, rng,
                    classes, logprobs.top if logprobs is not None else None)
                stats.head_ms += (time.perf_counter() - t0) * 1e3
                # the slots of the committed positions this pass ran: the pending tokens,
                # then the accepted path (all of it valid; only a prefix of slots that is
                # a chain stays in the caches, the rest is sent again next round)
                slots = [*range(len(pending)), *(len(pending) + n for n in verdict.path)]
                ran_to = kv + len(slots)  # committed positions with features now
                features = result.hidden[0, slots[max(fed, kv) - kv:]]  # [n, H]
                if fed < kv and reused is not None:  # the last reused position's first
                    features = torch.cat([reused[fed:kv], features])  # [n, H]
                if drafting is not None:
                    collected.append(features)
                kv += len(pending) + chain_prefix(verdict.path)
                fed = ran_to
                if kv > len(prompt_ids):  # a decoding round, not the prompt's pass
                    stats.rounds.append(Round(draft.depth(), len(verdict.path), draft_ms,
                                              result.wall_ms, len(draft)))
                    round_ms = (time.perf_counter() - t_round) * 1e3
                    gamma.observe(draft.depth(), len(verdict.path), round_ms)
                    if grown:
                        budget.observe(len(draft), *draft.estimated(verdict.path), round_ms,
                                       committed=len(verdict.path) + 1)
                for i, token in enumerate(verdict.committed(draft)):
                    history.append(token)
                    stats.completion_tokens += 1
                    eos = token in self.eos_ids
                    if logprobs is not None and not eos:
                        logprobs.entries.append(scored[i])
                    if eos or not await on_token(token):
                        stats.finish_reason = "stop"
                        finished = True
                        break
                    if stats.completion_tokens >= params.max_tokens:
                        finished = True
                        break
                if drafting is not None and not finished:
                    await self._in_thread(drafting.extend, history[told:], features)
                    told = len(history)
        finally:
            if session is not None:
                with trio.CancelScope(shield=True):
                    if finished:  # a clean end: the next request may reuse the session
                        session.cached = tuple(history[:kv])
                        session.features = torch.cat(collected)[:kv] if collected else None
                        await self.pipeline.release(session)
                    else:
                        await session.close()
            stats.wall_ms = (time.perf_counter() - t_start) * 1e3
        return stats

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
        for failures in range(1, MAX_FAILURES + 1):
            session, fresh = await self._open(len(history), stats, history)
            kv = 0
            if not fresh:  # the logits that score tokens[0] come after the prompt's last
                kv = min((await self._reuse(session, history, None))[0], len(prompt_ids) - 1)
            done = False
            try:
                hidden = await self._in_thread(self._embed, history[kv:])
                result = await session.step(hidden, kv, keep=kv if session.held > kv else -1)
                session.held = len(history)
                rows = result.hidden[:, len(prompt_ids) - 1 - kv:-1, :]  # [1, len(tokens), H]
                scored: list[float] = await self._in_thread(self._logprobs, rows, tokens)
                done = True
                return scored
            except PipelineFailure as failure:
                if fresh:  # a pooled session that went stale is no one's fault
                    self._blame(failure, failures)
            finally:
                with trio.CancelScope(shield=True):
                    if done:
                        session.cached, session.features = tuple(history), None
                        await self.pipeline.release(session)
                    else:
                        await session.close()
        raise GenerationFailed(f"could not score in {MAX_FAILURES} tries")

    async def _reuse(self, session: PipelineSession, history: list[int],
                     drafting: DraftSession | None) -> tuple[int, torch.Tensor | None]:
        """How many leading tokens of `history` a pooled session's caches already hold
        for us (0 if none), and, when drafting, the features the session kept for them
        (the drafter has been told those tokens with all but the last one's)."""
        # the last token is always run: its logits choose the next one
        shared = max(0, min(common_prefix(session.cached, history), len(history) - 1))
        if drafting is None:
            return shared, None
        stored = session.features
        if stored is None or shared < 2:
            return 0, None
        shared = min(shared, int(stored.shape[0]))
        # features for all but the last told token, as DraftSession.extend wants
        await self._in_thread(drafting.extend, history[:shared], stored[:shared - 1])
        return shared, stored

    async def _open(self, max_length: int, stats: GenerationStats, tokens: list[int]
                    ) -> tuple[PipelineSession, bool]:
        """A session on the best route: an idle one from the pool (caching the longest
        prefix of `tokens`), else a new one (long enough for most later requests too);
        True if it is new."""
        for attempt in range(1, MAX_FAILURES + 1):
            route = self.route()
            if isinstance(route, NoRoute):
                raise NoCoverage(self.model_id, route)
            stats.route = [{"peer_id": s.peer_id, "layers": [s.start, s.end]}
                           for s in route.spans]
            pooled = self.pipeline.take(route, max_length, tokens)
            if pooled is not None:
                return pooled, False
            try:
                length = min(pooled_length(max_length), self.max_session_length)
                session = await self.pipeline.open(route, length, self.wire_dtype)
            except PipelineFailure as failure:
                self._blame(failure, attempt)
                continue
            return session, True
        raise GenerationFailed(f"could not open a pipeline session in {MAX_FAILURES} tries")

    def _blame(self, failure: PipelineFailure, failures: int) -> None:
        log.info("pipeline failure (%s): %s", failure.code, failure)
        self.node.events.publish("inference.failure", culprit=failure.culprit,
                                 code=failure.code, detail=str(failure)[:300])
        if failure.culprit is not None and failure.culprit != self.node.peer_id:
            banned_for = self.bans.ban(failure.culprit, time.monotonic())
            self.node.events.publish("inference.ban", peer_id=failure.culprit,
                                     seconds=banned_for, reason=failure.code)
        if failures >= MAX_FAILURES:
            raise GenerationFailed(f"gave up after {failures} pipeline failures; last: "
                                   f"{failure}") from failure

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self.compute:
            return await compute.run(fn, *args)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.head.embed(torch.tensor([ids], dtype=torch.long))  # [1, T, H]

    def _logprobs(self, hidden: torch.Tensor, tokens: list[int]) -> list[float]:
        """hidden [1, n, H], row i the position before tokens[i] -> log p(tokens[i])."""
        with torch.inference_mode():
            return [e.logprob for e in token_logprobs(self.head.logits(hidden)[0], tokens, 0)]

    def _verify(self, mode: str, hidden: torch.Tensor, pending: int, draft: TokenTree,
                draft_probs: torch.Tensor | None, params: SamplingParams,
                rng: torch.Generator, classes: TokenClasses | None, top: int | None
                ) -> tuple[TreeVerdict, list[TokenLogprob]]:
        """hidden [1, pending + nodes, H] from the pipeline -> what this round commits,
        and (`top` not None) the committed tokens' log-probabilities."""
        with torch.inference_mode():
            if mode == "sample":  # a chain: rejection sampling
                logits = self.head.logits(hidden[:, pending - 1:, :])[0]  # [γ+1, V]
                probs = torch.stack([distribution(row, params) for row in logits])  # [γ+1, V]
                chain = verify_sample(probs, draft.tokens, draft_probs, rng)
                verdict = TreeVerdict(list(range(chain.accepted)), chain.token)
                # committed token i was chosen at row i
                return verdict, [] if top is None else token_logprobs(
                    logits, verdict.committed(draft), top)

            # The root and the first chain of slots (the drafter's best guess) in one
            # lm_head call, which costs about what one row does; other nodes on demand.
            first = pending + draft.first_chain()
            rows = self.head.logits(hidden[:, pending - 1:first, :])[0]  # [1 + chain, V]
            scored: dict[int, torch.Tensor] = {}  # nodes off that chain, once each

            def logits_at(node: int) -> torch.Tensor:  # the target's logits after a node [V]
                if node + 1 < rows.shape[0]:
                    return rows[node + 1]
                if node not in scored:
                    scored[node] = self.head.logits(
                        hidden[:, pending + node:pending + node + 1, :])[0, 0]
                return scored[node]

            verdict = verify_tree(draft, logits_at, classes if mode == "adaptive" else None)
            if top is None:
                return verdict, []
            # committed token i was chosen after the root (i = 0) or path node i - 1
            chosen = torch.stack([logits_at(n) for n in (-1, *verdict.path)])  # [k + 1, V]
            return verdict, token_logprobs(chosen, verdict.committed(draft), top)
