"""A sampler (or a pipeline sampler's shard) follows its trainer's policy: pull a
version, apply it between requests.

The glue between the weights service (weights.py: manifests, chunks, announcements)
and the sampler's policy (policy.py: versions applied atomically between
generations). A request for a newer version than ours pulls it first (sync mode's
sequential pull: `catch_up`); an announcement of a newer version of the run we
follow is pulled at once, in the background (async mode's pull when we lag; a pull
that fails is tried again), so the next request usually finds it applied.

A whole-model sampler applies what it pulled (`apply_announced`; its apply waits for
the generation in hand). The peers of a pipeline only fetch it, and apply it from
the chunks they hold when asked: the entry at the start of its next generation
(pipeline_policy.py), a shard when a session asks for that version (shard_gate.py:
BEHIND, then `catch_up`). So the pipeline moves between generations, as a whole
model does. A peer applying on its own refuses the rest of a generation begun at the
older version (a session cannot be admitted while an apply waits), the generation
starts again at the new one, and in async mode what was sampled while the trainer
trained is thrown away (bench/README.md, "Echo with a pipeline sampler").

One run at a time, whoever names it: any peer may send a request naming a fresh run
(and be that run's trainer), so the runs we follow stay few. Taking up a run leaves
the one before: it stays followed (its versions held and served) until the new run's
manifest has verified, and is forgotten then; a run none of whose manifests ever
verified is forgotten at once. A run unheard of for long is forgotten by the weights
service (announce.py), and followed again when a request names it.

A peer holding a slice of the layers pulls only the tensors of its slice (and the
head's when it holds the head: manifest.layer_names); a whole-model peer pulls all.
A full version replaces the named tensors; a LoRA version's adapters become deltas on
the version-0 base (manifest.lora_deltas). Tensors are cast to the policy's dtype.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from peerd.rl.manifest import layer_names, lora_deltas
from peerd.rl.versions import VersionedWeights
from peerd.rl.weights import WeightStore, WeightsUnavailable
from protocols.weights import VersionAnnounce

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.5  # a failed pull's first retry; doubling to the re-announce period
RETRY_FOR_S = 300.0  # then given up until the next version (a trainer gone for good)


class Follower:
    def __init__(self, weights: WeightStore, policy: VersionedWeights, *,
                 apply_announced: bool = True) -> None:
        self.weights = weights
        self.policy = policy
        self.apply_announced = apply_announced  # else announced versions are only fetched
        self.run_id: str | None = None
        self.trainer = ""  # of the run we follow
        self.left: str | None = None  # the run before, kept until run_id's manifest verifies
        self._lock = trio.Lock()  # one pull-and-apply at a time
        weights.on_announce(self._announced)

    async def catch_up(self, run_id: str, version: int, trainer: str) -> None:
        """Be at `version` of `run_id` or newer (the newest announced); raise if the
        version cannot be had."""
        self.take_up(run_id, trainer)
        latest = self.weights.latest(run_id)
        target = max(version, latest.version if latest is not None else version)
        await self._take(run_id, target, [trainer])

    def take_up(self, run_id: str, trainer: str) -> None:
        """Follow `run_id`, whose versions `trainer` authors (from version 0), and leave
        the run we followed."""
        if self.run_id == run_id and run_id in self.weights.runs.following:
            self.weights.touch(run_id)
            return
        if self.run_id not in (None, run_id):
            self.leave()
        if self.left == run_id:
            self.left = None  # back to the run we left: it is ours again
        self.weights.follow(run_id, trainer)
        self.run_id = run_id
        self.trainer = trainer
        self._settle()

    def leave(self) -> None:
        """The policy went back to version 0: follow no run until asked again. The run
        left stays followed until the next one's manifest verifies if one of its own
        ever did (and the run left before it is forgotten); if none did, it is
        forgotten now."""
        run, self.run_id = self.run_id, None
        if run is None:
            return
        if not self.weights.holds(run):
            self.weights.unfollow(run)
            return
        if self.left is not None:
            self.weights.unfollow(self.left)
        self.left = run

    def _settle(self) -> None:
        """Forget the run left once the one we follow has a manifest that verified."""
        if self.left is not None and self.run_id is not None and \
                self.weights.holds(self.run_id):
            self.weights.unfollow(self.left)
            self.left = None

    async def _announced(self, announce: VersionAnnounce) -> None:
        """Pull an announced version we lack (and apply it, unless `apply_announced` is
        off); a pull that fails (no holder answered in time, chunks no holder gave
        intact) is tried again, backing off to the re-announce period, until it lands,
        a newer version supersedes it (its own announcement pulls that) or we leave the
        run. Re-announcements of a version already heard run no hook, so without this a
        sampler whose one pull failed would stay behind until the trainer's next
        version, silently. After RETRY_FOR_S it is given up (a sync request's catch_up
        still pulls)."""
        delay, give_up = RETRY_FIRST_S, trio.current_time() + RETRY_FOR_S
        while announce.run_id == self.run_id and announce.version > self.policy.version:
            latest = self.weights.latest(announce.run_id)
            if latest is not None and latest.version > announce.version:
                return
            try:
                if self.apply_announced:
                    await self._take(announce.run_id, announce.version, [announce.author])
                else:  # (tensors not kept: the chunks are, and catch_up reads them)
                    await self._pull(announce.run_id, announce.version, [announce.author])
                return
            except WeightsUnavailable as exc:
                if trio.current_time() + delay > give_up:
                    log.warning("pulling version %d of %s failed (%s); given up after "
                                "%.0f s", announce.version, announce.run_id, exc, RETRY_FOR_S)
                    return
                log.warning("pulling version %d of %s failed (%s); again in %.1f s",
                            announce.version, announce.run_id, exc, delay)
            await trio.sleep(delay)
            delay = min(2 * delay, max(RETRY_FIRST_S, self.weights.announce_s))

    async def _take(self, run_id: str, version: int, hints: list[str]) -> None:
        async with self._lock:
            if self.policy.version >= version or run_id != self.run_id:
                return  # another pull got there first, or we left the run meanwhile
            tensors = await self._pull(run_id, version, hints)
            manifest = self.weights.manifest(run_id, version)
            if manifest is None:
                raise RuntimeError(f"version {version} of {run_id} pulled but not held")
            dtypes = {n: d for n, (_, d) in self.policy.parameters().items()}
            if manifest.kind == "lora":
                deltas = await trio.to_thread.run_sync(
                    lora_deltas, tensors, float(manifest.lora_scale or 1.0))
                await self.policy.apply(version, deltas={
                    n: t.to(dtypes.get(n, t.dtype)) for n, t in deltas.items()})
            else:
                await self.policy.apply(version, full={
                    n: t.to(dtypes.get(n, t.dtype)) for n, t in tensors.items()})
            log.info("policy of %s now at version %d (%s)", run_id, version, manifest.kind)

    async def _pull(self, run_id: str, version: int, hints: list[str]
                    ) -> dict[str, torch.Tensor]:
        """The version's tensors this policy holds: all of them for a whole model; for a
        slice, the manifest first (a pull of no tensors), then its slice's tensors."""
        block, head = self.policy.block, self.policy.head is not None
        try:
            if block.start == 0 and block.end == block.num_layers and head:
                return await self.weights.pull(run_id, version, hints=hints)
            await self.weights.pull(run_id, version, names=(), hints=hints)
            manifest = self.weights.manifest(run_id, version)
            if manifest is None:
                raise RuntimeError(f"the manifest of version {version} of {run_id} not held")
            names = layer_names([t.name for t in manifest.tensors], block.start, block.end,
                                block.num_layers, head=head)
            return await self.weights.pull(run_id, version, names=names, hints=hints)
        finally:  # a manifest that verified keeps its version held, the chunks or not
            self._settle()
