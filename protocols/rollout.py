"""RL rollouts on the wire: `/peerd/rollout/1.0.0` and its push, `/peerd/rollout-push/1.0.0`.

A trainer asks a sampler (a peer serving the whole model that lists FEATURE_ROLLOUT in
its ledger entry) for rollouts with a `RolloutRequest`: user-message prompts, the
group size G, the sampling (temperature, top-p, max tokens, seed), the policy version
it wants and the mode. The sampler answers a `RolloutBatch`: for each prompt, G
completions, each a `RolloutMsg` (token ids, the per-token behaviour log-probs, the
policy version that generated it, the sampler's peer id, the decoded text) in its
canonical bytes, signed by the sampler (`SignedRollout`, as SignedAnswer in task.py):
a rollout is kept in the trainer's buffer and judged later, so it carries its author.

Versions: a request names the OLDEST policy version the trainer will take (in sync
mode its current one; in async mode the current one less the staleness bound). A
sampler that is behind pulls that version (or a newer one) from the weights service
before it generates (Echo's sequential pull); one that cannot refuses with an
ErrorReply of code BEHIND (`behind_message` says both versions; the trainer's client
reads them back with `versions_of`). Each rollout carries the version that made it,
and the trainer judges its staleness when it trains on it. A sampler follows one run
at a time: once it has taken a run's version, another run's request is refused with
OTHER_RUN until the sampler restarts.

Async push: a request with `push` set is an order: the sampler takes it (an empty
batch answers at once, after the version checks), generates, and pushes what it made
to the trainer with a `RolloutPush` on the push protocol, answered by a `PushAck`
(how many were admitted, and how many refused by reason). It is a second id, declared here beside
the request, so that one peer can be trainer and sampler at once (a stream handler is
per id) and a pushed batch never reaches a sampler's request handler.

Caps bound the work one request asks for (prompts x group x max_tokens) and so the
size of its answer; every field is checked before anything runs, and every list's
length (MAX_ITEMS) before the codec reads its items.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from protocols.codec import Message
from protocols.errors import PeerError, WireError
from protocols.spec import RequestResponse

FEATURE_ROLLOUT = "rl.rollout"  # in LedgerEntry.features of a peer serving rollouts
# ... of a peer serving rollouts through a pipeline: it holds a slice of the layers
FEATURE_PIPELINE_SAMPLER = "rl.rollout.pipeline"
# ... of a peer whose shard sessions hold an RL run's versions (protocols.shard's
# PolicyTag): a pipeline sampler routes through these only
FEATURE_ROLLOUT_SHARD = "rl.rollout.shard"
MODES = ("sync", "async")
RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_PROMPTS = 64
MAX_GROUP = 64
MAX_TOKENS = 2048  # generated per completion
MAX_PROMPT_CHARS = 8_000  # one user message
MAX_ROLLOUTS = 256  # prompts x group: completions one request (or push) carries
MAX_WORK_TOKENS = 1 << 16  # prompts x group x max_tokens: what one request may cost
MAX_PROMPT_TOKENS = 4096  # a prompt after the chat template
MAX_TOKEN_ID = 1 << 24  # beyond any vocabulary; the trainer checks its own vocab size
TEXT_CHARS_PER_TOKEN = 32  # a completion's text is at most this many characters a token
MAX_GROUP_ID_CHARS = 64
MAX_PEER_ID_CHARS = 128
MAX_SIGNATURE_BYTES = 128
MAX_ROLLOUT_BYTES = (MAX_PROMPT_TOKENS + MAX_TOKENS) * 16 + MAX_TOKENS * TEXT_CHARS_PER_TOKEN * 4
MAX_BATCH_BYTES = 16 * 2**20  # bounded by MAX_WORK_TOKENS and MAX_ROLLOUTS (see check)
MAX_REQUEST_BYTES = MAX_PROMPTS * MAX_PROMPT_CHARS * 4 + 4096  # UTF-8: <= 4 bytes a char
MAX_REASON_CHARS = 40
MAX_REASONS = 16

BEHIND = "behind"  # ErrorReply code: the sampler is at an older version than asked
AHEAD = "ahead"  # ErrorReply code: kept for peers of the first 1.0.0 (sync meant "at")
OTHER_RUN = "other_run"  # ErrorReply code: the sampler's policy follows another run


def behind_message(have: int, want: int) -> str:
    return f"this sampler is at version {have}; the request wants version {want}"


def versions_of(message: str) -> tuple[int, int] | None:
    """(have, want) from a BEHIND or AHEAD reply's message, else None."""
    m = re.fullmatch(r"this sampler is at version (\d+); the request wants version (\d+)",
                     message)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def check_run_id(run_id: str) -> None:
    if not RUN_ID.fullmatch(run_id):
        raise WireError(f"run id {run_id!r:.80} is not 1..64 of [A-Za-z0-9._-]")


