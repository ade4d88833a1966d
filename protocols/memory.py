"""SEDM's memory items on the wire.

A memory item is a short text (a worked example, a rule, a correction, an insight)
with its domain, kind and provenance: the peer that wrote it, the execution context
(SCEC) it was distilled from, and the item it was abstracted from. Items are kept and
re-served by other peers, so each is signed by its author over its canonical bytes
(`SignedItem`), like ledger entries and rollouts; an item's id is the SHA-256 of those
bytes, so a tampered item is another item and an announced id checks a fetched body.

What a peer measured about an item (its utility weight, uses) is local, never signed
and never trusted from another peer: a receiver admits an item only by its own replay.

This module holds the item; the gossip announcement and `/peerd/memory/1.0.0` (fetch
items, search a peer's memory) are declared beside it. Farmed replays have their own
protocol, in memory_replay.py.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from protocols.codec import Message
from protocols.errors import WireError
from protocols.spec import RequestResponse

KINDS = ("example", "rule", "correction", "insight")
DOMAIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")  # "arithmetic", "gsm8k", "chat", "general"
ITEM_ID = re.compile(r"[0-9a-f]{64}")  # sha256 hex of a SignedItem's body
SCEC_HASH = ITEM_ID  # sha256 hex of an SCEC's canonical bytes
MAX_TEXT_CHARS = 4_000
MAX_PEER_ID_CHARS = 128
MAX_SIGNATURE_BYTES = 128
MAX_ITEM_BYTES = MAX_TEXT_CHARS * 4 + 1_024  # UTF-8 text plus the other fields


def check_domain(domain: str) -> None:
    if not DOMAIN.fullmatch(domain):
        raise WireError(f"domain {domain!r:.40}: 1-32 of a-z 0-9 . _ -, starting with a "
                        "letter or digit")


@dataclass(frozen=True, slots=True)
class MemoryItemMsg(Message):
    """One item as its author signs it."""

    KIND = "memory.item"
    text: str
    domain: str
    kind: str  # one of KINDS
    author: str  # the author's peer id: the signer
    origin: str  # the SCEC hash it was distilled from, or ""
    parent: str  # the id of the item it was abstracted from, or ""
    created: float  # unix seconds, as the author's clock said

    def check(self) -> None:
        if not self.text.strip():
            raise WireError("item text empty")
        if len(self.text) > MAX_TEXT_CHARS:
            raise WireError(f"item text of {len(self.text)} characters "
                            f"(at most {MAX_TEXT_CHARS})", reason="oversized")
        check_domain(self.domain)
        if self.kind not in KINDS:
            raise WireError(f"item kind {self.kind!r:.20} not one of {', '.join(KINDS)}")
        if not 0 < len(self.author) <= MAX_PEER_ID_CHARS:
            raise WireError("item author empty or too long")
        if self.origin and not SCEC_HASH.fullmatch(self.origin):
            raise WireError("item origin is not an SCEC hash")
        if self.parent and not ITEM_ID.fullmatch(self.parent):
            raise WireError("item parent is not an item id")
        if not (math.isfinite(self.created) and self.created >= 0):
            raise WireError("item creation time is not a time")


@dataclass(frozen=True, slots=True)
class SignedItem(Message):
    KIND = "memory.signed"
    body: bytes  # canonical msgpack of a MemoryItemMsg
    sig: bytes  # the author's ed25519 signature over body

    @property
    def item_id(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def check(self) -> None:
        if len(self.body) > MAX_ITEM_BYTES or len(self.sig) > MAX_SIGNATURE_BYTES:
            raise WireError(f"a signed item of {len(self.body)} + {len(self.sig)} bytes",
                            reason="oversized")


# An SCEC's bounds: a task and its run small enough to keep thousands of and to send.
SCORERS = ("number", "exact", "contains")  # peerd/memory/scoring.py implements each
MAX_PROMPT_CHARS = 8_000
MAX_MODEL_CHARS = 256
MAX_VERSION_CHARS = 128
MAX_ANSWER_CHARS = MAX_TEXT_CHARS
MAX_OUTPUT_CHARS = 32_000
MAX_SCEC_ITEMS = 16  # items given to one run
MAX_SCEC_TOKENS = 8_192  # max_tokens, and the prompt's tokens are bounded by 16x that
MAX_SCEC_STOPS = 8
MAX_SCEC_STOP_CHARS = 200
MAX_SCEC_TEMPERATURE = 10.0
MAX_SEED = 2**63 - 1
MAX_LATENCY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class ScecMsg(Message):
    """A self-contained execution context: everything needed to run a scored task again
    and compare (the task, the model and version, the sampling and seed, the memory
    given, in prompt order) and what the run gave. Its hash (sha256 of its canonical
    bytes) names it as an item's origin."""

    KIND = "memory.scec"
    prompt: str  # the user's task text, before memory goes in (peerd/memory/prompting.py)
    domain: str
    model: str  # the model id
    version: str  # the model's (policy) version; "" for the base model
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None  # None: unseeded (a sampled run then cannot be reproduced)
    stop: tuple[str, ...]
    memory: tuple[str, ...]  # the item texts the run was given, in prompt order
    memory_ids: tuple[str, ...]  # their ids, one each, or () when they had none
    answer: str  # the reference the output is scored against
    scorer: str  # one of SCORERS
    output: str
    score: float  # in [0, 1]
    prompt_tokens: int  # the whole prompt's, memory and chat template included
    latency_s: float  # wall time of the run

    def check(self) -> None:
        _bounded("prompt", self.prompt, MAX_PROMPT_CHARS, empty=False)
        check_domain(self.domain)
        _bounded("model", self.model, MAX_MODEL_CHARS, empty=False)
        _bounded("version", self.version, MAX_VERSION_CHARS)
        if not 1 <= self.max_tokens <= MAX_SCEC_TOKENS:
            raise WireError(f"SCEC max_tokens {self.max_tokens} not in 1..{MAX_SCEC_TOKENS}")
        if not (math.isfinite(self.temperature)
                and 0.0 <= self.temperature <= MAX_SCEC_TEMPERATURE):
            raise WireError(f"SCEC temperature not in [0, {MAX_SCEC_TEMPERATURE:g}]")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise WireError("SCEC top_p not in (0, 1]")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise WireError("SCEC seed not in 0..2^63-1")
        if len(self.stop) > MAX_SCEC_STOPS:
            raise WireError(f"SCEC of {len(self.stop)} stop strings (at most "
                            f"{MAX_SCEC_STOPS})", reason="oversized")
        if any(not stop or len(stop) > MAX_SCEC_STOP_CHARS for stop in self.stop):
            raise WireError(f"SCEC stop string empty or over {MAX_SCEC_STOP_CHARS} characters")
        if len(self.memory) > MAX_SCEC_ITEMS:
            raise WireError(f"SCEC given {len(self.memory)} items (at most "
                            f"{MAX_SCEC_ITEMS})", reason="oversized")
        for text in self.memory:
            _bounded("memory item", text, MAX_TEXT_CHARS, empty=False)
        if self.memory_ids and len(self.memory_ids) != len(self.memory):
            raise WireError(f"SCEC names {len(self.memory_ids)} item ids for "
                            f"{len(self.memory)} items")
        if not all(ITEM_ID.fullmatch(i) for i in self.memory_ids):
            raise WireError("SCEC memory_ids holds something that is not an item id")
        _bounded("answer", self.answer, MAX_ANSWER_CHARS)
        if self.scorer not in SCORERS:
            raise WireError(f"SCEC scorer {self.scorer!r:.20} not one of {', '.join(SCORERS)}")
        _bounded("output", self.output, MAX_OUTPUT_CHARS)
        if not (math.isfinite(self.score) and 0.0 <= self.score <= 1.0):
            raise WireError("SCEC score not in [0, 1]")
        if not 0 <= self.prompt_tokens <= 16 * MAX_SCEC_TOKENS:
            raise WireError(f"SCEC prompt_tokens {self.prompt_tokens} out of bounds")
        if not (math.isfinite(self.latency_s) and 0.0 <= self.latency_s <= MAX_LATENCY_S):
            raise WireError("SCEC latency_s not a duration")


