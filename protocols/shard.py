"""The shard pipeline on the wire: `/peerd/shard/3.0.0` and `/peerd/shard-return/3.0.0`,
declared below as `SHARD` and `SHARD_RETURN` (messages, size caps, deadlines).

A session is a chain of persistent streams: the entry peer (which holds the
embeddings and lm_head) opens a stream to the first shard with OPEN; every shard
opens the next hop's stream itself (the route travels in OPEN); the last shard
returns hidden states straight to the entry peer over `/peerd/shard-return/3.0.0`.
That is N+1 hops per step, not the 2N of a star.

Opening costs no round trip of its own (2.0.0; 1.0.0 waited for each answer): the
dialer writes OPEN and goes on at once with its FORWARDs on the same stream, so a
cold session's OPEN travels with its first FORWARD, and each hop opens its next
hop's stream (or the return stream) as soon as it has admitted the session, while
it computes. Answers come back beside the traffic, never waited for: a hop answers
OPENED once it admitted the session, or a refusal (FAILED, naming the hop at fault;
ERROR: the OPEN broke the rules) and closes; a refusal its next hop sends it, it
relays upstream as a FAILED (for an ERROR from the next hop, or no answer, a FAILED
of its own naming the next hop: one of the two is at fault) and ends the session, so
every refusal reaches the entry peer over the chain, in the words of the hop that
refused. The return stream opens with OPENED, and RESULTs follow it
without waiting for the entry's OPENED in answer; an entry that does not know the
session answers ERROR, and the chain's session ends as on a refusal (no session is
held on an entry's account that it did not open). The first hop takes an OPEN only
from the entry peer it names, a later hop only from the route's hop before it (else
ERROR, code IMPERSONATION). A FAILED is signed by the hop that says it (`by`, 3.0.0):
a hop relays one only if its signature checks, it is for the session, and its author
is a hop after this one; one that does not check is its sender's fault (this hop
refuses the session naming its next hop, malformed). A FAILED may blame only its
author or a hop beside its author on the route: the entry blames the author for one
that names anyone else, and reads a code not in CODES as OTHER. A peer of an older
version that dials a 3.0.0 one gets an ERROR of code VERSION; a 3.0.0 peer that dials
an older one is answered "na" by multistream-select and reports a FAILED of code
VERSION.

A chain that stalls, or breaks with no word, is asked where by the entry, hop by hop:
`/peerd/shard-progress/1.0.0` (protocols/shard_progress.py).

FORWARD carries the positions `start_pos .. start_pos+T-1` as a tensor [1, T, H] (one row)
and `keep`: the KV length every shard truncates its cache to before appending.
Speculative decoding rides its rollback on the next FORWARD this way, with no extra
round trip. Tensors travel as raw little-endian bytes + dtype + shape, never pickle.
Hidden states are finite: a hop refuses a FORWARD whose are not (malformed: its
sender's fault) and the entry a RESULT (the last hop's); a hop whose own compute gives
an infinity (float16 overflows) sends it no further and reports itself (FAILED,
internal). Each hop appends its compute time (`timings`, one per hop, a time it could
have measured), checked the same way.

A FORWARD may carry a token tree instead of a chain (`tree`, the parent of each of
its T positions): speculative decoding verifies several candidate continuations in
one pass. Position j then sits at rotary position start_pos + depth(j) and attends
to the whole cache, its ancestors and itself; its KV lands in cache slot
start_pos + j, so the next FORWARD's `keep` must cut the cache back to a prefix
whose slots are a chain (the entry peer's job: it orders the tree so that the
likeliest branch comes first).

An OPEN may carry `rows` > 1 (a peer that takes it lists FEATURE_ROWS in its ledger
entry): the session then decodes that many sequences side by side, all at the same
positions, every FORWARD a tensor [rows, T, H] (a chain: a token tree is one row's).
Each hop holds rows x positions of KV for it and computes the rows as one batch; an
RL pipeline sampler decodes a prompt's completions this way, each of its steps one
pass for all of them. The session's first FORWARD may carry fewer rows, with `source`:
the row of it that each session row starts from (rows sharing a prompt: each prompt
is computed once), and every hop gives session row r the KV of row source[r] once it
has computed them; the RESULT carries the FORWARD's rows. `rows` and `source` are
left off the wire when 1 and empty: what peers before them speak.

An OPEN may carry a `PolicyTag` (an RL run and a policy version: peerd/rl's pipeline
samplers): every hop must be at exactly that version of that run and keep it until
the session closes, or refuse the OPEN with a FAILED of code BEHIND (it is older: it
starts pulling), AHEAD (it is newer, or moving to a newer one), OTHER_RUN or
UNVERSIONED (it cannot serve the run); a peer whose weights follow a run refuses an
untagged OPEN (FOLLOWING). A hop that must move on while a tagged session is open
ends the session (FAILED, code REVOKED) before its weights change, so no step of a
tagged session ever runs on two versions. The tag is left off the wire when absent:
plain sessions are what peers before it speak.

Past 450 lines because it is one protocol, both streams of it: the messages, their
caps and the checks of what a FORWARD or a route may be, which every hop and the
entry apply alike; a second protocol would be a second module.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from protocols.codec import Message, encode
from protocols.errors import FrameTooLarge, UnsupportedVersion, WireError, WrongMessageType
from protocols.spec import ErrorReply, SessionStream

MAX_ROUTE_HOPS = 64
MAX_ROWS = 64  # sequences in one session (OPEN.rows)
MAX_TREE_POSITIONS = 1024  # a tree is a draft: a few dozen positions; its mask is T x T
MAX_TENSOR_RANK = 8  # hidden states are [rows, T, H]
# a hop's compute time for one step, at most: a day, longer than an entry waits for any
# step a frame can carry (step_deadline_s), so a number past it (or not a number) was
# never measured
MAX_COMPUTE_MS = 24 * 3600 * 1e3

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}

# FAILED codes of a tagged session (PolicyTag)
BEHIND = "behind"  # this hop is at an older version than the tag: it pulls; ask again soon
AHEAD = "ahead"  # this hop is at (or moving to) a newer version than the tag
REVOKED = "revoked"  # a tagged session ended: the hop had to move to a newer version
OTHER_RUN = "other_run"  # this hop's weights follow another run
FOLLOWING = "following"  # an untagged session: this hop's weights are an RL run's
UNVERSIONED = "unversioned"  # a tagged session: this hop does not follow runs' versions
VERSION = "version"  # a peer that speaks another version of these protocols
# what peers before 3.0.0 dial: answered with an ERROR of code VERSION
RETIRED_IDS = ("/peerd/shard/1.0.0", "/peerd/shard/2.0.0")
RETIRED_RETURN_IDS = ("/peerd/shard-return/1.0.0", "/peerd/shard-return/2.0.0")
# in LedgerEntry.features of a peer that now takes tagged sessions only: plain
# inference routes around it
FEATURE_TAGGED_ONLY = "shard.tagged_only"
# in LedgerEntry.features of a peer whose shard server takes OPEN.rows > 1
FEATURE_ROWS = "shard.rows"
RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # as protocols.rollout's
MAX_PEER_ID_CHARS = 128
MAX_SESSION_CHARS = 128
MAX_MESSAGE_CHARS = 4096  # a FAILED's message (hops send at most 1000)
MAX_SIGNATURE_BYTES = 128  # a FAILED's signature (ed25519: 64)
# ERROR code: an OPEN that names as its entry (at the first hop) or as the hop before
# this one (at a later hop) a peer other than the one that opened the stream
IMPERSONATION = "impersonation"
# The codes a FAILED or a shard ERROR carries. A code is a label that the entry keeps
# (in its bans, metrics, status), so a code not among these (a newer peer's, or
# anything a hop makes up) is read as OTHER: `known_code`.
CODES = frozenset({
    "unreachable", "overloaded", "evicted", "internal", BEHIND, AHEAD, REVOKED, OTHER_RUN,
    FOLLOWING, UNVERSIONED, VERSION, IMPERSONATION, WireError.reason, FrameTooLarge.reason,
    WrongMessageType.reason, UnsupportedVersion.reason,
    "bad_signature", "bad_peer_id"})  # (a FAILED relayed whose signature does not check)
OTHER = "other"


def known_code(code: str) -> str:
    """`code` if it is one of CODES, else OTHER."""
    return code if code in CODES else OTHER


def check_peer_id(peer_id: str, what: str) -> None:
    """WireError unless `peer_id` could be a peer id by its length (1..MAX_PEER_ID_CHARS
    characters); whether it parses is the caller's to check, where it matters."""
    if not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
        raise WireError(f"{what} is not a peer id: {len(peer_id)} characters, at most "
                        f"{MAX_PEER_ID_CHARS}")


