"""`/peerd/shard-progress/1.0.0` (`SHARD_PROGRESS`): where a shard session stopped.

A chain that stalls (no RESULT by the step's deadline, no refusal, every hop answering
pings) or breaks with no word is asked where: a request from the entry to each hop,
answered with how far the session got there (the last step taken in, the last passed
on whole, whether it is passing one on now that its next hop does not take) and the
FAILED it sent for the session, if any. A hop answers for a session only to its
entry, and for the last PROGRESS_KEPT sessions that ended there too. The entry finds
where the step stopped (peerd/inference/swarm/stalls.py): a hop that holds it, or two
hops whose words disagree; a hop that does not answer is where it stopped. So a hop
can no longer stall sessions unblamed, nor swallow a refusal.

A second protocol beside the shard's session streams (protocols/shard.py): its own
module, as that one says.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.codec import Message
from protocols.errors import WireError
from protocols.shard import MAX_SESSION_CHARS, SHARD, Failed
from protocols.spec import RequestResponse


@dataclass(frozen=True, slots=True)
class Progress(Message):
    """The entry asks a hop of its session how far the session got there."""

    KIND = "shard.progress"
    session: str


@dataclass(frozen=True, slots=True)
class ProgressReply(Message):
    """How far session `session` got at the hop that answers, in its words. Steps are
    counted as the entry numbers them: 0 is the OPEN, n >= 1 the FORWARD of step n (the
    last hop passes a step on as its RESULT, the OPEN as its return stream)."""

    KIND = "shard.progress.reply"
    OPTIONAL = frozenset({"failed"})
    session: str
    received: int  # the last step this hop took in (-1: it never had the session)
    passed: int  # the last step it passed on whole to its next hop (-1: none)
    # it is passing `received` on now and its next hop does not take it (the dial, or a
    # write that waits on the next hop to read)
    passing: bool
    # the refusal or report this hop sent for the session (its own, or one it relayed
    # up the chain as it came): a chain that swallowed it does not keep it from the entry
    failed: Failed | None = None

    def check(self) -> None:
        """WireError unless its counts could be true of one hop: -1 <= passed <=
        received (nobody passes on what it did not take in)."""
        if not -1 <= self.passed <= self.received < 2**63:
            raise WireError(f"progress of {self.received} steps taken in, {self.passed} "
                            "passed on")
        if len(self.session) > MAX_SESSION_CHARS:
            raise WireError(f"progress of a session id of {len(self.session)} characters")
        if self.failed is not None:
            self.failed.check()


SHARD_PROGRESS = RequestResponse(
    id="/peerd/shard-progress/1.0.0",
    request=Progress,
    response=ProgressReply,
    max_request_bytes=1024,
    max_response_bytes=SHARD.max_control_bytes,  # a FAILED is a control frame
    timeout_s=5.0,
    max_concurrent=64,
    max_concurrent_per_peer=8,
)
PROGRESS_KEPT = 1024  # ended sessions a hop still answers for, the latest
# (peers that answer it list protocols.shard.FEATURE_SESSIONS, which is its id)