def _bounded(what: str, text: str, limit: int, *, empty: bool = True) -> None:
    if not empty and not text.strip():
        raise WireError(f"SCEC {what} empty")
    if len(text) > limit:
        raise WireError(f"SCEC {what} of {len(text)} characters (at most {limit})",
                        reason="oversized")


# ---- diffusion: the gossip announcement and /peerd/memory/1.0.0 ----------------------

TOPIC = "peerd/memory/1"
MAX_ANNOUNCE_BYTES = 1_024  # one ItemAnnounce on gossip
# What a receiver takes from one announcer: a burst, then a steady rate (a token bucket).
# An announcement is one admitted item, and admission replays tasks, so an honest peer
# stays far below it; a sender paces itself under it (peerd/memory/diffusion.py).
ANNOUNCE_BURST = 8
ANNOUNCE_PER_S = 0.5
MAX_UTILITY = 1_000.0  # |utility|: score units less charges; anything larger is a lie
MAX_IDS = 32  # items one fetch asks for
MAX_K = 32  # items one search asks for
MAX_QUERY_CHARS = 2_000
MAX_REPLY_ITEMS = max(MAX_IDS, MAX_K)
MAX_MEMORY_REQUEST_BYTES = MAX_IDS * 72 + MAX_QUERY_CHARS * 4 + 256
MAX_MEMORY_REPLY_BYTES = MAX_REPLY_ITEMS * (MAX_ITEM_BYTES + MAX_SIGNATURE_BYTES + 64) + 1_024
SIMILARITY_SLACK = 1e-3  # a cosine a float index rounded past +-1


