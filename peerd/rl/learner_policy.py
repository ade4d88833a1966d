"""The trainer's learner as the trainer loop uses it: on rollouts.

`Policy` wraps a `Learner` in this process. `RankedPolicy` (ranks.py) has the same
methods and runs them on a learner group under torchrun; session.py picks one by the
run's `ranks`, and trainer.py cannot tell them apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peerd.rl import checkpoint
from peerd.rl.learner import Learner, LossFn, TokenBatch, with_check, with_reference
from peerd.rl.types import Rollout


class Policy:
    """A learner in this process, on rollouts."""

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
              loss_fn: LossFn, temperature: float,
              tolerances: Sequence[float | None] | None = None) -> dict[str, Any]:
        """One step on the rollouts. `tolerances`: the fused check's, one a rollout
        (None: not checked; learner.py's docstring); then "deviations" (None where not
        checked) and "stepped" (False: a rollout was over its tolerance, and nothing
        was trained) are in the stats."""
        batch = self.batch(rollouts, advantages)
        if tolerances is not None:
            batch = with_check(batch, tolerances)
        if self.learner.use_reference:
            batch = with_reference(batch, self.learner.reference_logprobs(
                batch, temperature=temperature))
        stats = self.learner.step(batch, loss_fn, temperature=temperature,
                                  aggregation=self.aggregation)  # type: ignore[arg-type]
        out: dict[str, Any] = {"loss": stats.loss, "grad_norm": stats.grad_norm,
                               "tokens": stats.tokens,
                               **{k: v for k, v in stats.stats.items() if k != "tokens"}}
        if stats.deviations is not None:
            out["deviations"] = [None if math.isnan(d) else d for d in stats.deviations]
            out["stepped"] = stats.stepped
        return out

    def export(self) -> tuple[dict[str, torch.Tensor], float | None]:
        """What a new version publishes: `Learner.export`."""
        return self.learner.export()

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.learner.load_tensors(tensors)

    def save(self, run_dir: Path, step: int, version: int, state: dict[str, Any]
             ) -> Path | None:
        """The checkpoint of `step` (checkpoint.save: rank 0 writes)."""
        return checkpoint.save(run_dir, step, version, self.learner, state)

    def resume(self, run_dir: Path) -> tuple[int, int, dict[str, Any]] | None:
        """The run's last checkpoint loaded (checkpoint.load_latest), or None."""
        return checkpoint.load_latest(run_dir, self.learner)

    def close(self) -> None:
        """Nothing to let go of in this process (a RankedPolicy ends its group)."""