def _check_version(version: int) -> None:
    if not 0 <= version < 2**63:
        raise WireError(f"version {version} out of range")


@dataclass(frozen=True, slots=True)
class RolloutRequest(Message):
    KIND = "rollout.req"
    MAX_ITEMS = {"prompts": MAX_PROMPTS, "seeds": MAX_PROMPTS}
    run_id: str
    prompts: tuple[str, ...]  # user-message texts; the sampler applies the chat template
    group: int  # G: completions per prompt
    temperature: float  # 0: greedy
    top_p: float
    max_tokens: int
    seed: int
    version: int  # the oldest policy version wanted (see the module docstring)
    mode: str  # "sync" | "async"
    # Async push-pull: the sampler answers at once with an empty batch (the order is
    # taken) and pushes the rollouts when made, on the push protocol. Added after 1.0.0.
    push: bool = False
    # One seed a prompt (added after 1.0.0): prompt i is then sampled as it would be
    # alone in a request with seed seeds[i], so how a trainer groups prompts into
    # requests changes no token. Empty: prompt i's streams come from `seed` and i.
    seeds: tuple[int, ...] = ()
    OPTIONAL = frozenset({"push", "seeds"})

    def check(self) -> None:
        check_run_id(self.run_id)
        if not 1 <= len(self.prompts) <= MAX_PROMPTS:
            raise WireError(f"{len(self.prompts)} prompts (1..{MAX_PROMPTS})")
        for i, prompt in enumerate(self.prompts):
            if not 0 < len(prompt) <= MAX_PROMPT_CHARS:
                raise WireError(f"prompt {i} of {len(prompt)} characters "
                                f"(1..{MAX_PROMPT_CHARS})")
        if not 1 <= self.group <= MAX_GROUP:
            raise WireError(f"group of {self.group} (1..{MAX_GROUP})")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise WireError(f"temperature {self.temperature} outside [0, 2]")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise WireError(f"top_p {self.top_p} outside (0, 1]")
        if not 1 <= self.max_tokens <= MAX_TOKENS:
            raise WireError(f"max_tokens {self.max_tokens} outside 1..{MAX_TOKENS}")
        if not 0 <= self.seed < 2**63:
            raise WireError("seed out of range")
        if self.seeds and len(self.seeds) != len(self.prompts):
            raise WireError(f"{len(self.seeds)} seeds for {len(self.prompts)} prompts")
        if not all(0 <= s < 2**63 for s in self.seeds):
            raise WireError("a seed out of range")
        _check_version(self.version)
        if self.mode not in MODES:
            raise WireError(f"mode {self.mode!r:.20} is not sync or async")
        if self.push and self.mode != "async":
            raise WireError("push is for async mode only")
        rollouts = len(self.prompts) * self.group
        if rollouts > MAX_ROLLOUTS:
            raise WireError(f"{len(self.prompts)} prompts x group {self.group} = {rollouts} "
                            f"completions; at most {MAX_ROLLOUTS} a request",
                            reason="oversized")
        if rollouts * self.max_tokens > MAX_WORK_TOKENS:
            raise WireError(f"{rollouts} completions x {self.max_tokens} tokens is more than "
                            f"{MAX_WORK_TOKENS} tokens of work a request", reason="oversized")


def prompt_seed(request: RolloutRequest, prompt_index: int) -> int:
    """The seed a rollout of the request's prompt `prompt_index` carries."""
    return request.seeds[prompt_index] if request.seeds else request.seed


