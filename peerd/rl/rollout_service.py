"""`peerd start --rollout`: this peer's model samples rollouts for RL trainers.

The model loads in the background (inference/slot.py), so the sampler (sampler.py)
starts once it is ready: then it registers `/peerd/rollout/1.0.0`, follows its
trainer's versions through the weights service (follow.py), and our ledger entry
lists the rollout feature. A model that failed to load, or that holds only some
layers, leaves the peer running without a sampler, and its status says why.
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
            policy = LocalPolicy.from_runtime(runtime)
            follower = Follower(self.weights, policy)
            self.sampler = RolloutSampler(self.node, policy, runtime.tokenizer,
                                          runtime.generator.eos_ids,
                                          catch_up=follower.catch_up,
                                          on_switch=follower.leave)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("no rollout sampler: %s", self.error)
            self.node.events.publish("rollout.failed", error=self.error)
            return
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sampler.run)
            self.ledger.refresh()  # the rollout feature, at once
            self.node.events.publish("rollout.ready", model_id=runtime.model_id)

    def entry_fields(self) -> EntryFields:
        return self.sampler.entry_fields() if self.sampler is not None else {}

    def status(self) -> dict[str, Any]:
        if self.sampler is not None:
            out: dict[str, Any] = self.sampler.status()
            out["rollout"]["run_id"] = self.sampler.run_id
            return out
        return {"rollout": {"state": "failed" if self.error else "waiting for the model",
                            "error": self.error}}