@dataclass(frozen=True, slots=True)
class WireTensor(Message):
    """A dense tensor: row-major little-endian bytes."""

    MAX_ITEMS = {"shape": MAX_TENSOR_RANK}
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def check(self, *, rank: int | None = None) -> None:
        """Raise WireError unless dtype, shape and byte length agree."""
        if self.dtype not in DTYPES:
            raise WireError(f"tensor dtype {self.dtype!r} not one of {sorted(DTYPES)}")
        if rank is not None and len(self.shape) != rank:
            raise WireError(f"tensor of rank {len(self.shape)}, expected {rank}")
        if any(d < 0 for d in self.shape):
            raise WireError(f"negative tensor dimension in {self.shape}")
        expected = math.prod(self.shape) * DTYPES[self.dtype]
        if expected != len(self.data):
            raise WireError(f"tensor {self.dtype}{list(self.shape)} needs {expected} bytes, "
                            f"got {len(self.data)}")


@dataclass(frozen=True, slots=True)
class Hop(Message):
    """One span of the route: `peer_id` runs decoder layers [start, end)."""

    peer_id: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class PolicyTag(Message):
    """The RL policy a tagged session runs: `version` of run `run_id`, whose trainer
    (the author of its versions, from whom a hop that is behind pulls) is `trainer`."""

    run_id: str
    version: int
    trainer: str

    def check(self) -> None:
        if not RUN_ID.fullmatch(self.run_id):
            raise WireError(f"run id {self.run_id!r:.80} is not 1..64 of [A-Za-z0-9._-]")
        if not 0 <= self.version < 2**63:
            raise WireError(f"policy version {self.version} out of range")
        if not 0 < len(self.trainer) <= MAX_PEER_ID_CHARS:
            raise WireError("the tag's trainer is not a peer id")


