"""The trainer: GRPO on rollouts from the swarm's samplers, in sync or async mode.

One producer per sampler asks it for the rollouts of its share of a step's prompt
slots at a time, in one request (slots.py says which slots, and the oldest policy
version that may generate them; a sampler decodes a request's prompts together, and
every prompt carries its slot's seed, so the grouping changes no token); the trainer
takes each step's slots as they are ready:

- sync (Echo's sequential pull): nothing is handed out beyond the current step, and
  every request names the current version, so a sampler that is behind pulls first;
  every rollout a step trains is on-policy.
- async (Echo's push-pull): slots up to S steps ahead go out while the trainer
  trains, to samplers that may be up to S versions behind. A rollout's staleness is
  measured when its step trains it (`trainer version - rollout version <= S`, else it
  is refused "stale" and its slot goes out again); the clipped importance ratio
  against the sampler's behaviour log-probs corrects what is off-policy.

Before a step, the rollouts are checked: their prompt ids must be the trainer's
tokenisation of the slot's prompt, and the sampler's behaviour log-probs must match
the trainer's own within `verify_tolerance` (mean absolute difference a token): every
group generated at the trainer's own version, and a sample of older groups scored
under the version that made them (the trainer keeps the last S versions' trained
tensors: LoRA adapters are small; a full update costs a model copy a version). The
current version's groups that train are checked by the training forward itself (the
fused check, learner.py): a lie found there drops the gradients before the optimiser
steps, and the step waits for its slots again. A sampler that fails is dropped for the
run and counted as an offence; its slots go out again (a liar is also kept from this
trainer's later runs for a day: session.py).

One module, past the usual size: the producers, the check and the steps all move the
same state (slots handed out, groups waiting, orders held, the version); the pure
rules are out (slots.py, intake.py, buffer.py, grpo.py, progress.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio

from peerd.rl.buffer import ReplayBuffer
from peerd.rl.grpo import GrpoLoss, group_advantages, is_degenerate
from peerd.rl.intake import group_fault
from peerd.rl.progress import NoSamplers, Progress, judge, judge_deviations, to_check
from peerd.rl.run import RunSpec
from peerd.rl.samplers import SamplerPool
from peerd.rl.scecs import ScecKeeper
from peerd.rl.slots import Slots, request_size, share_of
from peerd.rl.tasks import Problem, Task
from peerd.rl.types import Group, Rollout
from protocols.errors import RemoteError
from protocols.rollout import OTHER_RUN

log = logging.getLogger(__name__)

RL_LIE = "rl_lie"  # the offence of a sampler a check caught lying

BUSY_CODES = frozenset({"busy", OTHER_RUN})  # a sampler's refusals that are no fault
BUSY_RETRY_S = 2.0


Sampler = Callable[[str, list[int], list[Problem], list[int], int, bool], Any]
# (peer, slots, their problems, their seeds, min version, push) -> awaitable
# list[Rollout], prompt by prompt in the slots' order (none for a pushed order)


@dataclass
class _Order:
    """The slots a sampler took in async mode; done when its push is in."""

    slots: list[int]
    done: trio.Event = field(default_factory=trio.Event)


class Trainer:
    def __init__(self, spec: RunSpec, task: Task, learner: Any, tokenize: Callable[[str],
                 list[int]], detokenize: Callable[[list[int]], str], pool: SamplerPool,
                 sample: Sampler, publish: Callable[[int, Any], Any],
                 checkpoint: Callable[[int, int, dict[str, Any]], Any], run_dir: Path,
                 emit: Callable[..., None], offence: Callable[[str, str, str], None],
                 *, step: int = 0, version: int = 0, state: dict[str, Any] | None = None,
                 scecs: ScecKeeper | None = None) -> None:
        self.spec = spec
        self.task = task
        self.learner = learner
        self.tokenize = tokenize
        self.detokenize = detokenize
        self.pool = pool
        self.sample = sample
        self.publish = publish  # (version, learner) -> awaitable: export and announce
        self.checkpoint = checkpoint  # (step, version, state) -> awaitable
        self.run_dir = run_dir
        self.emit = emit  # (event type, **data)
        self.offence = offence
        self.scecs = scecs  # the peer's memory keeps a trained group's SCEC (scecs.py)
        staleness = spec.staleness if spec.mode == "async" else 0
        self.staleness = staleness
        self.slots = Slots(spec.batch, staleness if spec.mode == "async" else 0,
                           next_slot=step * spec.batch, steps=spec.steps)
        self.version = version
        self.offset = version - step  # versions move on across a resume; steps do not
        self.progress = Progress(step=step, version=version)
        if state:
            p = self.progress
            p.refused.update(state.get("refused", {}))
            p.samples = int(state.get("samples", 0))
            p.skipped_groups = int(state.get("skipped_groups", 0))
            p.train_s, p.sync_s = state.get("train_s", 0.0), state.get("sync_s", 0.0)
            p.trainer_idle_s = state.get("trainer_idle_s", 0.0)
            p.verify_s = state.get("verify_s", 0.0)
            p.refused_steps = int(state.get("refused_steps", 0))
            p.started -= float(state.get("elapsed_s", 0.0))  # wall time goes on too
        if self.scecs is not None and state:  # the run's cap counts across a resume
            self.scecs.restore(state.get("memory_scecs", {}))
        self.buffer = (ReplayBuffer.from_json(state["buffer"], **self._buffer_args())
                       if state and "buffer" in state else ReplayBuffer(**self._buffer_args()))
        # By slot or group, of the slots not yet trained only (_forget_trained): every
        # slot below the current step's is trained, none of it is out or comes back.
        self.waiting: dict[int, str] = {}  # slot -> the group id of its rollouts, waiting
        self.attempts: Counter[int] = Counter()  # slot -> times its rollouts arrived
        self.sampler_of: dict[str, str] = {}  # group id (in the buffer) -> its sampler
        self.push = spec.mode == "async"  # samplers push their rollouts (Echo's async)
        self.orders: dict[str, _Order] = {}  # sampler -> the order it holds
        self.stopping = False
        self._step_verify_s = 0.0  # the step in hand's checks so far
        self._changed = trio.Event()  # a slot came back, a group arrived, a step ended
        self._prompt_ids: dict[int, list[int]] = {}
        self._problems: dict[int, Problem] = {}

    def _buffer_args(self) -> dict[str, Any]:
        spec = self.spec
        return {"staleness": self.staleness, "group_size": spec.group, "run_id": spec.run_id,
                # every slot that may be out at once, and room for what is about to expire
                "capacity_groups": spec.batch * (self.slots.ahead + 2) + 64}

    # ---- slots ----------------------------------------------------------------------

    def problem(self, slot: int) -> Problem:
        if slot not in self._problems:  # a pure function of (task, seed, slot)
            self._problems[slot] = self.task.problem(slot)
        return self._problems[slot]

    def seed(self, slot: int) -> int:
        return (self.spec.seed * 1_000_003 + slot) % 2**62

    def prompt_ids(self, slot: int) -> list[int]:
        if slot not in self._prompt_ids:
            self._prompt_ids[slot] = self.tokenize(self.problem(slot).prompt)
        return self._prompt_ids[slot]

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- the run --------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as keeping:
            if self.scecs is not None:
                keeping.start_soon(self.scecs.run)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._recruit, nursery)
                    await self._train()
                    nursery.cancel_scope.cancel()
            finally:
                if self.scecs is not None:
                    self.scecs.close()  # what is queued is kept before the run ends

    async def _recruit(self, nursery: trio.Nursery) -> None:
        """A producer for every sampler found, now and whenever one joins. Without one
        for `sampler_wait_s` (at the start: fewer than `samplers` asked for), the run
        fails saying so."""
        running: set[str] = set()
        want = max(1, self.spec.samplers)
        since = time.monotonic()
        started = False
        while True:
            found = self.pool.found()
            if started or len(found) >= want:
                started = True
                for peer in found:
                    if peer not in running:
                        running.add(peer)
                        nursery.start_soon(self._produce, peer, running)
            if running or (found and started):
                since = time.monotonic()
                self.progress.waiting_for = ""
            else:
                self.progress.waiting_for = (
                    f"samplers: {len(found)} of {want} found serving {self.pool.model_id} "
                    "with the rollout feature (peerd start --model M --rollout)")
                if time.monotonic() - since > self.spec.sampler_wait_s:
                    dropped = "; ".join(f"{p[:12]}: {why}" for p, why in
                                        self.pool.dropped.items())
                    raise NoSamplers(f"no sampler for {self.spec.sampler_wait_s:.0f} s: "
                                     f"{self.progress.waiting_for}"
                                     + (f"; dropped: {dropped}" if dropped else ""))
            await trio.sleep(1.0)

    async def _produce(self, peer: str, running: set[str]) -> None:
        try:
            while peer not in self.pool.dropped:
                spec = self.spec
                slots = self.slots.hand_out(request_size(
                    spec.batch, spec.group, spec.max_tokens,
                    share_of(self.pool.rates, peer, running)))
                if not slots:
                    await self._changed.wait()
                    continue
                min_version = self.offset + self.slots.min_version(slots, self.staleness)
                order = _Order(slots) if self.push else None
                problems = [self.problem(s) for s in slots]
                seeds = [self.seed(s) for s in slots]
                asked = time.monotonic()
                try:
                    with trio.fail_after(self.spec.sampler_timeout_s):
                        if order is None:
                            rollouts = await self.sample(peer, slots, problems, seeds,
                                                         min_version, False)
                            self._arrived_all(peer, slots, rollouts)
                        else:  # async: an order, answered by a push (pushed())
                            self.orders[peer] = order
                            await self.sample(peer, slots, problems, seeds, min_version,
                                              True)
                            await order.done.wait()
                except RemoteError as exc:
                    self.slots.give_back(slots)
                    self._wake()
                    if exc.code in BUSY_CODES:  # busy or on another run: no fault of its
                        # own; ask again shortly
                        self.emit("rl.sampler_busy", peer_id=peer, code=exc.code)
                        await trio.sleep(BUSY_RETRY_S)
                        continue
                    if self._failed(peer, slots, exc):
                        break
                    await trio.sleep(1.0)
                    continue
                except Exception as exc:  # the sampler failed: its slots go out again
                    self.slots.give_back(slots)
                    self._wake()
                    if self._failed(peer, slots, exc):
                        break
                    await trio.sleep(1.0)
                    continue
                finally:
                    if order is not None and self.orders.get(peer) is order:
                        del self.orders[peer]
                self.pool.served(peer, len(slots), time.monotonic() - asked)
        finally:
            running.discard(peer)

    def _failed(self, peer: str, slots: list[int], exc: Exception) -> bool:
        """Count a failed request against the sampler; True when it is dropped."""
        why = f"{type(exc).__name__}: {exc}"[:300]
        dropped = self.pool.failed(peer, why)
        self.emit("rl.sampler_failed", peer_id=peer, slots=slots, error=why,
                  dropped=dropped)
        return dropped

    def pushed(self, peer: str, rollouts: list[Rollout]) -> dict[str, int]:
        """Rollouts a sampler pushed for its order: into the buffer, or refused; what
        became of them is the push's ack."""
        order = self.orders.get(peer)
        if order is None or order.done.is_set():
            self.progress.refused["unasked"] += 1
            return {"unasked": len(rollouts)}
        outcome = self._arrived_all(peer, order.slots, rollouts)
        order.done.set()
        return outcome

    def _arrived_all(self, peer: str, slots: list[int], rollouts: list[Rollout]
                     ) -> dict[str, int]:
        """A request's rollouts, prompt i's group for slots[i]: each group offered (or
        refused) on its own; what became of the rollouts, by outcome."""
        groups: list[list[Rollout]] = [[] for _ in slots]
        for r in rollouts:
            if not 0 <= r.prompt_index < len(slots):
                self._refuse(slots, "malformed", peer, f"a rollout of prompt "
                             f"{r.prompt_index} in a request of {len(slots)} prompts")
                return {"malformed": len(rollouts)}
            groups[r.prompt_index].append(r)
        outcome: Counter[str] = Counter()
        for slot, group in zip(slots, groups, strict=True):
            reason = self._arrived(peer, slot, group)
            outcome[reason or "admitted"] += len(group)
        return {k: v for k, v in outcome.items() if v}

    def _arrived(self, peer: str, slot: int, rollouts: list[Rollout]) -> str | None:
        """Score a slot's group and offer it to the buffer: None, or why it was not
        admitted (then its slot goes out again)."""
        why = group_fault(rollouts, peer=peer, size=self.spec.group,
                          max_tokens=self.spec.max_tokens, version=self.version,
                          prompt_ids=self.prompt_ids(slot))
        if why:
            self._refuse([slot], "malformed", peer, why)
            return "malformed"
        answer = self.problem(slot).answer
        self.attempts[slot] += 1
        gid = f"{slot}.{self.attempts[slot]}"  # unique in the run, the slot readable in it
        texts = [self.detokenize(list(r.completion_ids)) for r in rollouts]  # ours, not
        # the sampler's: the reward is the trainer's to give
        group = tuple(dataclasses.replace(r, group_id=gid, text=t,
                                          reward=float(self.task.reward(t, answer)))
                      for r, t in zip(rollouts, texts, strict=True))
        reason = self.buffer.offer(group, self.version)
        if reason is not None:
            self._refuse([slot], reason, peer, f"group of version {group[0].version} at "
                         f"trainer version {self.version}", counted=True)
            return reason
        self.waiting[slot] = gid
        self.sampler_of[gid] = peer
        self._wake()
        return None

    def _refuse(self, slots: list[int], reason: str, peer: str, detail: str = "",
                *, counted: bool = False) -> None:
        """Slots whose rollouts will not be trained on: counted (unless the buffer
        did), told on /events, and handed out again."""
        if not counted:
            self.progress.refused[reason] += len(slots)
        self.emit("rl.rejected", reason=reason, peer_id=peer, slots=slots, detail=detail)
        for s in slots:
            self.waiting.pop(s, None)
        self.slots.give_back(slots)
        self._wake()

    def stop(self) -> None:
        """Stop after the step in hand (none is cut short), with a checkpoint."""
        self.stopping = True
        self._wake()

    async def _train(self) -> None:
        saved = -1
        while self.slots.step < self.spec.steps and not self.stopping:
            self.progress.state = "waiting"
            idle = time.monotonic()
            self._step_verify_s = 0.0
            got = await self._step_groups()
            waited = time.monotonic() - idle - self._step_verify_s  # the checks are work
            self.progress.trainer_idle_s += waited
            if got is None:
                break  # stopped while waiting
            self.progress.state = "training"
            trained = await self._train_step(*got, waited)
            if trained is not None:
                saved = trained
        if self.stopping and saved != self.slots.step and self.slots.step > 0:
            await self.checkpoint(self.slots.step, self.version, self.state())
        self.progress.state = "stopped" if self.stopping else "done"
        self.progress.ended = time.time()

    async def _step_groups(self) -> tuple[list[str], list[Group]] | None:
        """Wait until every slot of the step has a group admissible now that passed the
        checks the training forward cannot do (_verify); (their ids, the groups), still
        in the buffer (None: the run was stopped meanwhile)."""
        while not self.stopping:
            for gone in self.buffer.expire(self.version):  # aged out in the queue
                self._refuse([_slot(gone[0].group_id)], "stale_at_train",
                             self.sampler_of.pop(gone[0].group_id, ""), counted=True)
            want = list(self.slots.current())
            ids = [self.waiting.get(s) for s in want]
            if all(ids):
                gids = [g for g in ids if g is not None]
                groups = [g for g in (self.buffer.get(i) for i in gids) if g is not None]
                assert len(groups) == len(gids)  # waiting groups are in the buffer
                if not await self._verify(groups):
                    return gids, groups
                continue
            await self._changed.wait()
        return None

    def tolerance(self, peer: str) -> float:
        """How far a sampler's log-probs may be from ours: float32 samplers compute as
        we do; a sampler in a half-precision dtype (or one that does not say) rounds."""
        if self.pool.dtype(peer) == "float32":
            return self.spec.verify_tolerance
        return self.spec.verify_tolerance_half

    async def _verify(self, groups: list[Group]) -> set[str]:
        """Check the samplers' behaviour log-probs against ours (progress.to_check
        says which groups: those of our current version that train, one more of each
        sampler otherwise unchecked, and a sample of `verify_old` of older versions,
        scored under the version that made them), but for those the training forward
        checks itself (fused: `_train_step`), the current version's that train. Liars
        are dropped (returned; their groups let go and their slots sent out again)."""
        now, old = to_check(groups, self.version, self.spec.verify_old,
                            random.Random(self.spec.seed * 7919 + self.version))
        current = [groups[i] for i in now if not self._fused(groups[i])]
        sample = [groups[i] for i in old]
        checks: list[tuple[Group, list[list[float]]]] = []
        t0 = time.monotonic()
        if current:
            rollouts = [r for g in current for r in g]
            ours = await trio.to_thread.run_sync(self.learner.score, rollouts,
                                                 self.spec.temperature)
            at = 0
            for g in current:
                checks.append((g, ours[at:at + len(g)]))
                at += len(g)
        for g in sample:
            then = await trio.to_thread.run_sync(self.learner.score_at, g[0].version,
                                                 list(g), self.spec.temperature)
            if then is not None:
                checks.append((g, then))
                self.progress.verified_old += 1
        spent = time.monotonic() - t0
        self._step_verify_s += spent
        self.progress.verify_s += spent
        return self._caught(groups, *judge(checks, self.tolerance))

    def _caught(self, groups: list[Group], liars: set[str], worst: dict[str, float]
                ) -> set[str]:
        """Drop the samplers a check caught lying (their groups let go, their slots
        sent out again); `liars`, returned."""
        if worst:
            self.progress.last["verify_max_dev"] = round(max(worst.values()), 6)
        for peer in liars:
            why = (f"behaviour log-probs off by up to {worst[peer]:.4f} a token on average "
                   f"(tolerance {self.tolerance(peer)})")
            self.pool.drop(peer, why)
            self.offence(peer, RL_LIE, why)
            mine = [g[0].group_id for g in groups if g[0].sampler == peer]
            for gid in mine:
                self.buffer.discard(gid, "verification")
                self.sampler_of.pop(gid, None)
            self._refuse([_slot(g) for g in mine], "verification", peer, why, counted=True)
        return liars

    def _fused(self, group: Group) -> bool:
        """Whether the training forward checks this group itself: it is of our current
        version (so our log-probs then are the policy's that sampled it) and trains."""
        return group[0].version == self.version and not is_degenerate(
            torch.tensor([r.reward or 0.0 for r in group], dtype=torch.float32))

    async def _train_step(self, gids: list[str], groups: list[Group], waited_s: float
                          ) -> int | None:
        """Train one step on `groups` (ids `gids`, in the buffer; the trainer waited
        `waited_s` for them): the step checkpointed now, or -1; None when the training
        forward caught a sampler lying (nothing was trained: the step waits for its
        groups again)."""
        spec = self.spec
        t0 = time.monotonic()
        advantages: list[float] = []
        rollouts: list[Rollout] = []
        tolerances: list[float | None] = []  # the fused check's, one a rollout
        skipped = 0
        for g in groups:
            rewards = torch.tensor([r.reward or 0.0 for r in g], dtype=torch.float32)
            if is_degenerate(rewards):  # all equal: no signal, no gradient
                skipped += 1
                continue
            adv = group_advantages(rewards, scale_std=spec.aggregation != "dr-grpo")
            advantages.extend(float(a) for a in adv)
            rollouts.extend(g)
            fused = g[0].version == self.version
            tolerances.extend(self.tolerance(r.sampler) if fused else None for r in g)
        stats: dict[str, Any] = {}
        if rollouts:
            stats = await trio.to_thread.run_sync(self.learner.train, rollouts, advantages,
                                                  GrpoLoss.of(spec), spec.temperature,
                                                  tolerances)
        deviations = stats.pop("deviations", None)
        if deviations is not None:
            checks = [((r,), [d]) for r, d in zip(rollouts, deviations, strict=True)
                      if d is not None]
            liars, worst = judge_deviations(checks, self.tolerance)
            if not stats.pop("stepped", True):
                self.progress.train_s += time.monotonic() - t0
                self.progress.refused_steps += 1
                if not self._caught(groups, liars, worst):  # our bug: it must say whose
                    raise RuntimeError("the learner refused the step, yet no rollout of "
                                       "it is over its tolerance")
                return None
            if worst:
                self.progress.last["verify_max_dev"] = round(max(worst.values()), 6)
        taken = self.buffer.take_ids(gids, self.version)
        assert taken is not None  # waiting, admissible and checked: nothing took them since
        for g in groups:
            slot = _slot(g[0].group_id)
            self.waiting.pop(slot, None)
            self.sampler_of.pop(g[0].group_id, None)
            if self.scecs is not None:  # verified (an honest sampler's), degenerate or not
                self.scecs.offer(self.problem(slot), self.seed(slot), g)
        train_s = time.monotonic() - t0
        trained_at = self.version
        self.version += 1
        self.slots.advance()
        self._forget_trained()
        step = self.slots.step
        t1 = time.monotonic()
        saved = await self.checkpoint_if_due(step)
        await self.publish(self.version, self.learner)
        sync_s = time.monotonic() - t1
        p = self.progress
        p.train_s += train_s
        p.sync_s += sync_s
        p.skipped_groups += skipped
        scores = [r.reward or 0.0 for g in groups for r in g]
        p.samples += len(scores)
        p.step, p.version = step, self.version
        line = {"step": step, "version": self.version, "time": round(time.time(), 3),
                "elapsed_s": round(time.time() - p.started, 3),
                "reward": round(sum(scores) / len(scores), 4),
                "staleness": round(sum(trained_at - g[0].version for g in groups)
                                   / len(groups), 3),
                "skipped_groups": skipped, "train_s": round(train_s, 3),
                "sync_s": round(sync_s, 3), "wait_s": round(waited_s, 3),
                "verify_s": round(self._step_verify_s, 3),
                **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in stats.items()}}
        p.last.update(line)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.emit("rl.step", **line)
        self._wake()
        return saved

    def _forget_trained(self) -> None:
        """Let go of what is kept by slot for the slots now trained: the step cannot
        have moved past a slot still out, and a trained slot is never handed out again
        (slots.py), so nothing asks for them (a resume starts at its step, afresh)."""
        first = self.slots.current().start
        for by_slot in (self._problems, self._prompt_ids, self.attempts):
            for slot in [s for s in by_slot if s < first]:
                del by_slot[slot]

    def release(self) -> None:
        """The run has ended: let go of what only training needs (the policy, whose
        learner holds the model, its optimiser state and the reference model; the
        callbacks that hold the policy; what is kept by slot), keeping the counts that
        to_json and /metrics read."""
        self.stopping = True
        self.learner = None
        self.publish = self.checkpoint = _ended
        self.sample = _ended
        self.tokenize = self.detokenize = _ended
        self.waiting.clear()
        self.attempts.clear()
        self.sampler_of.clear()
        self.orders.clear()
        self._problems.clear()
        self._prompt_ids.clear()

    async def checkpoint_if_due(self, step: int) -> int:
        if step % self.spec.checkpoint_every == 0 or step >= self.spec.steps:
            await self.checkpoint(step, self.version, self.state())
            return step
        return -1

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the weights: the accounting, so that a
        resumed run's counts and staleness histogram go on from where they were."""
        p = self.progress
        return {"buffer": self.buffer.to_json(), "refused": dict(p.refused),
                "samples": p.samples, "skipped_groups": p.skipped_groups,
                "train_s": p.train_s, "sync_s": p.sync_s, "trainer_idle_s": p.trainer_idle_s,
                "verify_s": p.verify_s, "refused_steps": p.refused_steps,
                "elapsed_s": time.time() - p.started,
                "spec": self.spec.to_json(),
                **({} if self.scecs is None else {"memory_scecs": self.scecs.state()})}

    def to_json(self) -> dict[str, Any]:
        out = self.progress.to_json()
        b = self.buffer
        refused = Counter(b.refused)
        refused.update(self.progress.refused)
        g = self.spec.group  # counts are kept in groups; shown in rollouts
        out.update(admitted=b.admitted * g, waiting=b.waiting * g,
                   refused={k: v * g for k, v in sorted(refused.items())},
                   staleness={str(k): v * g for k, v in sorted(b.staleness_histogram.items())},
                   samplers=self.pool.found(), dropped=dict(self.pool.dropped))
        if self.scecs is not None:
            out["memory_scecs"] = self.scecs.to_json()
        return out


def _ended(*_args: Any) -> Any:
    raise RuntimeError("the run has ended: its trainer holds no policy")


def _slot(group_id: str) -> int:
    return int(group_id.split(".", 1)[0])
