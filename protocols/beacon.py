"""Symphony's beacon round on the wire: the gossip topic for beacons, the bid protocol.

A requester announces a task as a `Beacon` on gossip topic `peerd/beacon/1`: task id,
requirement (free text matched against skills), workers wanted, answer format, when
it was issued, how long it collects bids and how long each worker has to answer.
Pubsub's strict signing authenticates the publisher, and `requester` must be that
publisher. The question itself does not travel on gossip: only elected workers get
it, over `/peerd/task/1.0.0` (protocols/task.py).

A peer that wants the task answers over a direct stream, `/peerd/bid/1.0.0`, with a
`SignedBid`: the canonical bytes of a `Bid` (match score in [0, 1], load, expected
latency) and the bidder's signature over them. The requester keeps bids as evidence
and shows them to its user, so a bid is signed like a ledger entry, not only carried
over an authenticated stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocols.codec import Message
from protocols.errors import PeerError
from protocols.spec import RequestResponse

TOPIC = "peerd/beacon/1"

ANSWER_FORMATS = ("number", "choice", "text")
MAX_WORKERS = 16
MAX_DEADLINE_S = 600.0  # one worker's time to answer
MAX_BID_WINDOW_S = 10.0
MAX_REQUIREMENT_CHARS = 2000
MAX_TASK_ID_CHARS = 64
MAX_BEACON_BYTES = 8 * 1024
MAX_CLOCK_SKEW_S = 60.0  # a beacon dated further in the future is refused
MAX_BEACON_AGE_S = 60.0  # a beacon issued longer ago than this is a replay
MAX_EXPECTED_LATENCY_S = 24 * 3600.0
MAX_LOAD = 1_000_000


class BadBeacon(PeerError):
    """A beacon whose values no honest requester sends (absurd counts or deadlines)."""

    reason = "bad_beacon"


class StaleBeacon(PeerError):
    reason = "stale_beacon"


@dataclass(frozen=True, slots=True)
class Beacon(Message):
    """A task looking for workers. Gossip: decoded strictly, checked with `check`."""

    KIND = "beacon"
    task_id: str
    requester: str  # peer id; must be the pubsub publisher
    requirement: str  # matched against the skills peers advertise
    workers: int  # how many workers the requester will elect
    answer_format: str  # "number" | "choice" | "text"
    issued_at: float  # unix seconds
    bid_window_s: float  # bids are collected for this long after issued_at
    deadline_s: float  # each elected worker's time to answer
    min_match: float = 0.0  # peers scoring below this do not bid

    def check(self, now: float) -> None:
        """Raise BadBeacon / StaleBeacon unless every value is one an honest peer sends."""
        if not 0 < len(self.task_id) <= MAX_TASK_ID_CHARS or not self.task_id.isprintable():
            raise BadBeacon(f"task id {self.task_id!r:.80} is empty, long or unprintable")
        if not 0 < len(self.requirement) <= MAX_REQUIREMENT_CHARS:
            raise BadBeacon(f"requirement of {len(self.requirement)} characters "
                            f"(1..{MAX_REQUIREMENT_CHARS})")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise BadBeacon(f"{self.workers} workers wanted (1..{MAX_WORKERS})")
        if self.answer_format not in ANSWER_FORMATS:
            raise BadBeacon(f"answer format {self.answer_format!r:.40} not one of "
                            f"{', '.join(ANSWER_FORMATS)}")
        if not (math.isfinite(self.bid_window_s) and 0 < self.bid_window_s <= MAX_BID_WINDOW_S):
            raise BadBeacon(f"bid window of {self.bid_window_s} s (0..{MAX_BID_WINDOW_S})")
        if not (math.isfinite(self.deadline_s) and 0 < self.deadline_s <= MAX_DEADLINE_S):
            raise BadBeacon(f"deadline of {self.deadline_s} s (0..{MAX_DEADLINE_S})")
        if not (math.isfinite(self.min_match) and 0.0 <= self.min_match <= 1.0):
            raise BadBeacon(f"min_match {self.min_match} outside [0, 1]")
        if not math.isfinite(self.issued_at) or self.issued_at > now + MAX_CLOCK_SKEW_S:
            raise BadBeacon(f"beacon dated {self.issued_at - now:.0f} s in the future")
        if self.issued_at < now - MAX_BEACON_AGE_S:
            raise StaleBeacon(f"beacon issued {now - self.issued_at:.0f} s ago")


@dataclass(frozen=True, slots=True)
class Bid(Message):
    """An offer to work on one task. Signed by `bidder` (see SignedBid)."""

    KIND = "bid"
    task_id: str
    requester: str  # whose beacon this answers: a bid cannot be replayed elsewhere
    bidder: str
    match: float  # skill match in [0, 1]
    load: int  # tasks the bidder is working on or has promised
    expected_latency_s: float  # the bidder's estimate of its time to answer
    scorer: str = ""  # how `match` was computed: "minilm", "lexical", "none"

    def check(self) -> None:
        if not (math.isfinite(self.match) and 0.0 <= self.match <= 1.0):
            raise PeerError(f"bid match {self.match} outside [0, 1]", reason="malformed")
        if not 0 <= self.load <= MAX_LOAD:
            raise PeerError(f"bid load {self.load} out of range", reason="malformed")
        if not (math.isfinite(self.expected_latency_s)
                and 0.0 <= self.expected_latency_s <= MAX_EXPECTED_LATENCY_S):
            raise PeerError(f"bid latency {self.expected_latency_s} out of range",
                            reason="malformed")
        if len(self.task_id) > MAX_TASK_ID_CHARS or len(self.scorer) > 32:
            raise PeerError("bid task id or scorer too long", reason="malformed")


@dataclass(frozen=True, slots=True)
class SignedBid(Message):
    KIND = "bid.signed"
    body: bytes  # canonical msgpack of a Bid
    sig: bytes  # the bidder's ed25519 signature over body


@dataclass(frozen=True, slots=True)
class BidReply(Message):
    KIND = "bid.reply"
    accepted: bool
    reason: str = ""  # when not accepted: "closed", "duplicate", ...


BID = RequestResponse(
    id="/peerd/bid/1.0.0",
    request=SignedBid,
    response=BidReply,
    max_request_bytes=4096,
    max_response_bytes=1024,
    timeout_s=5.0,
    max_concurrent=64,
    max_concurrent_per_peer=8,
)
