"""Farmed replays on the wire: `/peerd/memory/replay/1.0.0` (docs/sedm.md, "Farmed
replays").

A peer that judges a memory candidate without replaying it itself (it serves no
model, or is told to farm) sends a `ReplayJob` to peers that serve the model wanted
and list FEATURE_REPLAY in their ledger entry: the candidate's text, up to
MAX_JOB_SCECS tasks as their canonical SCEC bytes, and for each the memory the
requester's controller gives it now (the A arm). The replaying peer runs both arms of
each task greedily as the local judge does (peerd/memory/admission.py) and answers a
`SignedReplayResult`: the canonical bytes of a `ReplayResult` (per task: its SCEC
hash, and for each arm the sha256 of the greedy output, its score and prompt tokens)
signed by the replaying peer. The result names the job, the requester and the
replaying peer, so it cannot be replayed onto another job or to another requester.

A protocol of its own, not new kinds on `/peerd/memory/1.0.0`: its limits differ (a
job is up to a few MiB and runs a model for minutes; a fetch is small and answered
from SQLite at once), a declaration carries one set of limits, and only peers serving
a model serve it. A peer that does not know it refuses the protocol at negotiation,
where a new kind on the memory protocol would be an offence by its strict decoding.

A result is a response checked at once, never kept or re-served: it decodes strictly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from protocols.codec import Message
from protocols.errors import WireError
from protocols.memory import (
    MAX_MODEL_CHARS,
    MAX_PEER_ID_CHARS,
    MAX_SCEC_ITEMS,
    MAX_SCEC_TOKENS,
    MAX_SIGNATURE_BYTES,
    MAX_TEXT_CHARS,
    MAX_VERSION_CHARS,
    SCEC_HASH,
)
from protocols.spec import RequestResponse

FEATURE_REPLAY = "memory.replay"  # in LedgerEntry.features of a peer serving replays
MAX_JOB_SCECS = 4  # the tasks of one admission (peerd/memory/admissions.py)
MAX_JOB_ID_CHARS = 64
JOB_ID = re.compile(r"[0-9a-zA-Z_-]{1,64}")
# One SCEC's canonical bytes: its fields' character bounds (protocols/memory.py) in
# UTF-8 at worst come to about 440 KiB.
MAX_SCEC_BYTES = 512 * 1024
MAX_JOB_BYTES = MAX_JOB_SCECS * (MAX_SCEC_BYTES + MAX_SCEC_ITEMS * MAX_TEXT_CHARS * 4) \
    + MAX_TEXT_CHARS * 4 + 4_096
MAX_RESULT_BYTES = 16 * 1024
SHA256 = SCEC_HASH  # 64 hex digits
MAX_PROMPT_TOKENS = 16 * MAX_SCEC_TOKENS  # as an SCEC's


@dataclass(frozen=True, slots=True)
class ReplayJob(Message):
    """Replay each task without and with `candidate`. `given[i]`: the item texts the
    requester's controller gives task i now, in prompt order (the A arm; B is the
    candidate first, then those)."""

    KIND = "memory.replay.job"
    job_id: str
    model: str  # the model id wanted: a peer serving another refuses
    candidate: str
    scecs: tuple[bytes, ...]  # canonical SCEC bytes (peerd/memory/scec.py decodes them)
    given: tuple[tuple[str, ...], ...]  # one per SCEC

    def check(self) -> None:
        if not JOB_ID.fullmatch(self.job_id):
            raise WireError(f"job id {self.job_id!r:.80}: 1-64 of 0-9 a-z A-Z _ -")
        if not 0 < len(self.model) <= MAX_MODEL_CHARS:
            raise WireError("job model empty or too long")
        if not self.candidate.strip():
            raise WireError("job candidate empty")
        if len(self.candidate) > MAX_TEXT_CHARS:
            raise WireError(f"job candidate of {len(self.candidate)} characters (at most "
                            f"{MAX_TEXT_CHARS})", reason="oversized")
        if not 1 <= len(self.scecs) <= MAX_JOB_SCECS:
            raise WireError(f"a job of {len(self.scecs)} tasks (1..{MAX_JOB_SCECS})",
                            reason="oversized" if self.scecs else "malformed")
        if len(set(self.scecs)) != len(self.scecs):
            raise WireError("a job names a task twice")
        if any(len(s) > MAX_SCEC_BYTES for s in self.scecs):
            raise WireError(f"a job task over {MAX_SCEC_BYTES} bytes", reason="oversized")
        if len(self.given) != len(self.scecs):
            raise WireError(f"a job gives memory for {len(self.given)} of its "
                            f"{len(self.scecs)} tasks")
        for texts in self.given:
            if len(texts) > MAX_SCEC_ITEMS:
                raise WireError(f"a task given {len(texts)} items (at most "
                                f"{MAX_SCEC_ITEMS})", reason="oversized")
            if any(not t.strip() or len(t) > MAX_TEXT_CHARS for t in texts):
                raise WireError(f"a given item empty or over {MAX_TEXT_CHARS} characters")


@dataclass(frozen=True, slots=True)
class ArmReplay(Message):
    """One arm of one task as it ran: what a second run must reproduce."""

    output_sha256: str  # of the greedy output's UTF-8 bytes
    score: float  # the task's scorer on that output, in [0, 1]
    prompt_tokens: int  # memory and chat template included

    def check(self) -> None:
        if not SHA256.fullmatch(self.output_sha256):
            raise WireError("arm output hash is not 64 hex digits")
        if not (math.isfinite(self.score) and 0.0 <= self.score <= 1.0):
            raise WireError("arm score not in [0, 1]")
        if not 0 <= self.prompt_tokens <= MAX_PROMPT_TOKENS:
            raise WireError(f"arm prompt tokens {self.prompt_tokens} out of bounds")


@dataclass(frozen=True, slots=True)
class ScecReplay(Message):
    """One task, both arms: A (`without` the candidate) and B (`with_item`)."""

    scec: str  # the SCEC's hash
    without: ArmReplay
    with_item: ArmReplay

    def check(self) -> None:
        if not SCEC_HASH.fullmatch(self.scec):
            raise WireError("replayed task is not named by an SCEC hash")
        self.without.check()
        self.with_item.check()


@dataclass(frozen=True, slots=True)
class ReplayResult(Message):
    """What a replaying peer ran, signed by it (SignedReplayResult)."""

    KIND = "memory.replay.result"
    job_id: str
    requester: str  # whose job this answers
    replayer: str  # the signer
    model: str
    version: str  # the model's (policy) version; "" for the base model
    tasks: tuple[ScecReplay, ...]  # in the job's order

    def check(self) -> None:
        if not JOB_ID.fullmatch(self.job_id):
            raise WireError("result job id malformed")
        for who in (self.requester, self.replayer):
            if not 0 < len(who) <= MAX_PEER_ID_CHARS:
                raise WireError("result peer id empty or too long")
        if not 0 < len(self.model) <= MAX_MODEL_CHARS or \
                len(self.version) > MAX_VERSION_CHARS:
            raise WireError("result model or version empty or too long")
        if not 1 <= len(self.tasks) <= MAX_JOB_SCECS:
            raise WireError(f"a result of {len(self.tasks)} tasks (1..{MAX_JOB_SCECS})")
        for task in self.tasks:
            task.check()


@dataclass(frozen=True, slots=True)
class SignedReplayResult(Message):
    KIND = "memory.replay.signed"
    body: bytes  # canonical msgpack of a ReplayResult
    sig: bytes  # the replaying peer's ed25519 signature over body

    def check(self) -> None:
        if len(self.body) > MAX_RESULT_BYTES or len(self.sig) > MAX_SIGNATURE_BYTES:
            raise WireError(f"a signed result of {len(self.body)} + {len(self.sig)} bytes",
                            reason="oversized")


REPLAY = RequestResponse(
    id="/peerd/memory/replay/1.0.0",
    request=ReplayJob,
    response=SignedReplayResult,
    max_request_bytes=MAX_JOB_BYTES,
    max_response_bytes=MAX_RESULT_BYTES + 1_024,
    # 2 x 4 greedy runs of up to max_tokens each; the replaying peer gives up (and says
    # so) REPLAY_MARGIN_S before this, so that a slow model is never the requester's
    # offence
    timeout_s=300.0,
    max_concurrent=2,  # jobs at once on one peer: each holds its model for minutes
    max_concurrent_per_peer=1,
)
REPLAY_MARGIN_S = 10.0
