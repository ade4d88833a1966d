"""The capability ledger on the wire (Symphony's signed capability ledger).

A `LedgerEntry` describes one peer: where to reach it, its hardware, what models it
serves, its skills and load. The peer signs the canonical msgpack bytes of the entry
(`SignedEntry.body`) with its libp2p ed25519 key; whoever re-serves the entry re-sends
those exact bytes, so any receiver can verify the originator's signature against the
public key embedded in the peer id.

Gossip topic `peerd/ledger/1` carries `SignedEntry` messages; a late joiner pulls a
snapshot over the `/peerd/ledger-sync/1.0.0` stream protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from protocols.codec import Message
from protocols.errors import WireError
from protocols.spec import RequestResponse
from protocols.tool import MAX_TOOLS, ToolBrief

TOPIC = "peerd/ledger/1"

MAX_ENTRY_BYTES = 64 * 1024  # one signed entry; gossip RPCs are capped at 1 MiB
MAX_SNAPSHOT_ENTRIES = 4096
# What one peer's book holds at most: peer ids cost nothing to make, so without a cap
# anyone could fill a book (and its SQLite file) with entries of made-up peers
MAX_BOOK_ENTRIES = MAX_SNAPSHOT_ENTRIES
MAX_BOOK_BYTES = 64 << 20  # of signed bodies; an honest entry is a few KiB
# What one entry may list; a peer trims its own to these (ledger/gossip.py)
MAX_ADDRS = 32
MAX_ADDR_CHARS = 256
MAX_MODELS = 8
MAX_LAYERS = 1024  # of a model
MAX_SKILLS = 64
MAX_FEATURES = 64
MAX_REPUTATION = 256  # reports; agents/reputation.py publishes at most this many
MAX_INT = 2**63 - 1  # SQLite's INTEGER, and any sane count
MAX_CLOCK_SKEW_S = 60.0  # a timestamp further in the future than this is refused
MIN_TTL_S = 0.1
MAX_TTL_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Hardware(Message):
    STRICT = False
    device: str = "cpu"  # "cpu" | "cuda" | "mps"
    memory_bytes: int = 0  # RAM (cpu) or accelerator memory available for work
    cpu_count: int = 0
    accelerator: str = ""  # e.g. "NVIDIA H100 80GB HBM3"; empty on CPU


@dataclass(frozen=True, slots=True)
class ModelServed(Message):
    STRICT = False
    model_id: str
    layer_start: int
    layer_end: int  # exclusive: the shard serves decoder layers [start, end)
    dtype: str
    tokens_per_s: float = 0.0
    num_layers: int = 0  # of the whole model, so anyone can tell what is missing


@dataclass(frozen=True, slots=True)
class Load(Message):
    STRICT = False
    sessions: int = 0
    queue: int = 0
    cpu_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class LedgerEntry(Message):
    """What a peer says about itself. Long-lived record: decodes tolerantly."""

    KIND = "ledger.entry"
    STRICT = False
    OPTIONAL = frozenset({"weights_http_port", "tools"})  # left off the wire when unset
    peer_id: str
    seq: int  # strictly increasing per peer; last writer wins
    timestamp: float  # unix seconds when signed
    ttl_s: float  # the entry is void after timestamp + ttl_s without a refresh
    name: str = ""
    addrs: tuple[str, ...] = ()
    hardware: Hardware = field(default_factory=Hardware)
    models: tuple[ModelServed, ...] = ()
    skills: tuple[str, ...] = ()
    load: Load = field(default_factory=Load)
    # Observations this peer made of others: peer id -> score in [0, 1].
    reputation: dict[str, float] = field(default_factory=dict)
    software: str = ""
    # Optional wire fields this peer's software understands (protocols.*.FEATURE_*): a
    # peer sends one only to peers that list it, so an older peer that decodes requests
    # strictly is never sent a field it would refuse.
    features: tuple[str, ...] = ()
    # The port of this peer's weight-chunk HTTP side channel (protocols/weights.py
    # CHUNKS_HTTP), at the IP its libp2p connections come from; 0: none. Left off the
    # wire while 0, so an entry without it is what older peers sign and read.
    weights_http_port: int = 0
    # Typed tools this peer runs for others (protocols/tool.py), compactly: name, schema
    # hash, capacity. A peer that predates them ignores the field (entries decode
    # tolerantly); left off the wire when there are none.
    tools: tuple[ToolBrief, ...] = ()

    @property
    def expires_at(self) -> float:
        return self.timestamp + self.ttl_s

    def check(self) -> None:
        """WireError (malformed) for what no honest peer signs: a NaN or an infinity
        anywhere (every reader, the API's JSON first, would choke on it), a count that
        is negative or past 2**63 (SQLite's INTEGER: the store would fail on it), a ttl
        out of range, a reputation outside [0, 1], a layer span that is not one, lists
        longer than any peer's (each costs its readers: addresses are dialled one by
        one, spans routed over)."""
        if not (MIN_TTL_S <= self.ttl_s <= MAX_TTL_S) or not math.isfinite(self.timestamp):
            raise WireError(f"entry of {self.peer_id}: ttl {self.ttl_s} out of range")
        lists = {"addrs": (self.addrs, MAX_ADDRS), "models": (self.models, MAX_MODELS),
                 "skills": (self.skills, MAX_SKILLS), "features": (self.features, MAX_FEATURES),
                 "reputation": (self.reputation, MAX_REPUTATION),
                 "tools": (self.tools, MAX_TOOLS)}
        for what, (items, most) in lists.items():
            if len(items) > most:
                raise WireError(f"entry of {self.peer_id}: {len(items)} {what} (at most {most})")
        if any(len(a) > MAX_ADDR_CHARS for a in self.addrs):
            raise WireError(f"entry of {self.peer_id}: an address over {MAX_ADDR_CHARS} "
                            "characters")
        counts = {"seq": self.seq, "memory_bytes": self.hardware.memory_bytes,
                  "cpu_count": self.hardware.cpu_count, "sessions": self.load.sessions,
                  "queue": self.load.queue, "weights_http_port": self.weights_http_port}
        for what, n in counts.items():
            if not 0 <= n <= MAX_INT:
                raise WireError(f"entry of {self.peer_id}: {what} {n} out of range")
        for m in self.models:
            whole = m.num_layers or MAX_LAYERS  # 0: not said (an older peer)
            if not (0 <= m.layer_start < m.layer_end <= whole <= MAX_LAYERS):
                raise WireError(f"entry of {self.peer_id}: layers [{m.layer_start}, "
                                f"{m.layer_end}) of {m.num_layers} of {m.model_id!r:.40}")
        rates = {"cpu_percent": self.load.cpu_percent,
                 **{f"tokens_per_s of {m.model_id!r:.40}": m.tokens_per_s for m in self.models}}
        for what, x in rates.items():
            if not (math.isfinite(x) and x >= 0):
                raise WireError(f"entry of {self.peer_id}: {what} is {x}")
        for peer, score in self.reputation.items():
            if not (math.isfinite(score) and 0.0 <= score <= 1.0) or len(peer) > 128:
                raise WireError(f"entry of {self.peer_id}: reputation {score} of "
                                f"{peer!r:.60} outside [0, 1]")


@dataclass(frozen=True, slots=True)
class SignedEntry(Message):
    """An entry's canonical bytes and the originator's signature over them."""

    KIND = "ledger.signed"
    body: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class SyncRequest(Message):
    KIND = "ledger.sync.req"


@dataclass(frozen=True, slots=True)
class SyncResponse(Message):
    KIND = "ledger.sync.resp"
    MAX_ITEMS = {"entries": MAX_SNAPSHOT_ENTRIES}
    entries: tuple[SignedEntry, ...]


SYNC = RequestResponse(
    id="/peerd/ledger-sync/1.0.0",
    request=SyncRequest,
    response=SyncResponse,
    max_request_bytes=1024,
    max_response_bytes=MAX_SNAPSHOT_ENTRIES * MAX_ENTRY_BYTES // 16,  # 16 MiB
    timeout_s=10.0,
    max_concurrent=16,
    max_concurrent_per_peer=2,
)