@dataclass(frozen=True, slots=True)
class Open(Message):
    KIND = "shard.open"
    # an untagged OPEN of one row is what peers before tags and rows speak
    OPTIONAL = frozenset({"policy", "rows"})
    MAX_ITEMS = {"route": MAX_ROUTE_HOPS}
    session: str  # chosen by the entry peer, unique per generation
    model_id: str
    route: tuple[Hop, ...]  # the whole chain, first hop first
    hop: int  # index in `route` of the peer receiving this OPEN
    entry_peer: str  # where the last hop returns hidden states
    max_length: int  # positions the session may reach (KV cache budget)
    dtype: str  # wire dtype of hidden states
    policy: PolicyTag | None = None  # an RL policy version every hop must hold throughout
    rows: int = 1  # sequences decoded side by side, at the same positions (1..MAX_ROWS)

    def check(self) -> None:
        """WireError unless its peer ids and its tag are well-formed (the route's layers,
        and whether this peer is the hop it names, are the server's to check)."""
        check_peer_id(self.entry_peer, "the entry peer")
        for i, hop in enumerate(self.route):
            check_peer_id(hop.peer_id, f"route hop {i}")
        if self.policy is not None:
            self.policy.check()


@dataclass(frozen=True, slots=True)
class Opened(Message):
    KIND = "shard.opened"
    session: str


