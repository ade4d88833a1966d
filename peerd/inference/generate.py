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

from peerd.inference.acceptance import (
    TokenClasses,
    Verdict,
    verify_adaptive,
    verify_greedy,
    verify_sample,
)
from peerd.inference.drafters import Draft, Drafter, DrafterCatalog, DraftError
from peerd.inference.gamma import MAX_GAMMA, GammaController
from peerd.inference.host import SpeculativeOptions
from peerd.inference.pipeline import Pipeline, PipelineFailure, PipelineSession, pooled_length
from peerd.inference.routing import BanList, NoRoute, Route, Server, find_route, servers_by_model
from peerd.inference.sampling import SamplingParams, distribution, make_generator
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

    drafted: int
    accepted: int
    draft_ms: float
    pipeline_ms: float


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
    reroutes: int = 0
    finish_reason: str = "length"
    draft: str = "none"
    verify: str = "greedy"
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
            "draft_ms": round(self.draft_ms, 3), "pipeline_ms": round(self.pipeline_ms, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route, "tokens_per_s": round(self.tokens_per_s, 3),
            "pipeline_ms": round(self.pipeline_ms, 3), "compute_ms": round(self.compute_ms, 3),
            "head_ms": round(self.head_ms, 3), "draft_ms": round(self.draft_ms, 3),
            "wall_ms": round(self.wall_ms, 3), "steps": self.steps, "reroutes": self.reroutes,
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
                 max_session_length: int = 8192) -> None:
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
            return await trio.to_thread.run_sync(catalog.get, spec.draft)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       on_token: OnToken, spec: SpeculativeOptions | None = None
                       ) -> GenerationStats:
        """Decode up to params.max_tokens tokens after prompt_ids, in rounds: each round
        runs the uncached committed tokens plus a draft (if speculating) through the
        pipeline in one pass, then verification commits 1..γ+1 tokens. Plain decoding
        is the round without a draft. DraftError if `spec` cannot be honoured."""
        spec = self.default_speculative if spec is None else spec
        mode = verify_mode(spec, params)
        drafter = await self.drafter(spec)
        classes = self.token_classes() if mode == "adaptive" and self.token_classes else None
        stats = GenerationStats(prompt_tokens=len(prompt_ids), draft=spec.draft, verify=mode)
        t_start = time.perf_counter()
        rng = make_generator(params)
        gamma = GammaController(fixed=spec.gamma)
        drafting = drafter.start() if drafter is not None else None
        history = list(prompt_ids)  # committed tokens
        told = 0  # history[:told] has been given to the drafter
        fed = 0  # positions whose features the drafter has
        kv = 0  # committed positions the pipeline's caches hold
        # drafts may run up to MAX_GAMMA positions past the last committed token
        max_length = min(len(prompt_ids) + params.max_tokens + (MAX_GAMMA if drafter else 0),
                         self.max_session_length)
        failures = 0
        session: PipelineSession | None = None
        fresh = True  # the session was opened for this request (not taken from the pool)
        finished = False
        try:
            while not finished:
                if session is None:
                    session, fresh = await self._open(max_length, stats)
                    kv = 0  # (re)play the whole history
                pending = history[kv:]  # committed, not yet in the caches
                room = min(params.max_tokens - stats.completion_tokens - 1,
                           max_length - len(history))
                rng_state = rng.get_state()  # a failed round is redrafted identically
                draft = Draft([])
                t0 = t_round = time.perf_counter()
                if drafting is not None and kv > 0 and room > 0:
                    draft = await self._in_thread(drafting.propose, min(gamma.next(), room),
                                                  params, rng)
                draft_ms = (time.perf_counter() - t0) * 1e3
                stats.draft_ms += draft_ms
                t0 = time.perf_counter()
                ids = pending + draft.tokens
                hidden = await self._in_thread(self._embed, ids)
                stats.head_ms += (time.perf_counter() - t0) * 1e3
                try:
                    result = await session.step(hidden, kv, keep=kv if session.held > kv else -1)
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
                verdict = await self._in_thread(self._verify, mode, result.hidden,
                                                len(pending), draft, params, rng, classes)
                stats.head_ms += (time.perf_counter() - t0) * 1e3
                committed_to = kv + len(pending) + verdict.accepted  # positions now valid
                features = result.hidden[0, max(fed, kv) - kv:committed_to - kv]  # [n, H]
                kv = committed_to
                if kv > len(prompt_ids):  # a decoding round, not the prompt's pass
                    stats.rounds.append(Round(len(draft.tokens), verdict.accepted, draft_ms,
                                              result.wall_ms))
                    gamma.observe(len(draft.tokens), verdict.accepted,
                                  (time.perf_counter() - t_round) * 1e3)
                for token in verdict.committed(draft.tokens):
                    history.append(token)
                    stats.completion_tokens += 1
                    if token in self.eos_ids or not await on_token(token):
                        stats.finish_reason = "stop"
                        finished = True
                        break
                    if stats.completion_tokens >= params.max_tokens:
                        finished = True
                        break
                if drafting is not None and not finished:
                    await self._in_thread(drafting.extend, history[told:], features)
                    told, fed = len(history), kv
        finally:
            if session is not None:
                with trio.CancelScope(shield=True):
                    if finished:  # a clean end: the next request may reuse the session
                        await self.pipeline.release(session)
                    else:
                        await session.close()
            stats.wall_ms = (time.perf_counter() - t_start) * 1e3
        return stats

    async def _open(self, max_length: int, stats: GenerationStats
                    ) -> tuple[PipelineSession, bool]:
        """A session on the best route: an idle one from the pool, else a new one (long
        enough for most later requests too); True if it is new."""
        for attempt in range(1, MAX_FAILURES + 1):
            route = self.route()
            if isinstance(route, NoRoute):
                raise NoCoverage(self.model_id, route)
            stats.route = [{"peer_id": s.peer_id, "layers": [s.start, s.end]}
                           for s in route.spans]
            pooled = self.pipeline.take(route, max_length)
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
            return await trio.to_thread.run_sync(fn, *args)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.head.embed(torch.tensor([ids], dtype=torch.long))  # [1, T, H]

    def _verify(self, mode: str, hidden: torch.Tensor, pending: int, draft: Draft,
                params: SamplingParams, rng: torch.Generator,
                classes: TokenClasses | None) -> Verdict:
        """hidden [1, pending + γ, H] from the pipeline -> what this round commits."""
        with torch.inference_mode():
            logits = self.head.logits(hidden[:, pending - 1:, :])[0]  # [γ+1, V]
        if mode == "greedy":
            return verify_greedy(logits, draft.tokens)
        if mode == "adaptive":
            assert classes is not None
            return verify_adaptive(logits, draft.tokens, classes)
        probs = torch.stack([distribution(row, params) for row in logits])  # [γ+1, V]
        return verify_sample(probs, draft.tokens, draft.probs, rng)
