"""One run, from its settings to its summary: the parts put together (torch).

training.py accepts a run; this builds what it needs (the task, the learner, the
tokenizer, the trainer's links to the samplers and the weights service), resumes it
from its last checkpoint when asked, trains, and writes `summary.json` and
`reward.png`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from peerd.api.recall import ScoredRuns
from peerd.inference.model.source import load_tokenizer, resolve
from peerd.ledger.gossip import LedgerGossip
from peerd.memory.learning import domain_of
from peerd.node import Node
from peerd.rl import checkpoint
from peerd.rl.learner import Learner, LossFn, TokenBatch
from peerd.rl.plot import plot_runs
from peerd.rl.rollouts import request_rollouts
from peerd.rl.sampler import chat_prompt_ids
from peerd.rl.samplers import SamplerPool
from peerd.rl.scecs import ScecKeeper
from peerd.rl.tasks import Problem, load_task
from peerd.rl.trainer import Trainer
from peerd.rl.types import Rollout
from peerd.rl.weights import WeightStore
from protocols.rollout import FEATURE_ROLLOUT, RolloutRequest

if TYPE_CHECKING:
    from peerd.rl.training import Run

log = logging.getLogger(__name__)


class Policy:
    """The trainer's learner, as the trainer loop uses it: on rollouts."""

    def __init__(self, learner: Learner, aggregation: str, keep: int = 1) -> None:
        self.learner = learner
        self.keep = keep  # older versions remembered, to check their rollouts
        self.snapshots: dict[int, dict[str, Any]] = {}  # version -> its trained tensors
        # how micro-batches (and ranks) share the batch's loss: learner.py's docstring
        self.aggregation = "token" if aggregation == "token" else "sequence"

    @staticmethod
    def batch(rollouts: Sequence[Rollout], advantages: Sequence[float] | None = None
              ) -> TokenBatch:
        return TokenBatch.from_sequences(
            [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
            [r.behaviour_logprobs for r in rollouts],
            list(advantages) if advantages is not None else [0.0] * len(rollouts))

    def score(self, rollouts: Sequence[Rollout], temperature: float) -> list[list[float]]:
        """Our log-probs of each rollout's tokens (to check the sampler's)."""
        lp = self.learner.score(self.batch(rollouts), temperature=temperature)
        return [lp[i, :len(r.completion_ids)].tolist() for i, r in enumerate(rollouts)]

    def remember(self, version: int, tensors: dict[str, Any]) -> None:
        """Keep `version`'s trained tensors (as exported: LoRA adapters are small) for
        checking rollouts of it later; only the newest `keep` + 1 versions are kept."""
        self.snapshots[version] = tensors
        for old in [v for v in self.snapshots if v < version - self.keep]:
            del self.snapshots[old]

    def score_at(self, version: int, rollouts: Sequence[Rollout], temperature: float
                 ) -> list[list[float]] | None:
        """Our log-probs of the rollouts under an older `version` (None: not kept)."""
        then = self.snapshots.get(version)
        if then is None:
            return None
        now, _ = self.learner.export()
        self.learner.load_tensors(then)
        try:
            return self.score(rollouts, temperature)
        finally:
            self.learner.load_tensors(now)

    def train(self, rollouts: Sequence[Rollout], advantages: Sequence[float],
              loss_fn: LossFn, temperature: float) -> dict[str, Any]:
        batch = self.batch(rollouts, advantages)
        if self.learner.use_reference:
            from peerd.rl.learner import with_reference

            batch = with_reference(batch, self.learner.reference_logprobs(
                batch, temperature=temperature))
        stats = self.learner.step(batch, loss_fn, temperature=temperature,
                                  aggregation=self.aggregation)  # type: ignore[arg-type]
        return {"loss": stats.loss, "grad_norm": stats.grad_norm, "tokens": stats.tokens,
                **{k: v for k, v in stats.stats.items() if k != "tokens"}}


async def run_training(node: Node, ledger: LedgerGossip, weights: WeightStore,
                       run: Run, *, torch_threads: int = 0,
                       scored: ScoredRuns | None = None) -> None:
    """Train `run`; with `scored` (the peer's memory), its groups' SCECs are kept there
    (scecs.py)."""
    spec = run.spec
    if torch_threads:  # `peerd start --torch-threads`: the learner's share of the cores
        from peerd.inference.model.shard import set_torch_threads

        set_torch_threads(torch_threads)
    task = load_task(spec.task, seed=spec.seed)
    source = resolve(spec.model)
    tokenizer = await trio.to_thread.run_sync(load_tokenizer, source)
    learner = await trio.to_thread.run_sync(lambda: Learner.load(
        spec.model, update=spec.update,  # type: ignore[arg-type]
        lora_rank=spec.lora_rank, lora_alpha=int(spec.lora_alpha), lr=spec.lr,
        seed=spec.seed, reference=spec.kl > 0))
    step = version = 0
    state: dict[str, Any] | None = None
    if spec.resume:
        run.phase = "resuming from the last checkpoint"
        found = await trio.to_thread.run_sync(checkpoint.load_latest, run.dir, learner)
        if found is not None:
            step, version, state = found
            # a version may have gone out after the last checkpoint: move past it
            version = max(version, int(state.get("published", version))) + 1
    pool = SamplerPool(ledger.book, source.model_id, FEATURE_ROLLOUT, node.peer_id)
    policy = Policy(learner, spec.aggregation, keep=spec.staleness)
    # only async trains on older versions' rollouts, so only it keeps their tensors
    remember = policy.remember if spec.mode == "async" else (lambda v, t: None)

    def tokenize(prompt: str) -> list[int]:
        return chat_prompt_ids(tokenizer, prompt)

    def detokenize(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    async def sample(peer: str, slot: int, problem: Problem, seed: int,
                     min_version: int, push: bool) -> list[Rollout]:
        request = RolloutRequest(
            run_id=spec.run_id, prompts=(problem.prompt,), group=spec.group,
            temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
            seed=seed, version=min_version, mode=spec.mode, push=push)
        return await request_rollouts(node, peer, request)

    published = {"version": version}

    async def publish(v: int, _learner: Any) -> None:
        tensors, scale = await trio.to_thread.run_sync(learner.export)
        remember(v, tensors)
        published["version"] = v
        await weights.publish(spec.run_id, source.model_id, v, spec.update, tensors,
                              lora_scale=scale)

    async def save(s: int, v: int, st: dict[str, Any]) -> None:
        await trio.to_thread.run_sync(checkpoint.save, run.dir, s, v, learner,
                                      {**st, "published": published["version"]})

    def emit(kind: str, **data: Any) -> None:
        node.events.publish(kind, run_id=spec.run_id, **data)

    keeper = ScecKeeper(scored, spec, source.model_id, domain_of(task.name)) \
        if scored is not None and spec.memory_scecs > 0 else None
    trainer = Trainer(spec, task, policy, tokenize, detokenize, pool, sample, publish, save,
                      run.dir, emit, node.offence, step=step, version=version, state=state,
                      scecs=keeper)
    if version > 0:  # a resumed run: the samplers take the checkpoint's weights first
        await publish(version, learner)
    elif spec.mode == "async":
        remember(0, (await trio.to_thread.run_sync(learner.export))[0])
    run.trainer = trainer
    run.state = "running"
    if run.stopping:
        trainer.stop()
    try:
        await trainer.run()
    finally:
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