@dataclass(frozen=True, slots=True)
class HopTiming(Message):
    """How long hop `peer_id` computed a step (each hop appends its own)."""

    peer_id: str
    compute_ms: float

    def check(self) -> None:
        """WireError unless it is a time a hop could have measured (0..MAX_COMPUTE_MS ms:
        the entry adds them up into the request's figures, which a NaN breaks) of a peer
        id's length."""
        if not 0.0 <= self.compute_ms <= MAX_COMPUTE_MS:  # (False for NaN)
            raise WireError(f"hop timing of {self.compute_ms!r} ms compute, not within "
                            f"0..{MAX_COMPUTE_MS:.0f}")
        check_peer_id(self.peer_id, "a hop timing's peer")


@dataclass(frozen=True, slots=True)
class Forward(Message):
    KIND = "shard.forward"
    # a chain's FORWARD, one row a session row, is what peers before trees and rows speak
    OPTIONAL = frozenset({"tree", "source"})
    # counted before an item is read: a tree is refused past MAX_TREE_POSITIONS anyway
    # (a draft's positions), a source gives each of a session's rows one, and each hop
    # before the receiver sent one timing. (Positions ride in `hidden`'s bytes.)
    MAX_ITEMS = {"tree": MAX_TREE_POSITIONS, "source": MAX_ROWS, "timings": MAX_ROUTE_HOPS}
    session: str
    step: int  # increases by one per FORWARD in a session
    start_pos: int
    keep: int  # truncate KV to this length first; -1 = keep everything
    hidden: WireTensor  # [rows, T, H]
    timings: tuple[HopTiming, ...] = ()  # compute time of the hops before this one
    # parent of each of the T positions: an index < j into this FORWARD, or -1 for
    # the last cached position; () is a chain (position j's parent is j - 1)
    tree: tuple[int, ...] = ()
    # a first FORWARD of fewer rows than the session: the row of it each session row
    # starts from; () when it carries every row
    source: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Result(Message):
    """From the last hop to the entry peer."""

    KIND = "shard.result"
    MAX_ITEMS = {"timings": MAX_ROUTE_HOPS}
    session: str
    step: int
    hidden: WireTensor
    timings: tuple[HopTiming, ...]


@dataclass(frozen=True, slots=True)
class Failed(Message):
    """A hop could not process `step` (or hold the session, or reach its next hop), in
    the words of the hop that says so (`by`) and signed by it: the hops that relay it
    to the entry pass it on as it is, after checking the signature, so no hop can put a
    refusal in another's mouth, and the entry knows whose word it weighs."""

    KIND = "shard.failed"
    session: str
    step: int  # -1: the session was refused before any step
    peer_id: str  # the peer at fault, in `by`'s words: `by` itself, or a hop beside it
    code: str  # one of CODES ("unreachable", "overloaded", "internal", ...); else OTHER
    message: str
    by: str  # the hop that says it
    sig: bytes  # `by`'s ed25519 signature over `signed_bytes()`

    def signed_bytes(self) -> bytes:
        """What `sig` signs: the message's canonical bytes with `sig` empty."""
        return encode(dataclasses.replace(self, sig=b""))

    def check(self) -> None:
        """WireError unless its fields are within their lengths. The code is not checked:
        one not known here is read as OTHER (`known_code`); nor is the signature (the
        receiver checks it against `by`'s key), nor whom it may blame (the entry: `by`
        itself or a hop beside it on the route)."""
        if len(self.session) > MAX_SESSION_CHARS:
            raise WireError(f"FAILED for a session id of {len(self.session)} characters")
        check_peer_id(self.peer_id, "the FAILED's peer at fault")
        check_peer_id(self.by, "the FAILED's author")
        if len(self.message) > MAX_MESSAGE_CHARS:
            raise WireError(f"FAILED message of {len(self.message)} characters, at most "
                            f"{MAX_MESSAGE_CHARS}")
        if len(self.sig) > MAX_SIGNATURE_BYTES:
            raise WireError(f"FAILED signature of {len(self.sig)} bytes, at most "
                            f"{MAX_SIGNATURE_BYTES}")


