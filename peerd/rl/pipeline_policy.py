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

Completions are decoded in sessions of several rows where every hop of the route
lists FEATURE_ROWS (protocols/shard.py): the rows of LocalPolicy's batches
(`batch_rows`: prompts of one token length, at most `max_rows` rows), each row its
prompt, then its own tokens, all at the same positions, so a step is one pass for the
whole batch. A row that ends (EOS, max_tokens) rides along to the batch's end, its
outputs unread. Through a hop without FEATURE_ROWS each completion is a session of
its own. Up to `parallel` sessions run at once so that the links' latency overlaps
(each hop's session cap and KV budget bound it too). The random streams and the
behaviour log-probs are LocalPolicy's (policy.py: `choose`, `completion_seed`),
computed at the entry from the last hop's final hidden states. So a pipeline sampler
produces LocalPolicy's tokens and log-probs at the same version and seed, to float
rounding (kernels sum in other orders).
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
    MAX_ROWS,
    Completion,
    Generation,
    VersionMismatch,
    batch_rows,
    check_generation,
    choose,
    completion_seed,
    prompt_streams,
)
from peerd.rl.shard_gate import ShardGate
from peerd.rl.versions import PolicyError, VersionedWeights
from peerd.rpc import Busy
from protocols.rollout import BEHIND, FEATURE_ROLLOUT_SHARD
from protocols.shard import AHEAD, FEATURE_ROWS, REVOKED, PolicyTag
from protocols.shard import BEHIND as SHARD_BEHIND
from protocols.shard import MAX_ROWS as MAX_SESSION_ROWS

if TYPE_CHECKING:
    from peerd.inference.generate import Generator

log = logging.getLogger(__name__)

