"""What a training run offers the peer's memory: one SCEC per trained group.

A group's first rollout is kept as a self-contained execution context (docs/sedm.md):
the prompt, the policy's model and version (`run@version`), the sampling it was drawn
with (the run's temperature, top_p and token budget; the completion's own seed,
policy.completion_seed), its output and its score, with no memory given. The memory
keeps it as an admission task and moves nothing (`served=False`): a policy sampling at
temperature 1 as it trains says nothing of the served model's greedy baseline.

The score is the reward's correctness: number_reward gives 0, 0.1, 1.0 or 1.1 (1.0 for
the right final number, 0.1 for a bare number on the last line), and an SCEC's score is
its scorer's on the output, in [0, 1]: the `number` scorer, which a replay of the same
output reproduces, is 1.0 exactly when the reward holds CORRECT_REWARD. Clipping the
reward instead would keep 0.1 for a wrong bare number, a score no replay gives.

Bounded: at most `cap` a run; the trainer's `offer` never waits (a full queue drops
the SCEC and counts it), and one task hands them to the memory, whose store works off
the event loop.
"""

from __future__ import annotations

import logging

import trio

from peerd.api.recall import ScoredRuns
from peerd.inference.face import ModelUnavailable
from peerd.rl.policy import completion_seed
from peerd.rl.run import RunSpec
from peerd.rl.tasks import CORRECT_REWARD, Problem
from peerd.rl.types import Group
from protocols.errors import WireError
from protocols.memory import ScecMsg

log = logging.getLogger(__name__)

QUEUE = 64  # SCECs waiting for the memory; past it, one is dropped (counted)
SCORER = "number"  # every task's answer is a number (tasks.py)


def group_scec(spec: RunSpec, model_id: str, domain: str, problem: Problem, seed: int,
               group: Group) -> ScecMsg:
    """The SCEC of `group`'s first rollout, drawn for `problem` with the slot's `seed`.
    WireError when a field is out of bounds (a prompt longer than an SCEC keeps)."""
    first = group[0]
    scec = ScecMsg(
        prompt=problem.prompt, domain=domain, model=model_id,
        version=f"{spec.run_id}@{first.version}", max_tokens=spec.max_tokens,
        temperature=spec.temperature, top_p=spec.top_p,
        # the trainer gives each prompt of a request its slot's seed: it draws as it
        # would alone, prompt 0 of a request (protocols.rollout: `seeds`)
        seed=completion_seed(seed, 0, 0), stop=(), memory=(),
        memory_ids=(), answer=problem.answer, scorer=SCORER, output=first.text,
        score=1.0 if (first.reward or 0.0) >= CORRECT_REWARD else 0.0,
        prompt_tokens=len(first.prompt_ids), latency_s=0.0)
    scec.check()
    return scec


class ScecKeeper:
    """A run's SCECs on their way to the memory."""

    def __init__(self, scored: ScoredRuns, spec: RunSpec, model_id: str, domain: str
                 ) -> None:
        self.scored = scored
        self.spec = spec
        self.model_id = model_id
        self.domain = domain
        self.offered = 0  # counts against the cap
        self.kept = 0
        self.failed = 0  # out of bounds, dropped on a full queue, refused by the memory
        # or failed in it (its store, its embedder)
        self._send, self._recv = trio.open_memory_channel[ScecMsg](QUEUE)

    def offer(self, problem: Problem, seed: int, group: Group) -> None:
        """A trained group's SCEC, queued for the memory; never waits."""
        if self.offered >= self.spec.memory_scecs:
            return
        self.offered += 1
        try:
            self._send.send_nowait(group_scec(self.spec, self.model_id, self.domain,
                                              problem, seed, group))
        except (WireError, trio.WouldBlock) as exc:
            self.failed += 1
            log.debug("run %s: a group's SCEC is not kept: %r", self.spec.run_id, exc)

    def close(self) -> None:
        """No more offers: run() returns once the queue is empty."""
        self._send.close()

    async def run(self) -> None:
        async with self._recv:
            async for scec in self._recv:
                try:
                    await self.scored.observe(scec, (), served=False)
                    self.kept += 1
                except (WireError, ModelUnavailable) as exc:
                    self.failed += 1
                    log.warning("run %s: the memory did not keep an SCEC: %s",
                                self.spec.run_id, exc)
                except Exception:  # the store (a full disk), the embedder, our bug: the
                    # memory's failure is the memory's, never the training run's
                    self.failed += 1
                    log.warning("run %s: the memory failed to keep an SCEC",
                                self.spec.run_id, exc_info=True)

    def to_json(self) -> dict[str, int]:
        return {"kept": self.kept, "failed": self.failed}

    def state(self) -> dict[str, int]:
        """What a checkpoint keeps: a resumed run goes on counting against its cap."""
        return {"offered": self.offered, **self.to_json()}

    def restore(self, state: object) -> None:
        """The counts a checkpoint kept (state()); anything else counts from zero."""
        if not isinstance(state, dict):
            return
        counts = {k: v for k, v in state.items() if k in ("offered", "kept", "failed")
                  and type(v) is int and v >= 0}
        if len(counts) == 3:
            self.offered, self.kept, self.failed = (
                counts["offered"], counts["kept"], counts["failed"])