@dataclass(frozen=True, slots=True)
class Close(Message):
    KIND = "shard.close"
    session: str


SHARD = SessionStream(
    id="/peerd/shard/3.0.0",
    opens=(Open,),
    opened=Opened,  # this hop admitted the session (the hops after it may yet refuse)
    # FAILED: this hop or one further down cannot hold the session (capacity, an
    # unreachable next hop, versions); ERROR: the OPEN itself broke the rules
    refusals=(Failed, ErrorReply),
    # FORWARDs follow OPEN without waiting for its answer
    dialer_sends=(Forward, Close),
    # a FORWARD refused mid-session; a refusal relayed from further down (FAILED).
    # Results travel back over SHARD_RETURN
    listener_sends=(ErrorReply, Failed),
    max_control_bytes=64 * 1024,
    # One FORWARD frame: SmolLM2 hidden 576 x float32 x 2048 positions is 4.5 MiB; a
    # 4096-wide model prefilling 2048 positions in float16 is 16 MiB. Anything larger is
    # refused before it is read.
    max_data_bytes=32 * 2**20,
    # the OPEN's answer, and, when the opener waits for it (Pipeline.open), the chain's
    # return stream
    open_timeout_s=30.0,
    step_timeout_s=60.0,
)

# A step's compute grows with its positions: a prefill of thousands of positions on a
# slow or loaded CPU takes minutes. The entry waits the step timeout plus this much a
# position (20 positions a second, slower than any hop worth routing through) before
# it calls the chain broken; a hop that died is found sooner, by its connection's end.
STEP_S_PER_POSITION = 0.05


def step_deadline_s(positions: int) -> float:
    """How long the entry waits for a step of `positions` positions (all rows)."""
    return SHARD.step_timeout_s + STEP_S_PER_POSITION * max(0, positions)


SHARD_RETURN = SessionStream(
    id="/peerd/shard-return/3.0.0",
    # OPENED: the last hop's return stream for the session, answered with OPENED (or
    # ERROR: no such session here), RESULTs following without waiting for the answer;
    # FAILED: any hop's report that the session broke (a one-way notice, no answer)
    opens=(Opened, Failed),
    opened=Opened,
    refusals=(ErrorReply,),
    dialer_sends=(Result,),
    listener_sends=(),
    max_control_bytes=SHARD.max_control_bytes,
    max_data_bytes=SHARD.max_data_bytes,  # a RESULT is as large as a FORWARD
    open_timeout_s=10.0,
    step_timeout_s=SHARD.step_timeout_s,  # a RESULT ends a SHARD step
)


# in LedgerEntry.features of a peer whose shard server speaks these versions, and the
# progress probe (protocols/shard_progress.py, which says it): routes cross only such
# peers (a swarm upgraded a peer at a time routes around the others rather than failing
# on them, or stalling with nobody to ask where)
FEATURE_SESSIONS = "/peerd/shard-progress/1.0.0"


def tree_depths(tree: tuple[int, ...], positions: int) -> list[int]:
    """Depth of each of a FORWARD's `positions` below the cache (0: a child of the last
    cached position); WireError unless `tree` is () or a parent list of that length
    whose every parent comes before its child."""
    if not tree:
        return list(range(positions))
    if len(tree) != positions:
        raise WireError(f"tree of {len(tree)} parents for {positions} positions")
    if positions > MAX_TREE_POSITIONS:
        raise WireError(f"tree of {positions} positions exceeds {MAX_TREE_POSITIONS}")
    depths: list[int] = []
    for j, parent in enumerate(tree):
        if not -1 <= parent < j:
            raise WireError(f"tree position {j} has parent {parent}: a parent must be an "
                            "earlier position or -1 (the cache)")
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


