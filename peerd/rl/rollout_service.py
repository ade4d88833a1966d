"""`peerd start --rollout`: this peer's model samples rollouts for RL trainers.

The model loads in the background (inference/slot.py), so the sampler (sampler.py)
starts once it is ready: then it registers `/peerd/rollout/1.0.0`, follows its
trainer's versions through the weights service (follow.py), and our ledger entry
lists the rollout feature. A model that failed to load leaves the peer running
without a sampler, and its status says why.

A peer holding only some layers is a pipeline shard of the run (shard_gate.py: its
shard sessions hold the run's versions, its layers follow the run, pulling only
their slice); the one holding layer 0 also samples through the pipeline
(pipeline_policy.py), pulling the head too. Their ledger entry lists
FEATURE_ROLLOUT_SHARD and FEATURE_ROWS (their sessions take several rows), and
FEATURE_TAGGED_ONLY while they follow a run.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd.inference.slot import ModelSlot
from peerd.ledger.gossip import LedgerGossip
from peerd.node import Node
from peerd.rl.metrics import SamplerCollector
from peerd.rl.weights import WeightStore
from peerd.service import EntryFields, Service
from protocols.rollout import FEATURE_PIPELINE_SAMPLER, FEATURE_ROLLOUT_SHARD
from protocols.shard import FEATURE_ROWS, FEATURE_TAGGED_ONLY

log = logging.getLogger(__name__)


class Rollouts(Service):
    name = "rollout"

    def __init__(self, node: Node, ledger: LedgerGossip, model: ModelSlot,
                 weights: WeightStore) -> None:
        self.node = node
        self.ledger = ledger
        self.model = model
        self.weights = weights
        self.sampler: Any = None  # sampler.RolloutSampler once the model is ready
        self.gate: Any = None  # shard_gate.ShardGate of a peer with a slice of the layers
        self.error = ""

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self.node.metrics.registry.register(SamplerCollector(self))
        task_status.started()
        await self.model.settled.wait()
        if self.model.runtime is None:
            self.error = f"no model to sample with ({self.model.error or self.model.state})"
            return
        try:
            from peerd.rl.follow import Follower  # torch: only with a model
            from peerd.rl.policy import LocalPolicy
            from peerd.rl.sampler import RolloutSampler

            runtime = self.model.runtime
            block = runtime.block
            if block.start == 0 and block.end == block.num_layers:
                policy: Any = LocalPolicy.from_runtime(runtime)
                follower = Follower(self.weights, policy)
                self.sampler = RolloutSampler(self.node, policy, runtime.tokenizer,
                                              runtime.generator.eos_ids,
                                              catch_up=follower.catch_up,
                                              on_switch=follower.leave)
            else:
                self._pipeline_shard(runtime)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("no rollout sampler: %s", self.error)
            self.node.events.publish("rollout.failed", error=self.error)
            return
        async with trio.open_nursery() as nursery:
            if self.gate is not None:
                await nursery.start(self.gate.run)
                runtime.server.gate = self.gate  # tagged sessions from now on
            if self.sampler is not None:
                await nursery.start(self.sampler.run)
            self.ledger.republish()  # the rollout features, at once
            self.node.events.publish("rollout.ready", model_id=runtime.model_id,
                                     layers=[block.start, block.end])

    def _pipeline_shard(self, runtime: Any) -> None:
        """A slice of the layers: a shard of the run's pipeline, and its sampler when
        it holds the first layer (then its head follows the run too)."""
        from peerd.rl.follow import Follower
        from peerd.rl.pipeline_policy import PipelinePolicy
        from peerd.rl.sampler import RolloutSampler
        from peerd.rl.shard_gate import ShardGate
        from peerd.rl.versions import VersionedWeights

        entry = runtime.block.start == 0
        weights = VersionedWeights(runtime.block, runtime.head if entry else None)
        # announced versions are fetched, and applied between generations (follow.py)
        follower = Follower(self.weights, weights, apply_announced=False)
        self.gate = ShardGate(weights, follower, on_change=self.ledger.refresh)
        if entry:
            policy = PipelinePolicy(weights, follower, self.gate, runtime.generator)
            self.sampler = RolloutSampler(self.node, policy, runtime.tokenizer,
                                          runtime.generator.eos_ids,
                                          catch_up=follower.catch_up,
                                          on_switch=follower.leave, take_up=policy.take_up,
                                          features=(FEATURE_PIPELINE_SAMPLER,))

    def entry_fields(self) -> EntryFields:
        features: tuple[str, ...] = ()
        if self.sampler is not None:
            features = tuple(self.sampler.entry_fields().get("features", ()))
        if self.gate is not None:
            features += (FEATURE_ROLLOUT_SHARD, FEATURE_ROWS)  # its pipeline batches rows
            if self.gate.following is not None:
                features += (FEATURE_TAGGED_ONLY,)
        return {"features": features} if features else {}

    def status(self) -> dict[str, Any]:
        if self.sampler is not None or self.gate is not None:
            out: dict[str, Any] = (self.sampler.status() if self.sampler is not None
                                   else {"rollout": {"state": "pipeline shard"}})
            if self.sampler is not None:
                out["rollout"]["run_id"] = self.sampler.run_id
                if hasattr(self.sampler.policy, "status"):
                    out["rollout"]["pipeline"] = self.sampler.policy.status()
            if self.gate is not None:
                out["rollout"]["shard"] = self.gate.status()
            return out
        return {"rollout": {"state": "failed" if self.error else "waiting for the model",
                            "error": self.error}}