def check_item_id(item_id: str, what: str = "item id") -> None:
    if not ITEM_ID.fullmatch(item_id):
        raise WireError(f"{what} {item_id!r:.80} is not 64 hex digits")


@dataclass(frozen=True, slots=True)
class ItemAnnounce(Message):
    """On gossip: an item the publisher admitted (its own, or one it admitted from
    another peer) and serves on /peerd/memory/1.0.0. Pubsub's strict signing
    authenticates the publisher; the item's author signs the item itself, which a
    receiver checks once it has fetched it. The utility is the publisher's own
    measurement: a hint for what to fetch, never a weight."""

    KIND = "memory.announce"
    STRICT = False  # a long-lived record: newer peers may add fields
    item_id: str
    domain: str
    author: str  # who signed the item (not necessarily the publisher)
    utility: float  # the publisher's measured utility of the item
    created: float  # the item's creation time, as its author's clock said

    def check(self) -> None:
        check_item_id(self.item_id)
        check_domain(self.domain)
        if not 0 < len(self.author) <= MAX_PEER_ID_CHARS:
            raise WireError("announced author empty or too long")
        if not (math.isfinite(self.utility) and abs(self.utility) <= MAX_UTILITY):
            raise WireError(f"announced utility {self.utility} is not in "
                            f"[-{MAX_UTILITY}, {MAX_UTILITY}]")
        if not (math.isfinite(self.created) and self.created >= 0):
            raise WireError("announced creation time is not a time")


@dataclass(frozen=True, slots=True)
class MemoryRequest(Message):
    """Either a fetch (`ids`: the items wanted) or a search (`query`, `k` and an
    optional `domain`), never both: build one with `fetching` or `searching`."""

    KIND = "memory.req"
    ids: tuple[str, ...]  # a fetch: 1..MAX_IDS item ids; () for a search
    query: str  # a search: 1..MAX_QUERY_CHARS of text; "" for a fetch
    k: int  # a search: how many nearest items, 1..MAX_K; 0 for a fetch
    domain: str  # a search: only items of this domain, or "" for any

    @classmethod
    def fetching(cls, ids: tuple[str, ...]) -> MemoryRequest:
        return cls(ids=ids, query="", k=0, domain="")

    @classmethod
    def searching(cls, query: str, k: int, domain: str | None = None) -> MemoryRequest:
        return cls(ids=(), query=query, k=k, domain=domain or "")

    @property
    def is_fetch(self) -> bool:
        return bool(self.ids)

    def check(self) -> None:
        if self.ids:
            if self.query or self.k or self.domain:
                raise WireError("a memory request is a fetch or a search, not both")
            if len(self.ids) > MAX_IDS:
                raise WireError(f"a fetch of {len(self.ids)} items (at most {MAX_IDS})",
                                reason="oversized")
            if len(set(self.ids)) != len(self.ids):
                raise WireError("a fetch names an item twice")
            for item_id in self.ids:
                check_item_id(item_id)
            return
        if not self.query.strip():
            raise WireError("a memory request with neither item ids nor a query")
        if len(self.query) > MAX_QUERY_CHARS:
            raise WireError(f"a query of {len(self.query)} characters "
                            f"(at most {MAX_QUERY_CHARS})", reason="oversized")
        if not 1 <= self.k <= MAX_K:
            raise WireError(f"k = {self.k} (1..{MAX_K})")
        if self.domain:
            check_domain(self.domain)


@dataclass(frozen=True, slots=True)
class MemoryReply(Message):
    """The items of a fetch that the peer holds (in any order; the others left out),
    or a search's nearest items, nearest first, each with the serving peer's cosine
    similarity to the query (its measure: a receiver ranks by its own)."""

    KIND = "memory.reply"
    items: tuple[SignedItem, ...]
    similarities: tuple[float, ...]  # a search: one per item; () for a fetch

    def check(self) -> None:
        if len(self.items) > MAX_REPLY_ITEMS:
            raise WireError(f"a reply of {len(self.items)} items (at most "
                            f"{MAX_REPLY_ITEMS})", reason="oversized")
        for signed in self.items:
            signed.check()
        if self.similarities and len(self.similarities) != len(self.items):
            raise WireError(f"{len(self.similarities)} similarities for "
                            f"{len(self.items)} items")
        bound = 1.0 + SIMILARITY_SLACK
        if not all(math.isfinite(s) and -bound <= s <= bound for s in self.similarities):
            raise WireError("a similarity that is not a cosine")


MEMORY = RequestResponse(
    id="/peerd/memory/1.0.0",
    request=MemoryRequest,
    response=MemoryReply,
    max_request_bytes=MAX_MEMORY_REQUEST_BYTES,
    max_response_bytes=MAX_MEMORY_REPLY_BYTES,
    timeout_s=15.0,  # a search embeds the query and reads SQLite: well under a second
    max_concurrent=32,  # a fresh item is fetched by every peer that hears it, at once
    max_concurrent_per_peer=2,
)
