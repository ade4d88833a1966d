"""Echo end to end on real in-process hosts: a trainer peer and two sampler peers
(tiny random Llama, the whole model each) train by GRPO, the samplers pulling each
new version from the trainer and from each other.

The task is a trivially learnable reward: every prompt's answer is "7", and a random
model says "7" now and then; GRPO makes it say "7" more.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from peerd.inference.slot import ModelOptions, ModelSlot
from peerd.node import Node
from peerd.rl.rollout_service import Rollouts
from peerd.rl.run import RunSpec
from peerd.rl.training import Run, Training
from peerd.rl.weights import WeightStore
from tests.harness import gossip, serve_model, swarm, wait_for
from tests.models import tiny_llama_dir

SEVEN = [{"prompt": f"Say a number ({i})", "answer": "7"} for i in range(200)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture
def task(tmp_path: Path) -> Path:
    path = tmp_path / "seven.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in SEVEN))
    return path


@contextlib.asynccontextmanager
async def rl_swarm(tmp_path: Path, tiny: Path, samplers: int = 2
                   ) -> AsyncIterator[tuple[Training, list[Rollouts]]]:
    async with swarm(1 + samplers, tmp_path, connect="star") as nodes:
        trainer, *others = nodes
        weights = WeightStore(trainer)
        training = Training(trainer, gossip(trainer), weights, tmp_path / "trainer")
        await trainer.start(weights, training)
        rollouts = [await add_sampler(node, tiny) for node in others]
        yield training, rollouts


async def add_sampler(node: Node, tiny: Path) -> Rollouts:
    await serve_model(node, ModelOptions(spec=str(tiny), torch_threads=1))
    weights = WeightStore(node)
    service = Rollouts(node, gossip(node), node.service(ModelSlot), weights)
    await node.start(weights, service)
    await wait_for(lambda: service.sampler is not None)
    return service


async def finished(training: Training, spec: RunSpec, timeout_s: float = 120.0) -> Run:
    run = await training.start_run(spec)
    with trio.fail_after(timeout_s):
        await run.ended.wait()
    assert run.state == "done", run.to_json()
    return run


def rewards(run: Run) -> list[float]:
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["reward"] for line in lines]


def spec(tiny: Path, task: Path, **kw: Any) -> RunSpec:
    settings: dict[str, Any] = {"model": str(tiny), "task": str(task), "group": 8,
                                "batch": 4, "steps": 6, "max_tokens": 3, "lr": 0.02,
                                "seed": 1, "checkpoint_every": 3} | kw
    return RunSpec(**settings)


async def test_sync_training_learns_and_samplers_follow(tmp_path: Path, tiny: Path,
                                                        task: Path) -> None:
    async with rl_swarm(tmp_path, tiny) as (training, samplers):
        run = await finished(training, spec(tiny, task, run_id="sync"))
        got = rewards(run)
        print("rewards", got)
        out = run.to_json()
        assert out["step"] == 6 and out["version"] == 6
        assert out["staleness"] == {"0": 6 * 4 * 8}  # sync: every rollout on-policy
        assert all(s.sampler.policy.version >= 5 for s in samplers)
        assert (run.dir / "reward.png").stat().st_size > 0
        assert (run.dir / "summary.json").is_file()