@dataclass(frozen=True, slots=True)
class RolloutMsg(Message):
    """One completion, as its sampler signs it (see SignedRollout)."""

    KIND = "rollout"
    MAX_ITEMS = {"prompt_ids": MAX_PROMPT_TOKENS, "completion_ids": MAX_TOKENS,
                 "behaviour_logprobs": MAX_TOKENS}
    run_id: str
    seed: int  # the prompt's: the request's `seeds[prompt_index]`, else its `seed`
    prompt_index: int  # the prompt's index in its request
    index: int  # this completion's index in its group, 0..G-1
    group_id: str  # the same for the G completions of one prompt
    prompt_ids: tuple[int, ...]  # the chat-templated prompt as the sampler tokenized it
    completion_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]  # one per completion token
    version: int  # the policy version that generated every token of it
    sampler: str  # the sampler's peer id: the signer
    text: str  # the decoded completion

    def check(self) -> None:
        check_run_id(self.run_id)
        if not 0 <= self.seed < 2**63:
            raise WireError("seed out of range")
        if not (0 <= self.prompt_index < MAX_PROMPTS and 0 <= self.index < MAX_GROUP):
            raise WireError(f"prompt index {self.prompt_index} or completion index "
                            f"{self.index} out of range")
        if not 0 < len(self.group_id) <= MAX_GROUP_ID_CHARS:
            raise WireError("group id empty or too long")
        if not 0 < len(self.sampler) <= MAX_PEER_ID_CHARS:
            raise WireError("sampler id empty or too long")
        _check_version(self.version)
        if not 0 < len(self.prompt_ids) <= MAX_PROMPT_TOKENS:
            raise WireError(f"prompt of {len(self.prompt_ids)} tokens "
                            f"(1..{MAX_PROMPT_TOKENS})")
        n = len(self.completion_ids)
        if not 0 < n <= MAX_TOKENS:
            raise WireError(f"completion of {n} tokens (1..{MAX_TOKENS})")
        if len(self.behaviour_logprobs) != n:
            raise WireError(f"{len(self.behaviour_logprobs)} log-probs for {n} tokens")
        for ids in (self.prompt_ids, self.completion_ids):
            if not all(0 <= t < MAX_TOKEN_ID for t in ids):
                raise WireError("a token id out of range")
        if not all(math.isfinite(lp) and lp <= 0.0 for lp in self.behaviour_logprobs):
            raise WireError("a behaviour log-prob that is not a finite number <= 0")
        if len(self.text) > TEXT_CHARS_PER_TOKEN * n:
            raise WireError(f"text of {len(self.text)} characters for {n} tokens")


@dataclass(frozen=True, slots=True)
class SignedRollout(Message):
    KIND = "rollout.signed"
    body: bytes  # canonical msgpack of a RolloutMsg
    sig: bytes  # the sampler's ed25519 signature over body

    def check(self) -> None:
        if len(self.body) > MAX_ROLLOUT_BYTES or len(self.sig) > MAX_SIGNATURE_BYTES:
            raise WireError(f"a signed rollout of {len(self.body)} + {len(self.sig)} bytes",
                            reason="oversized")


@dataclass(frozen=True, slots=True)
class RolloutBatch(Message):
    """The answer to a RolloutRequest: G completions of each prompt."""

    KIND = "rollout.batch"
    MAX_ITEMS = {"rollouts": MAX_ROLLOUTS}
    rollouts: tuple[SignedRollout, ...]

    def check(self) -> None:
        _check_signed(self.rollouts)


@dataclass(frozen=True, slots=True)
class RolloutPush(Message):
    """Rollouts a sampler made on its own, pushed to the run's trainer."""

    KIND = "rollout.push"
    MAX_ITEMS = {"rollouts": MAX_ROLLOUTS}
    run_id: str
    rollouts: tuple[SignedRollout, ...]

    def check(self) -> None:
        check_run_id(self.run_id)
        if not self.rollouts:
            raise WireError("a push of no rollouts")
        _check_signed(self.rollouts)


@dataclass(frozen=True, slots=True)
class PushAck(Message):
    """What the trainer did with a push: admitted, and refused by reason."""

    KIND = "rollout.ack"
    MAX_ITEMS = {"refused": MAX_REASONS}
    admitted: int
    refused: dict[str, int]

    def check(self) -> None:
        if not 0 <= self.admitted <= MAX_ROLLOUTS or len(self.refused) > MAX_REASONS:
            raise WireError("an ack out of range")
        for reason, count in self.refused.items():
            if not (0 < len(reason) <= MAX_REASON_CHARS and 0 <= count <= MAX_ROLLOUTS):
                raise WireError("an ack's refusal out of range")


def _check_signed(rollouts: tuple[SignedRollout, ...]) -> None:
    if len(rollouts) > MAX_ROLLOUTS:
        raise WireError(f"{len(rollouts)} rollouts; at most {MAX_ROLLOUTS}", reason="oversized")
    for signed in rollouts:
        signed.check()


class WrongRollout(PeerError):
    """A rollout that verifies but is not what was asked for (another run, sampler,
    version, prompt or seed)."""

    reason = "wrong_rollout"


ROLLOUT = RequestResponse(
    id="/peerd/rollout/1.0.0",
    request=RolloutRequest,
    response=RolloutBatch,
    max_request_bytes=MAX_REQUEST_BYTES,
    max_response_bytes=MAX_BATCH_BYTES,
    timeout_s=900.0,  # MAX_WORK_TOKENS on a CPU; a trainer sets its own, shorter deadline
    max_concurrent=8,  # the sampler queues at most a few more (sampler.py)
    max_concurrent_per_peer=4,
)

ROLLOUT_PUSH = RequestResponse(
    id="/peerd/rollout-push/1.0.0",
    request=RolloutPush,
    response=PushAck,
    max_request_bytes=MAX_BATCH_BYTES,
    max_response_bytes=4096,
    timeout_s=60.0,
    max_concurrent=16,
    max_concurrent_per_peer=2,
)
