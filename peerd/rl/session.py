"""One run, from its settings to its summary: the parts put together (torch).

training.py accepts a run; this builds what it needs (the task, the learner, the
tokenizer, the trainer's links to the samplers and the weights service), resumes it
from its last checkpoint when asked, trains, and writes `summary.json` and
`reward.png`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import trio

from peerd.api.recall import ScoredRuns
from peerd.inference.model.source import ModelSource, load_tokenizer, resolve
from peerd.ledger.gossip import LedgerGossip
from peerd.memory.learning import domain_of
from peerd.node import Node
from peerd.proven import ProofFile
from peerd.rl.learner import Learner
from peerd.rl.learner_policy import Policy
from peerd.rl.plot import plot_runs
from peerd.rl.ranks import RankedPolicy
from peerd.rl.rollouts import request_rollouts
from peerd.rl.sampler import chat_prompt_ids
from peerd.rl.samplers import SamplerPool
from peerd.rl.scecs import ScecKeeper
from peerd.rl.tasks import Problem, Task, load_task
from peerd.rl.trainer import RL_LIE, Trainer
from peerd.rl.types import Rollout
from peerd.rl.weights import WeightStore
from protocols.rollout import FEATURE_ROLLOUT, RolloutRequest

if TYPE_CHECKING:
    from peerd.rl.training import Run

log = logging.getLogger(__name__)


async def run_training(node: Node, ledger: LedgerGossip, weights: WeightStore,
                       run: Run, *, torch_threads: int = 0,
                       scored: ScoredRuns | None = None,
                       liars: ProofFile | None = None) -> None:
    """Train `run`; with `scored` (the peer's memory), its groups' SCECs are kept there
    (scecs.py); with `liars`, the samplers caught lying to this trainer's runs are not
    asked while their bans last, and those this run catches are added."""
    spec = run.spec
    if torch_threads and spec.ranks == 1:  # `peerd start --torch-threads`: the
        from peerd.inference.model.shard import set_torch_threads  # learner's cores

        set_torch_threads(torch_threads)
    task = load_task(spec.task, seed=spec.seed)
    source = resolve(spec.model)
    tokenizer = await trio.to_thread.run_sync(load_tokenizer, source)
    if spec.ranks == 1:
        learner = await trio.to_thread.run_sync(lambda: Learner.load(
            spec.model, update=spec.update,  # type: ignore[arg-type]
            lora_rank=spec.lora_rank, lora_alpha=int(spec.lora_alpha), lr=spec.lr,
            seed=spec.seed, reference=spec.kl > 0))
        policy: Policy | RankedPolicy = Policy(learner, spec.aggregation, keep=spec.staleness)
        await _train(node, ledger, weights, run, task, source, tokenizer, policy, scored,
                     liars)
        return
    # the peer's torch threads (all its cores when not set), shared by the ranks
    threads = max(1, (torch_threads or os.cpu_count() or 1) // spec.ranks)
    run.phase = f"starting {spec.ranks} learner ranks (torchrun)"
    policy = RankedPolicy.launch(spec, run.dir, threads=threads)
    try:
        # abandoned on cancel: close() below ends the group, which ends the wait
        await trio.to_thread.run_sync(policy.wait_ready,
                                      abandon_on_cancel=True)  # type: ignore[call-arg]
        await _train(node, ledger, weights, run, task, source, tokenizer, policy, scored,
                     liars)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(policy.close)


async def _train(node: Node, ledger: LedgerGossip, weights: WeightStore, run: Run,
                 task: Task, source: ModelSource, tokenizer: Any, policy: Policy | RankedPolicy,
                 scored: ScoredRuns | None, liars: ProofFile | None) -> None:
    spec = run.spec
    step = version = 0
    state: dict[str, Any] | None = None
    if spec.resume:
        run.phase = "resuming from the last checkpoint"
        found = await trio.to_thread.run_sync(policy.resume, run.dir)
        if found is not None:
            step, version, state = found
            # a version may have gone out after the last checkpoint: move past it
            version = max(version, int(state.get("published", version))) + 1
    pool = SamplerPool(ledger.book, source.model_id, FEATURE_ROLLOUT, node.peer_id)
    for peer, (left, why) in (liars.book.banned(time.time()) if liars else {}).items():
        pool.drop(peer, f"caught lying to an earlier run of this trainer ({why}); asked "
                        f"again in {left / 3600:.1f} h")

    def offence(peer: str, reason: str, detail: str) -> None:
        node.offence(peer, reason, detail)
        if reason == RL_LIE and liars is not None:  # no later run asks it while banned
            liars.book.prove(peer, time.time(), detail)
            node.nursery.start_soon(liars.save)
    # only async trains on older versions' rollouts, so only it keeps their tensors
    remember = policy.remember if spec.mode == "async" else (lambda v, t: None)

    def tokenize(prompt: str) -> list[int]:
        return chat_prompt_ids(tokenizer, prompt)

    def detokenize(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    async def sample(peer: str, slots: list[int], problems: list[Problem], seeds: list[int],
                     min_version: int, push: bool) -> list[Rollout]:
        request = RolloutRequest(
            run_id=spec.run_id, prompts=tuple(p.prompt for p in problems), group=spec.group,
            temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
            seed=seeds[0], version=min_version, mode=spec.mode, push=push,
            # one prompt alone draws from `seed` as it would with its own `seeds`
            seeds=tuple(seeds) if len(seeds) > 1 else ())
        return await request_rollouts(node, peer, request)

    published = {"version": version}

    async def publish(v: int, _learner: Any) -> None:
        tensors, scale = await trio.to_thread.run_sync(policy.export)
        remember(v, tensors)
        published["version"] = v
        await weights.publish(spec.run_id, source.model_id, v, spec.update, tensors,
                              lora_scale=scale)

    async def save(s: int, v: int, st: dict[str, Any]) -> None:
        await trio.to_thread.run_sync(policy.save, run.dir, s, v,
                                      {**st, "published": published["version"]})

    def emit(kind: str, **data: Any) -> None:
        node.events.publish(kind, run_id=spec.run_id, **data)

    keeper = ScecKeeper(scored, spec, source.model_id, domain_of(task.name)) \
        if scored is not None and spec.memory_scecs > 0 else None
    trainer = Trainer(spec, task, policy, tokenize, detokenize, pool, sample, publish, save,
                      run.dir, emit, offence, step=step, version=version, state=state,
                      scecs=keeper)
    if version > 0:  # a resumed run: the samplers take the checkpoint's weights first
        await publish(version, policy)
    elif spec.mode == "async":
        remember(0, (await trio.to_thread.run_sync(policy.export))[0])
    run.trainer = trainer
    run.state = "running"
    if run.stopping:
        trainer.stop()
    try:
        await trainer.run()
    finally:
        weights.retire(spec.run_id)
        await trio.to_thread.run_sync(_finish, run, trainer)


def _finish(run: Run, trainer: Trainer) -> None:
    """summary.json and reward.png, whatever happened (they say how far it got)."""
    try:
        (run.dir / "summary.json").write_text(json.dumps(trainer.to_json(), indent=1))
        run.plot = str(plot_runs({run.spec.mode: run.dir / "metrics.jsonl"},
                                 run.dir / "reward.png",
                                 title=f"{run.spec.run_id}: {run.spec.task}, "
                                 f"{run.spec.mode}"))
    except OSError as exc:
        log.warning("could not write the summary of %s: %s", run.spec.run_id, exc)

