"""Symphony's task protocol on the wire: `/peerd/task/1.0.0`.

The requester sends an elected worker a `TaskRequest`: the question, the answer
format, the sampling it wants from this worker (temperatures and seeds differ across
workers, so their chains of thought differ), a token budget and a deadline. The
worker solves it with a chain-of-thought prompt and replies with a `SignedAnswer`:
the canonical bytes of an `Answer` (final answer, chain of thought, confidence)
signed by the worker. The answer names the task and the requester, so it cannot be
replayed onto another task or to another requester.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocols.beacon import ANSWER_FORMATS, MAX_DEADLINE_S, MAX_TASK_ID_CHARS
from protocols.codec import Message
from protocols.errors import PeerError, WireError
from protocols.spec import RequestResponse

MAX_QUESTION_CHARS = 16_000
MAX_COT_CHARS = 16_000  # a chain of thought longer than this is refused
MAX_ANSWER_CHARS = 1_000
MAX_TASK_TOKENS = 2048
MAX_PROMPT_SETS = 64
MAX_ANSWER_FRAME_BYTES = 96 * 1024  # the signed answer, whatever its characters
# listed in a worker's ledger entry (LedgerEntry.features) when it takes TaskRequest.prompt
FEATURE_PROMPT_SETS = "task.prompt"
FEATURES = (FEATURE_PROMPT_SETS,)


class OversizedAnswer(PeerError):
    reason = "oversized"


@dataclass(frozen=True, slots=True)
class TaskRequest(Message):
    KIND = "task.req"
    task_id: str
    question: str
    answer_format: str
    temperature: float  # 0: greedy
    seed: int
    max_tokens: int
    deadline_s: float  # the worker stops and fails after this long
    # which of the worker's worked-example sets to prompt with (the requester asks seat
    # i for set i; the worker takes it modulo the sets it has): chains from different
    # examples differ without sampling's loss of accuracy. Added after 1.0.0 shipped:
    # sent (non-zero) only to workers whose ledger entry lists FEATURE_PROMPT_SETS.
    prompt: int = 0
    OPTIONAL = frozenset({"prompt"})

    def check(self) -> None:
        if not 0 < len(self.task_id) <= MAX_TASK_ID_CHARS:
            raise WireError("task id is empty or too long")
        if not 0 < len(self.question) <= MAX_QUESTION_CHARS:
            raise WireError(f"question of {len(self.question)} characters "
                            f"(1..{MAX_QUESTION_CHARS})")
        if self.answer_format not in ANSWER_FORMATS:
            raise WireError(f"answer format {self.answer_format!r:.40} unknown")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise WireError(f"temperature {self.temperature} outside [0, 2]")
        if not 0 <= self.seed < 2**63:
            raise WireError("seed out of range")
        if not 1 <= self.max_tokens <= MAX_TASK_TOKENS:
            raise WireError(f"max_tokens {self.max_tokens} outside 1..{MAX_TASK_TOKENS}")
        if not (math.isfinite(self.deadline_s) and 0 < self.deadline_s <= MAX_DEADLINE_S):
            raise WireError(f"deadline {self.deadline_s} s outside (0, {MAX_DEADLINE_S}]")
        if not 0 <= self.prompt < MAX_PROMPT_SETS:
            raise WireError(f"prompt set {self.prompt} outside 0..{MAX_PROMPT_SETS - 1}")


@dataclass(frozen=True, slots=True)
class Answer(Message):
    """A worker's answer to one task. Signed by `worker` (see SignedAnswer)."""

    KIND = "task.answer"
    task_id: str
    requester: str
    worker: str
    answer: str  # the final answer as the worker extracted it ("" if none)
    cot: str  # the chain of thought
    confidence: float  # the worker's own, in [0, 1]: a claim, weighed as one
    tokens: int = 0
    elapsed_s: float = 0.0

    def check(self) -> None:
        if len(self.cot) > MAX_COT_CHARS:
            raise OversizedAnswer(f"chain of thought of {len(self.cot)} characters "
                                  f"(at most {MAX_COT_CHARS})")
        if len(self.answer) > MAX_ANSWER_CHARS:
            raise OversizedAnswer(f"answer of {len(self.answer)} characters "
                                  f"(at most {MAX_ANSWER_CHARS})")
        if not (math.isfinite(self.confidence) and 0.0 <= self.confidence <= 1.0):
            raise WireError(f"confidence {self.confidence} outside [0, 1]")
        if not 0 <= self.tokens <= 1 << 20 or not math.isfinite(self.elapsed_s):
            raise WireError("tokens or elapsed_s out of range")


@dataclass(frozen=True, slots=True)
class SignedAnswer(Message):
    KIND = "task.answer.signed"
    body: bytes  # canonical msgpack of an Answer
    sig: bytes  # the worker's ed25519 signature over body


TASK = RequestResponse(
    id="/peerd/task/1.0.0",
    request=TaskRequest,
    response=SignedAnswer,
    max_request_bytes=4 * MAX_QUESTION_CHARS + 1024,  # UTF-8: up to 4 bytes a character
    max_response_bytes=MAX_ANSWER_FRAME_BYTES,
    timeout_s=MAX_DEADLINE_S + 30.0,  # the requester's own deadline is usually far shorter
    max_concurrent=16,
    max_concurrent_per_peer=4,
)