def check_timings(timings: tuple[HopTiming, ...], hops: int) -> None:
    """WireError unless `timings` are one well-formed timing for each of the `hops` hops
    that computed the step before it reached here (every hop appends its own)."""
    if len(timings) != hops:
        raise WireError(f"{len(timings)} hop timings after {hops} hops")
    for timing in timings:
        timing.check()


def check_route(route: tuple[Hop, ...], num_layers: int) -> None:
    """The route must cover [0, num_layers) with contiguous, non-empty spans."""
    if not route:
        raise WireError("empty route")
    if len(route) > MAX_ROUTE_HOPS:
        raise WireError(f"route of {len(route)} hops exceeds {MAX_ROUTE_HOPS}")
    at = 0
    for i, hop in enumerate(route):
        if hop.start != at:
            raise WireError(f"route hop {i} starts at layer {hop.start}, expected {at}: the "
                            "route skips or repeats layers")
        if hop.end <= hop.start:
            raise WireError(f"route hop {i} has an empty span [{hop.start}, {hop.end})")
        at = hop.end
    if at != num_layers:
        raise WireError(f"route ends at layer {at}, the model has {num_layers}")


def check_forward(msg: Forward, *, session: str, last_step: int, dtype: str,
                  hidden_size: int, cached: int, max_length: int, rows: int = 1,
                  hop: int = 0) -> None:
    """WireError unless `msg` may follow on the stream of session `session`, whose last
    step was `last_step`, agreed on `dtype`, `max_length` and `rows`, and whose cache
    holds `cached` positions of hidden size `hidden_size`, at route hop `hop` (whose
    hops before it sent a timing each). Whether its hidden states are finite is the
    receiver's to check, where it decodes them."""
    if msg.session != session:
        raise WireError(f"FORWARD for unknown session {msg.session!r:.40} on session "
                        f"{session}'s stream")
    if msg.step <= last_step:
        raise WireError(f"FORWARD step {msg.step} after step {last_step}")
    h = msg.hidden
    h.check(rank=3)
    if h.dtype != dtype:
        raise WireError(f"hidden states in {h.dtype}, the session agreed on {dtype}")
    given = rows
    if msg.source:
        given = h.shape[0]
        if cached or msg.start_pos or len(msg.source) != rows or not 1 <= given <= rows:
            raise WireError(f"source of {len(msg.source)} rows from {given} at start_pos "
                            f"{msg.start_pos}: a first FORWARD of at most the session's "
                            f"{rows} rows gives each of them a row")
        if not all(0 <= r < given for r in msg.source):
            raise WireError(f"source rows outside the FORWARD's {given}")
    if h.shape[0] != given or h.shape[2] != hidden_size or h.shape[1] < 1:
        raise WireError(f"hidden states of shape {list(h.shape)}; expected "
                        f"[{given}, T>=1, {hidden_size}]")
    if msg.tree and rows != 1:
        raise WireError(f"a token tree in a session of {rows} rows: a tree is one row's")
    if not -1 <= msg.keep <= cached:
        raise WireError(f"keep={msg.keep} but the session holds {cached} positions")
    expected = cached if msg.keep < 0 else msg.keep
    if msg.start_pos != expected:
        raise WireError(f"start_pos {msg.start_pos} but the cache will hold {expected} "
                        "positions: positions must be contiguous")
    tree_depths(msg.tree, h.shape[1])
    check_timings(msg.timings, hop)
    if msg.start_pos + h.shape[1] > max_length:
        raise WireError(f"positions up to {msg.start_pos + h.shape[1]} exceed the session's"
                        f" max_length {max_length}")
