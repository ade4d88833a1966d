"""The rollout sampler as a service: `/peerd/rollout/1.0.0` on a peer holding the whole
model (policy.py), or the head and a slice of the layers (pipeline_policy.py: the
rest on other `--rollout` peers).

For each RolloutRequest (checked strictly first) it tokenizes every prompt with the
model's chat template (add_generation_prompt=True), generates the group's G
completions per prompt with the local policy (policy.py) at ONE version for the whole
request, and answers each completion signed. A request names the oldest version it
takes: a sampler behind it first catches up (`catch_up`: the weights service's pull,
wired by the daemon, follow.py), else refuses with code BEHIND naming both versions.
Once it has taken a run's version it serves that run only (OTHER_RUN for another)
until that run has been quiet for RUN_IDLE_S; then it goes back to version 0 for the
next.
`produce` + `push_rollouts` (rollouts.py) are the async push; a pushed order is made
within `order_timeout_s` (ROLLOUT.timeout_s: what a requested batch gets), else it is
dropped and the turn goes to the next request.

The compute is the whole CPU, so one request generates at a time; up to `max_queued`
more wait their turn, and beyond that a request is refused "busy" (not an offence).
A refusal for a prompt our tokenizer makes too long is not one either: the trainer
cannot know our token counts.

It advertises FEATURE_ROLLOUT in our ledger entry, and its status gives the version,
requests served, rollouts produced and the seconds it sat idle.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd.node import Node
from peerd.rl.policy import Completion, Generation, LocalPolicy
from peerd.rl.rollouts import push_rollouts, sign_rollout
from peerd.rpc import Busy, stream_handler
from peerd.service import EntryFields, Service
from protocols.codec import packb
from protocols.errors import PeerError
from protocols.rollout import (
    BEHIND,
    FEATURE_ROLLOUT,
    MAX_PROMPT_TOKENS,
    OTHER_RUN,
    ROLLOUT,
    TEXT_CHARS_PER_TOKEN,
    RolloutBatch,
    RolloutMsg,
    RolloutRequest,
    SignedRollout,
    behind_message,
    prompt_seed,
)

if TYPE_CHECKING:
    from peerd.inference.runtime import ModelRuntime

log = logging.getLogger(__name__)

MAX_QUEUED = 4  # requests waiting behind the one generating
RUN_IDLE_S = 30.0  # a run that has not asked for this long may be left for another


class WrongVersion(Busy):
    """Behind the version a request wants and unable to catch up: no offence."""

    def __init__(self, have: int, want: int) -> None:
        super().__init__(behind_message(have, want), reason=BEHIND)


class OtherRun(Busy):
    reason = OTHER_RUN


class SamplingPolicy(Protocol):
    """What the sampler needs of a policy (LocalPolicy, PipelinePolicy)."""

    @property
    def model_id(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def block(self) -> Any: ...  # its config gives the positions a model takes
    async def reset(self) -> None: ...
    async def generate_many(self, prompts: Sequence[Sequence[int]], *, n: int,
                            temperature: float, top_p: float, max_tokens: int, seed: int,
                            eos_ids: Iterable[int], at_version: int | None = None,
                            seeds: Sequence[int] = ()) -> Generation: ...


CatchUp = Callable[[str, int, str], Awaitable[None]]  # (run id, version, trainer peer):
# pull `version` (or newer) of the run and apply it to the policy


class TooLong(Busy):
    """A prompt our tokenizer makes longer than we take: the trainer could not know."""

    reason = "too_long"


class RolloutSampler(Service):
    name = "rollout"

    def __init__(self, node: Node, policy: SamplingPolicy, tokenizer: Any,
                 eos_ids: Iterable[int], *, max_queued: int = MAX_QUEUED,
                 catch_up: CatchUp | None = None,
                 on_switch: Callable[[], None] | None = None,
                 take_up: Callable[[str, str], None] | None = None,
                 features: tuple[str, ...] = (),
                 order_timeout_s: float = ROLLOUT.timeout_s) -> None:
        self.node = node
        # a pushed order is made within what a requested batch is given (the trainer has
        # gone elsewhere by then): a slow route cannot hold `_turn` from the next
        self.order_timeout_s = order_timeout_s
        self.catch_up = catch_up
        self.take_up = take_up  # (run id, trainer): a request of that run is being served
        self.features = (FEATURE_ROLLOUT, *features)
        self.on_switch = on_switch  # the policy went back to version 0 for another run
        self.run_id: str | None = None  # the run whose versions the policy follows
        self.trainer: str | None = None  # the peer that asked for it last
        self._last_request = time.monotonic()  # of the run we follow
        self.policy = policy
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_queued = max_queued
        self.max_positions = int(getattr(policy.block.config, "max_position_embeddings", 0)
                                 or 1 << 30)
        self._turn = trio.Lock()  # one request generates at a time
        self._waiting = 0  # requests in hand: generating, queued or being tokenized
        self.requests_served = 0
        self.rollouts_produced = 0
        self._idle_s = 0.0  # seconds with no request generating, before _idle_since
        self._idle_since: float | None = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self._orders = 0  # pushed orders taken and not yet pushed

    @classmethod
    def from_runtime(cls, node: Node, runtime: ModelRuntime, **kw: Any) -> RolloutSampler:
        """The sampler of a peer's loaded model (it must hold all the layers)."""
        return cls(node, LocalPolicy.from_runtime(runtime), runtime.tokenizer,
                   runtime.generator.eos_ids, **kw)

    # ---- the service --------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery  # pushed orders generate here
            self.node.set_stream_handler(ROLLOUT.id, stream_handler(ROLLOUT, self._serve,
                                                                    self.node.offence))
            task_status.started()
            await trio.sleep_forever()

    def entry_fields(self) -> EntryFields:
        return {"features": self.features}

    def status(self) -> dict[str, Any]:
        return {"rollout": {"model": self.policy.model_id, "version": self.policy.version,
                            "requests_served": self.requests_served,
                            "rollouts_produced": self.rollouts_produced,
                            "in_hand": self._waiting, "idle_s": round(self.idle_s(), 3)}}

    def idle_s(self) -> float:
        """Seconds since the service was built that no request was generating."""
        now = time.monotonic()
        return self._idle_s + (now - self._idle_since if self._idle_since is not None else 0.0)

    # ---- serving ------------------------------------------------------------------------

    async def _serve(self, peer: str, request: RolloutRequest) -> RolloutBatch:
        request.check()
        if request.push:  # an order: checked and caught up now, made and pushed later
            if self._waiting + self._orders > self.max_queued:
                raise Busy(f"this sampler has {self._waiting + self._orders} rollout "
                           "requests in hand")
            await self._ready_for(request, peer)
            assert self._nursery is not None
            self._orders += 1
            self._nursery.start_soon(self._push, peer, request)
            return RolloutBatch(rollouts=())
        rollouts = await self.produce(request, peer)
        self.requests_served += 1
        self.node.events.publish("rollout.served", requester=peer, run_id=request.run_id,
                                 version=self.policy.version, rollouts=len(rollouts))
        return RolloutBatch(rollouts=tuple(rollouts))

    async def _push(self, peer: str, request: RolloutRequest) -> None:
        try:
            with trio.fail_after(self.order_timeout_s):
                signed = await self.produce(request, peer)
            ack = await push_rollouts(self.node, peer, request.run_id, signed)
        except Exception as exc:  # the trainer's order times out and goes elsewhere
            log.warning("pushed order for %s failed: %s", request.run_id, exc)
            self.node.events.publish("rollout.push_failed", trainer=peer,
                                     run_id=request.run_id, error=str(exc)[:300])
            return
        finally:
            self._orders -= 1
        self.requests_served += 1
        self.node.events.publish("rollout.pushed", trainer=peer, run_id=request.run_id,
                                 admitted=ack.admitted, refused=ack.refused)

    async def _ready_for(self, request: RolloutRequest, peer: str) -> None:
        """This run's policy at the version asked for or newer (switching runs and
        catching up if need be), or Busy saying why not."""
        if self.run_id not in (None, request.run_id):
            await self._switch(request.run_id, peer)
        self._last_request = time.monotonic()
        self.run_id, self.trainer = request.run_id, peer
        if self.take_up is not None:
            self.take_up(request.run_id, peer)
        if self.policy.version < request.version:
            if self.catch_up is None:
                raise WrongVersion(self.policy.version, request.version)
            try:
                await self.catch_up(request.run_id, request.version, peer)
            except Exception as exc:
                log.warning("could not catch up to version %d of %s: %s",
                            request.version, request.run_id, exc)
                raise WrongVersion(self.policy.version, request.version) from None

    async def produce(self, request: RolloutRequest, peer: str = "") -> list[SignedRollout]:
        """The request's rollouts, signed: prompt by prompt, G each, in order. Raises
        Busy ("busy", BEHIND, OTHER_RUN, "too_long") when it cannot. `peer`: who asks
        (the trainer, from whom a version may be pulled)."""
        if self._waiting > self.max_queued:  # one generating, max_queued waiting
            raise Busy(f"this sampler has {self._waiting} rollout requests in hand")
        self._waiting += 1
        try:
            await self._ready_for(request, peer)
            prompts = await trio.to_thread.run_sync(self._tokenize, request.prompts)
            for ids in prompts:
                if len(ids) > MAX_PROMPT_TOKENS or len(ids) + request.max_tokens > \
                        self.max_positions:
                    raise TooLong(f"a prompt of {len(ids)} tokens and {request.max_tokens} "
                                  f"new ones; this sampler takes {MAX_PROMPT_TOKENS} and "
                                  f"{self.max_positions} positions in all")
            async with self._turn:
                self._busy()
                try:
                    generation = await self.policy.generate_many(
                        prompts, n=request.group, temperature=request.temperature,
                        top_p=request.top_p, max_tokens=request.max_tokens,
                        seed=request.seed, seeds=request.seeds, eos_ids=self.eos_ids)
                finally:
                    self._idle()
            texts = await trio.to_thread.run_sync(self._decode, generation.groups)
            return self._sign(request, prompts, generation.version, generation.groups, texts)
        finally:
            self._waiting -= 1

    async def _switch(self, run_id: str, peer: str) -> None:
        """Take up another run, from version 0: at once when the trainer of the one we
        follow asks (a trainer runs one run at a time: its last one ended), else once
        ours has not asked for RUN_IDLE_S (it ended, or its trainer is gone); until
        then, OTHER_RUN."""
        idle = time.monotonic() - self._last_request
        if self.policy.version and idle < RUN_IDLE_S and not (peer and peer == self.trainer):
            raise OtherRun(f"this sampler's policy follows run {self.run_id!r}, which asked "
                           f"{idle:.0f} s ago; it takes another run after {RUN_IDLE_S:.0f} "
                           "s without a request")
        async with self._turn:  # no generation of the old run may be running
            await self.policy.reset()
            self.run_id = None
            if self.on_switch is not None:
                self.on_switch()
        self.node.events.publish("rollout.switched", run_id=run_id)

    def _busy(self) -> None:
        if self._idle_since is not None:
            self._idle_s += time.monotonic() - self._idle_since
            self._idle_since = None

    def _idle(self) -> None:
        self._idle_since = time.monotonic()

    def _tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        return [chat_prompt_ids(self.tokenizer, prompt) for prompt in prompts]

    def _decode(self, groups: list[list[Completion]]) -> list[list[str]]:
        return [[str(self.tokenizer.decode(list(c.ids), skip_special_tokens=True))
                 for c in group] for group in groups]

    def _sign(self, request: RolloutRequest, prompts: list[list[int]], version: int,
              groups: list[list[Completion]], texts: list[list[str]]) -> list[SignedRollout]:
        me = self.node.peer_id
        key = self.node.key_pair.private_key
        out = []
        for p, (ids, group) in enumerate(zip(prompts, groups, strict=True)):
            seed = prompt_seed(request, p)
            group_id = group_id_of(request.run_id, me, seed, version, p, ids)
            for g, completion in enumerate(group):
                text = texts[p][g][:TEXT_CHARS_PER_TOKEN * len(completion.ids)]
                msg = RolloutMsg(run_id=request.run_id, seed=seed, prompt_index=p,
                                 index=g, group_id=group_id, prompt_ids=tuple(ids),
                                 completion_ids=completion.ids,
                                 behaviour_logprobs=completion.logprobs, version=version,
                                 sampler=me, text=text)
                try:
                    msg.check()
                except PeerError as exc:  # ours: our bug, not the requester's offence
                    raise RuntimeError(f"we made a rollout that does not check: {exc}") \
                        from None
                out.append(sign_rollout(msg, key))
        self.rollouts_produced += len(out)
        return out


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A user message as the model's chat template puts it, ready for the answer: the
    prompt ids of a rollout (the trainer checks a sampler's against its own)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return [int(i) for i in tokenizer(text, add_special_tokens=False).input_ids]


def group_id_of(run_id: str, sampler: str, seed: int, version: int, prompt_index: int,
                prompt_ids: Sequence[int]) -> str:
    """The same for a prompt's G completions; the same again only for the same run,
    sampler, seed, version and prompt (which give the same tokens: a duplicate)."""
    key = packb([run_id, sampler, seed, version, prompt_index, list(prompt_ids)])
    return hashlib.sha256(key).hexdigest()[:32]
