"""A trainer and sampler peers on real in-process hosts, for Echo's tests.

The task is a trivially learnable reward: every prompt's answer is "7", and a random
model says "7" now and then; GRPO makes it say "7" more (tests/test_rl_train.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from peerd.inference.slot import ModelOptions, ModelSlot
from peerd.node import Node
from peerd.rl.policy import Completion, Generation
from peerd.rl.rollout_service import Rollouts
from peerd.rl.training import Training
from peerd.rl.weights import WeightStore
from protocols.rollout import FEATURE_ROLLOUT
from tests.harness import book, connect_nodes, gossip, serve_model, swarm, wait_for

SEVEN = [{"prompt": f"Say a number ({i})", "answer": "7"} for i in range(200)]


def seven_task(directory: Path) -> Path:
    """The "7" task as a .jsonl file in `directory`."""
    path = directory / "seven.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in SEVEN))
    return path


@contextlib.asynccontextmanager
async def rl_swarm(tmp_path: Path, tiny: Path, samplers: int = 2
                   ) -> AsyncIterator[tuple[Training, list[Rollouts]]]:
    """A trainer node (weights + training services) and `samplers` nodes serving
    `tiny` whole with a rollout sampler each, wired as a star around the trainer."""
    async with swarm(1 + samplers, tmp_path, connect="star") as nodes:
        trainer, *others = nodes
        weights = WeightStore(trainer)
        training = Training(trainer, gossip(trainer), weights, tmp_path / "trainer")
        await trainer.start(weights, training)
        rollouts = [await add_sampler(node, tiny) for node in others]
        # a run asks the samplers in the trainer's ledger: one not there yet when a
        # short run starts may never be asked (a liar never caught, a share never cut)
        await wait_for(lambda: all(sampling(trainer, node) for node in others), 10,
                       "the trainer's ledger to list every sampler")
        yield training, rollouts


@contextlib.asynccontextmanager
async def rl_pipeline_swarm(tmp_path: Path, tiny: Path
                            ) -> AsyncIterator[tuple[Training, list[Rollouts]]]:
    """A trainer node and one pipeline sampler: `tiny` split over two `--rollout`
    nodes, the entry (the head and layers [0, 2): the sampler) and a rollout shard
    ([2, 4)), each connected to the trainer and to the other."""
    async with swarm(3, tmp_path, connect="star") as nodes:
        trainer, entry, shard = nodes
        await connect_nodes(entry, shard)
        weights = WeightStore(trainer)
        training = Training(trainer, gossip(trainer), weights, tmp_path / "trainer")
        await trainer.start(weights, training)
        services = [await add_sampler(entry, tiny, (0, 2)),
                    await add_sampler(shard, tiny, (2, 4))]
        await wait_for(lambda: sampling(trainer, entry), 10,
                       "the trainer's ledger to list the pipeline sampler")
        yield training, services


def sampling(trainer: Node, sampler: Node) -> bool:
    """The trainer's ledger lists `sampler` serving a model with the rollout feature."""
    entry = book(trainer).get(sampler.peer_id)
    return entry is not None and FEATURE_ROLLOUT in entry.features and bool(entry.models)


async def add_sampler(node: Node, tiny: Path, layers: tuple[int, int] | None = None
                      ) -> Rollouts:
    """`node` serves `tiny` (all of it, or `layers`) with the rollout service: a
    sampler, or a pipeline's rollout shard (and its sampler when it holds layer 0)."""
    await serve_model(node, ModelOptions(spec=str(tiny), layers=layers, torch_threads=1))
    weights = WeightStore(node)
    service = Rollouts(node, gossip(node), node.service(ModelSlot), weights)
    await node.start(weights, service)
    await wait_for(lambda: service.sampler is not None or service.gate is not None)
    return service


def lie(service: Rollouts, factor: float) -> None:
    """Make a sampler report behaviour log-probs `factor` times the true ones (a lie
    that makes its tokens look likelier than they were, the kind that would inflate
    the importance ratio)."""
    policy = service.sampler.policy
    honest = policy.generate_many

    async def lying(*args: Any, **kw: Any) -> Generation:
        got = await honest(*args, **kw)
        return Generation(got.version, [[Completion(c.ids, tuple(lp * factor for lp in
                                                                  c.logprobs))
                                         for c in group] for group in got.groups])

    policy.generate_many = lying