RETRY_S = 0.2  # after a hop said BEHIND (it is pulling) or we caught up
DEADLINE_S = 60.0  # a generation that cannot find a route at one version gives up
NEWEST_WAIT_S = 10.0  # for the newest version's pull (already under way, mostly)
NO_PIPELINE = "no_pipeline"  # its refusal then: a failure the trainer counts, not "busy"
# Sessions decoded at once: a token costs a trip through the chain's links, so one at
# a time leaves every hop idle for most of it.
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
                 parallel: int = PARALLEL, max_rows: int = MAX_ROWS) -> None:
        if parallel < 1:
            raise ValueError(f"parallel {parallel}: at least 1 session at a time")
        if not 1 <= max_rows <= MAX_SESSION_ROWS:
            raise ValueError(f"max_rows {max_rows}: 1..{MAX_SESSION_ROWS} rows a session")
        if weights.head is None:
            raise PolicyError("a pipeline sampler's entry needs the head")
        self.weights = weights
        self.follower = follower
        self.gate = gate
        self.generator = generator  # the entry's pipeline, ledger, compute turns
        self.head = weights.head
        self.deadline_s = deadline_s
        self.parallel = parallel
        self.max_rows = max_rows  # rows a session, where the route's hops take rows
        self.in_flight = self.peak_in_flight = 0  # completions being decoded, for status
        self.peak_rows = 0  # the most rows a session of ours has had, for status
        self.bans = BanList()
        self.generations = 0
        # by refusal code, for status: "no_route" or a PipelineFailure's, which is one of
        # a known few or "other" whatever a hop sent (pipeline.py), so the map stays small
        self.retries: dict[str, int] = {}

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
                    batches = batch_rows([len(p) for p in prompts], n,
                                         self.max_rows if self._rows_taken() else 1)
                    done = await self._complete_all(
                        tag, [[(list(prompts[i]), completion_seed(*streams[i], g))
                               for i, g in rows] for rows in batches],
                        temperature, top_p, max_tokens, eos)
                    found = {row: c for rows, cs in zip(batches, done, strict=True)
                             for row, c in zip(rows, cs, strict=True)}
                    self.generations += 1
                    return Generation(version, [[found[i, g] for g in range(n)]
                                                for i in range(len(prompts))])
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

    def _rows_taken(self) -> bool:
        """Does every hop of the route now take sessions of several rows? (A route that
        changes before the OPEN to a hop that does not refuses it, and the generation
        starts again.)"""
        route = self.route()
        if isinstance(route, NoRoute):
            return False
        features = {e.peer_id: e.features for e in self.generator.ledger.entries()}
        return all(FEATURE_ROWS in features.get(s.peer_id, ()) for s in route.spans)

    async def _complete_all(self, tag: PolicyTag, batches: list[list[tuple[list[int], int]]],
                            temperature: float, top_p: float, max_tokens: int,
                            eos: frozenset[int]) -> list[list[Completion]]:
        """Every batch of (prompt, completion seed) rows (prompts of one length) decoded,
        a session each, `parallel` at a time; the first failure (_Again, or our bug)
        ends the others and is raised."""
        out: list[list[Completion]] = [[] for _ in batches]
        failed: list[Exception] = []
        limiter = trio.CapacityLimiter(self.parallel)

        async def one(b: int, cancel: trio.CancelScope) -> None:
            async with limiter:
                self.in_flight += len(batches[b])
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    out[b] = await self._complete(tag, batches[b], temperature, top_p,
                                                  max_tokens, eos)
                except Exception as exc:  # the generation's: raised once all have ended
                    failed.append(exc)
                    cancel.cancel()
                finally:
                    self.in_flight -= len(batches[b])

        async with trio.open_nursery() as nursery:
            for b in range(len(batches)):
                nursery.start_soon(one, b, nursery.cancel_scope)
        if failed:
            raise failed[0]
        return out

    async def _complete(self, tag: PolicyTag, rows: list[tuple[list[int], int]],
                        temperature: float, top_p: float, max_tokens: int,
                        eos: frozenset[int]) -> list[Completion]:
        """The completions of `rows` (prompts of one length, each row's seed) through one
        session tagged `tag`; _Again when it cannot."""
        route = self.route()
        if isinstance(route, NoRoute):
            raise _Again("no_route", f"no rollout shard serves layers {route.describe()}")
        generator = self.generator
        length = len(rows[0][0])
        try:
            session = await generator.pipeline.open(
                route, length + max_tokens, generator.wire_dtype, policy=tag, rows=len(rows))
        except PipelineFailure as failure:
            raise self._failed(failure) from None
        self.peak_rows = max(self.peak_rows, len(rows))
        gens = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in rows]
        ids: list[list[int]] = [[] for _ in rows]
        lps: list[list[float]] = [[] for _ in rows]
        live = list(range(len(rows)))  # rows not yet ended
        # the first step carries each prompt once; every row starts from its prompt's
        prompts = list(dict.fromkeys(tuple(prompt) for prompt, _ in rows))
        source = [prompts.index(tuple(prompt)) for prompt, _ in rows]
        try:
            picked = await self._step(session, [list(p) for p in prompts], 0, gens, source,
                                      temperature, top_p,
                                      source if len(prompts) < len(rows) else [])
            pos = length
            while True:
                for r, (token, lp) in zip(live, picked, strict=True):
                    ids[r].append(token)
                    lps[r].append(lp)
                live = [r for r in live if ids[r][-1] not in eos and len(ids[r]) < max_tokens]
                if not live:
                    return [Completion(tuple(i), tuple(lp)) for i, lp in zip(ids, lps,
                                                                             strict=True)]
                # every row's last token; an ended row rides along, unread
                picked = await self._step(session, [[row[-1]] for row in ids], pos,
                                          [gens[r] for r in live], live, temperature, top_p, [])
                pos += 1
        except PipelineFailure as failure:
            raise self._failed(failure) from None
        finally:
            with trio.CancelScope(shield=True):
                await session.close()

    async def _step(self, session: PipelineSession, tokens: list[list[int]], start_pos: int,
                    gens: list[torch.Generator], read: list[int], temperature: float,
                    top_p: float, source: list[int]) -> list[tuple[int, float]]:
        """Run `tokens` (rows of one length; with `source`, the first step's prompts,
        which session row r starts from source[r]) at `start_pos` through the route;
        for each output row of `read` in turn, the next token (drawn with its generator
        in `gens`) and its behaviour log-prob."""
        head = self.head

        def embed() -> torch.Tensor:
            with torch.inference_mode():
                return head.embed(torch.tensor(tokens, dtype=torch.long))  # [B, T, H]

        result = await session.step(await self.generator.in_thread(embed), start_pos,
                                    source=source)

        def pick() -> list[tuple[int, float]]:
            need = list(dict.fromkeys(read))  # each output row's logits once
            with torch.inference_mode():
                logits = head.logits(result.hidden[need, -1:])[:, 0]  # [len(need), V]
            logits = logits[[need.index(r) for r in read]]  # [len(read), V]
            chosen, lps = choose(logits.cpu(), temperature, top_p, gens)
            return list(zip(chosen, lps, strict=True))

        picked: list[tuple[int, float]] = await self.generator.in_thread(pick)
        return picked

    def _failed(self, failure: PipelineFailure) -> _Again:
        """What a failed OPEN or step means for the generation: try again after a pull
        (BEHIND, AHEAD, REVOKED), or around the hop at fault (banned a while)."""
        if failure.code not in (SHARD_BEHIND, AHEAD, REVOKED):
            node = self.generator.node
            for peer in failure.at_fault:
                if peer != node.peer_id:
                    self.bans.ban(peer, time.monotonic(), failure.code)
            log.info("pipeline sample failed (%s): %s", failure.code, failure)
        return _Again(failure.code, f"{failure.code}: {failure}")

    def status(self) -> dict[str, Any]:
        return {"generations": self.generations, "retries": dict(self.retries),
                "peak_in_flight": self.peak_in_flight, "peak_rows": self.peak_rows}
