"""A sampler's policy served as a shard pipeline: the entry peer holds the head (and a
slice of the layers), other `--rollout` peers the rest, and every hop of every
session holds one version of the run.

A generation first takes the newest version announced (fetched meanwhile: the
pipeline's peers apply versions only between generations, follow.py), then holds the
entry's own version (its head and layers: versions.py) from its first forward to its
last token, and opens each completion's pipeline session
tagged with it (run, version, trainer: protocols/shard.py, PolicyTag). Every hop
admits the tag only at exactly that version and keeps it until the session closes
(shard_gate.py), so every token of a completion, and so every rollout's version tag,
is the version of every layer that produced it.

Routes go only through peers that advertise FEATURE_ROLLOUT_SHARD (whose sessions
hold versions); the run is checked at OPEN, not in the ledger (a shard takes up the
run of the first tagged session it admits). A hop that is BEHIND pulls the version
and is asked again after RETRY_S; one AHEAD (or one that had to end a session to
move on: REVOKED) means this peer is the one behind: it catches up (the newest
announced version) and the whole generation starts again at the new version, so a
Generation is never of two versions. Other refusals ban their hop for a while and
route around it. Past `deadline_s` the generation fails as "behind" (as a sampler
that cannot catch up does) or "no_pipeline"; the trainer counts either against the
sampler, and drops one that keeps failing.

Completions are decoded each in its own session (a FORWARD carries one row), up to
`parallel` of them at once so that the links' latency overlaps (each hop's session cap
and KV budget bound it too), with the same random stream and the same behaviour
log-probs rule as
LocalPolicy (policy.py: `choose`, `completion_seed`), computed at the entry from the
last hop's final hidden states. So a pipeline sampler produces LocalPolicy's tokens
and log-probs at the same version and seed, to float rounding (LocalPolicy decodes a
request's prompts of one length as one batch, kernels sum in other orders).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import trio

from peerd.inference.swarm.pipeline import PipelineFailure, PipelineSession
from peerd.inference.swarm.routing import BanList, NoRoute, Route, find_route, servers_by_model
from peerd.rl.follow import Follower
from peerd.rl.policy import (
    Completion,
    Generation,
    VersionMismatch,
    check_generation,
    choose,
    completion_seed,
    prompt_streams,
)
from peerd.rl.shard_gate import ShardGate
from peerd.rl.versions import PolicyError, VersionedWeights
from peerd.rpc import Busy
from protocols.rollout import BEHIND, FEATURE_ROLLOUT_SHARD
from protocols.shard import AHEAD, REVOKED, PolicyTag
from protocols.shard import BEHIND as SHARD_BEHIND

if TYPE_CHECKING:
    from peerd.inference.generate import Generator

log = logging.getLogger(__name__)

RETRY_S = 0.2  # after a hop said BEHIND (it is pulling) or we caught up
DEADLINE_S = 60.0  # a generation that cannot find a route at one version gives up
NEWEST_WAIT_S = 10.0  # for the newest version's pull (already under way, mostly)
NO_PIPELINE = "no_pipeline"  # its refusal then: a failure the trainer counts, not "busy"
# Completions decoded at once, each its own session: a token costs a trip through the
# chain's links, so one at a time leaves every hop idle for most of it.
PARALLEL = 8


class _Again(Exception):
    """A completion could not be made at this version on this route: start over."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PipelinePolicy:
    """The entry's side of a pipeline sampler (see the module docstring)."""

    def __init__(self, weights: VersionedWeights, follower: Follower, gate: ShardGate,
                 generator: Generator, *, deadline_s: float = DEADLINE_S,
                 parallel: int = PARALLEL) -> None:
        if parallel < 1:
            raise ValueError(f"parallel {parallel}: at least 1 completion at a time")
        if weights.head is None:
            raise PolicyError("a pipeline sampler's entry needs the head")
        self.weights = weights
        self.follower = follower
        self.gate = gate
        self.generator = generator  # the entry's pipeline, ledger, compute turns
        self.head = weights.head
        self.deadline_s = deadline_s
        self.parallel = parallel
        self.in_flight = self.peak_in_flight = 0  # completions being decoded, for status
        self.bans = BanList()
        self.generations = 0
        self.retries: dict[str, int] = {}  # by refusal code, for status

    # what the sampler reads of a policy
    @property
    def block(self) -> Any:
        return self.weights.block

    @property
    def model_id(self) -> str:
        return self.weights.model_id

    @property
    def version(self) -> int:
        return self.weights.version

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    async def reset(self) -> None:
        await self.weights.reset()

    def take_up(self, run_id: str, trainer: str) -> None:
        """A request of `run_id` (whose trainer is `trainer`) came: follow it."""
        self.follower.take_up(run_id, trainer)
        self.gate.touch()

    # ---- generation ----------------------------------------------------------------------

    async def generate_many(self, prompts: Sequence[Sequence[int]], *, n: int,
                            temperature: float, top_p: float, max_tokens: int, seed: int,
                            eos_ids: Iterable[int], at_version: int | None = None,
                            seeds: Sequence[int] = ()) -> Generation:
        """`n` completions of each prompt, all at one version of every hop (LocalPolicy's
        contract). Raises Busy ("behind" or "no_pipeline") when no route at one version
        could be had within the deadline."""
        check_generation(prompts, n, temperature, top_p, max_tokens, self.vocab_size)
        streams = prompt_streams(seed, seeds, len(prompts))
        run_id, trainer = self.follower.run_id, self.follower.trainer
        if run_id is None:
            raise PolicyError("a pipeline sampler generates for the run it follows: none yet")
        eos = frozenset(eos_ids)
        deadline = trio.current_time() + self.deadline_s
        last, code = "", ""
        while trio.current_time() < deadline:
            if at_version is None:
                await self._newest(run_id, trainer)
            try:
                async with self.weights.hold() as version:
                    if at_version is not None and at_version != version:
                        raise VersionMismatch(version, at_version)
                    tag = PolicyTag(run_id=run_id, version=version, trainer=trainer)
                    groups = await self._complete_all(
                        tag, [(list(ids), [completion_seed(*streams[i], g) for g in range(n)])
                              for i, ids in enumerate(prompts)],
                        temperature, top_p, max_tokens, eos)
                    self.generations += 1
                    return Generation(version, groups)
            except _Again as again:  # (the hold is let go: our own apply may go first)
                last, code = str(again), again.code
                self.retries[again.code] = self.retries.get(again.code, 0) + 1
                if again.code in (AHEAD, REVOKED):  # we are the one behind
                    with trio.move_on_after(max(0.0, deadline - trio.current_time())):
                        try:
                            await self.follower.catch_up(run_id, self.weights.version,
                                                         trainer)
                        except Exception as exc:
                            log.info("could not catch up with the pipeline: %s", exc)
                await trio.sleep(RETRY_S)
        if code in (SHARD_BEHIND, AHEAD, REVOKED):
            raise Busy(f"the pipeline's hops were not at one version of {run_id} within "
                       f"{self.deadline_s:.0f} s (this peer is at {self.weights.version}): "
                       f"{last}", reason=BEHIND)
        raise Busy(f"no pipeline of rollout shards within {self.deadline_s:.0f} s: {last}",
                   reason=NO_PIPELINE)

    async def _newest(self, run_id: str, trainer: str) -> None:
        """Apply the newest version announced, before a generation holds ours: the
        pipeline's peers fetch versions as they are announced and apply them only
        between generations (follow.py). One that cannot be had now: generate at ours
        (the request's oldest acceptable version was caught up to already)."""
        with trio.move_on_after(NEWEST_WAIT_S):
            try:
                await self.follower.catch_up(run_id, self.weights.version, trainer)
            except Exception as exc:
                log.info("could not take the newest version of %s: %s", run_id, exc)

    def route(self) -> Route | NoRoute:
        """The cheapest chain of rollout shards, not banned now."""
        node = self.generator.node
        rtt = {**node.rtt_ms, node.peer_id: 0.0}
        entries = [e for e in self.generator.ledger.entries()
                   if FEATURE_ROLLOUT_SHARD in e.features]
        servers = servers_by_model(entries, rtt).get(self.model_id, [])
        return find_route(servers, self.weights.block.num_layers,
                          self.bans.banned(time.monotonic()))

    async def _complete_all(self, tag: PolicyTag, asked: list[tuple[list[int], list[int]]],
                            temperature: float, top_p: float, max_tokens: int,
                            eos: frozenset[int]) -> list[list[Completion]]:
        """Every (prompt, its completions' seeds) of `asked` decoded, `parallel` at a
        time; the first failure (_Again, or our bug) ends the others and is raised."""
        out: list[list[Completion | None]] = [[None] * len(seeds) for _, seeds in asked]
        failed: list[Exception] = []
        limiter = trio.CapacityLimiter(self.parallel)

        async def one(i: int, g: int, cancel: trio.CancelScope) -> None:
            prompt, seeds = asked[i]
            async with limiter:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    out[i][g] = await self._complete(tag, prompt, seeds[g], temperature,
                                                     top_p, max_tokens, eos)
                except Exception as exc:  # the generation's: raised once all have ended
                    failed.append(exc)
                    cancel.cancel()
                finally:
                    self.in_flight -= 1

        async with trio.open_nursery() as nursery:
            for i, (_, seeds) in enumerate(asked):
                for g in range(len(seeds)):
                    nursery.start_soon(one, i, g, nursery.cancel_scope)
        if failed:
            raise failed[0]
        return [[c for c in group if c is not None] for group in out]

    async def _complete(self, tag: PolicyTag, prompt: list[int], seed: int,
                        temperature: float, top_p: float, max_tokens: int,
                        eos: frozenset[int]) -> Completion:
        """One completion through a session tagged `tag`; _Again when it cannot."""
        route = self.route()
        if isinstance(route, NoRoute):
            raise _Again("no_route", f"no rollout shard serves layers {route.describe()}")
        generator = self.generator
        try:
            session = await generator.pipeline.open(
                route, len(prompt) + max_tokens, generator.wire_dtype, policy=tag)
        except PipelineFailure as failure:
            raise self._failed(failure) from None
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids: list[int] = []
        lps: list[float] = []
        try:
            tokens, pos = prompt, 0  # the prompt, then each new token
            while True:
                token, lp = await self._step(session, tokens, pos, gen, temperature, top_p)
                pos += len(tokens)
                ids.append(token)
                lps.append(lp)
                if token in eos or len(ids) >= max_tokens:
                    return Completion(tuple(ids), tuple(lps))
                tokens = [token]
        except PipelineFailure as failure:
            raise self._failed(failure) from None
        finally:
            with trio.CancelScope(shield=True):
                await session.close()

    async def _step(self, session: PipelineSession, tokens: list[int], start_pos: int,
                    gen: torch.Generator, temperature: float, top_p: float
                    ) -> tuple[int, float]:
        """Run `tokens` at `start_pos` through the route; the next token and its
        behaviour log-prob."""
        hidden = await self.generator.in_thread(self.generator.embed, tokens)  # [1, T, H]
        result = await session.step(hidden, start_pos)

        def pick() -> tuple[int, float]:
            logits = self.head.logits(result.hidden[:, -1:])[:, 0]  # [1, V]
            chosen, lps = choose(logits.cpu(), temperature, top_p, [gen])
            return chosen[0], lps[0]

        picked: tuple[int, float] = await self.generator.in_thread(pick)
        return picked

    def _failed(self, failure: PipelineFailure) -> _Again:
        """What a failed OPEN or step means for the generation: try again after a pull
        (BEHIND, AHEAD, REVOKED), or around the hop at fault (banned a while)."""
        if failure.code not in (SHARD_BEHIND, AHEAD, REVOKED):
            node = self.generator.node
            if failure.culprit is not None and failure.culprit != node.peer_id:
                self.bans.ban(failure.culprit, time.monotonic(), failure.code)
            log.info("pipeline sample failed (%s): %s", failure.code, failure)
        return _Again(failure.code, f"{failure.code}: {failure}")

    def status(self) -> dict[str, Any]:
        return {"generations": self.generations, "retries": dict(self.retries),
                "peak_in_flight": self.peak_in_flight}
