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

from peerd.inference.pipeline import Pipeline, PipelineFailure, PipelineSession
from peerd.inference.routing import BanList, NoRoute, Route, Server, find_route, servers_by_model
from peerd.inference.sampling import SamplingParams, make_generator, next_token
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


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    route: list[dict[str, Any]] = field(default_factory=list)
    pipeline_ms: float = 0.0  # wall time inside pipeline steps
    compute_ms: float = 0.0  # of which the shards computed
    head_ms: float = 0.0  # embeddings, lm_head and sampling at the entry peer
    wall_ms: float = 0.0
    steps: int = 0
    reroutes: int = 0
    finish_reason: str = "length"

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.wall_ms / 1e3) if self.wall_ms > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route, "tokens_per_s": round(self.tokens_per_s, 3),
            "pipeline_ms": round(self.pipeline_ms, 3), "compute_ms": round(self.compute_ms, 3),
            "head_ms": round(self.head_ms, 3), "wall_ms": round(self.wall_ms, 3),
            "steps": self.steps, "reroutes": self.reroutes,
        }


# Called with each new token id; returns False to stop (a stop string was reached).
OnToken = Callable[[int], Awaitable[bool]]


class Generator:
    def __init__(self, node: Node, pipeline: Pipeline, head: Head, *, model_id: str,
                 num_layers: int, eos_ids: set[int], compute: trio.CapacityLimiter,
                 wire_dtype: str = "float32") -> None:
        self.node = node
        self.pipeline = pipeline
        self.head = head
        self.model_id = model_id
        self.num_layers = num_layers
        self.eos_ids = eos_ids
        self.compute = compute
        self.wire_dtype = wire_dtype
        self.bans = BanList()

    def servers(self) -> list[Server]:
        """Who serves which layers of our model, from the ledger and our RTT probes."""
        rtt = {**self.node.rtt_ms, self.node.peer_id: 0.0}
        return servers_by_model(self.node.ledger.entries(), rtt).get(self.model_id, [])

    def route(self) -> Route | NoRoute:
        return find_route(self.servers(), self.num_layers, self.bans.banned(time.monotonic()))

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       on_token: OnToken) -> GenerationStats:
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        t_start = time.perf_counter()
        rng = make_generator(params)
        history = list(prompt_ids)
        pending = list(prompt_ids)  # tokens not yet in the pipeline's KV caches
        pos = 0
        failures = 0
        session: PipelineSession | None = None
        try:
            while stats.completion_tokens < params.max_tokens:
                if session is None:
                    session = await self._open(len(prompt_ids) + params.max_tokens, stats)
                    pending, pos = list(history), 0  # (re)play the whole history
                t0 = time.perf_counter()
                hidden = await self._in_thread(self._embed, pending)
                stats.head_ms += (time.perf_counter() - t0) * 1e3
                try:
                    result = await session.step(hidden, pos)
                except PipelineFailure as failure:
                    failures += 1
                    self._blame(failure, failures)
                    await session.close()
                    session = None
                    stats.reroutes += 1
                    continue
                stats.steps += 1
                stats.pipeline_ms += result.wall_ms
                stats.compute_ms += result.compute_ms
                pos += len(pending)
                t0 = time.perf_counter()
                token = await self._in_thread(self._sample, result.hidden, params, rng)
                stats.head_ms += (time.perf_counter() - t0) * 1e3
                history.append(token)
                pending = [token]
                stats.completion_tokens += 1
                if token in self.eos_ids:
                    stats.finish_reason = "stop"
                    break
                if not await on_token(token):
                    stats.finish_reason = "stop"
                    break
        finally:
            if session is not None:
                with trio.CancelScope(shield=True):
                    await session.close()
            stats.wall_ms = (time.perf_counter() - t_start) * 1e3
        return stats

    async def _open(self, max_length: int, stats: GenerationStats) -> PipelineSession:
        for attempt in range(1, MAX_FAILURES + 1):
            route = self.route()
            if isinstance(route, NoRoute):
                raise NoCoverage(self.model_id, route)
            try:
                session = await self.pipeline.open(route, max_length, self.wire_dtype)
            except PipelineFailure as failure:
                self._blame(failure, attempt)
                continue
            stats.route = [{"peer_id": s.peer_id, "layers": [s.start, s.end]}
                           for s in route.spans]
            return session
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

    def _sample(self, hidden: torch.Tensor, params: SamplingParams,
                rng: torch.Generator) -> int:
        with torch.inference_mode():
            logits = self.head.logits(hidden[:, -1:, :])[0, -1]  # [V]
        return next_token(logits, params, rng)
