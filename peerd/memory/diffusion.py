"""Diffusion: the memory's network side (docs/sedm.md, "Diffusion").

An admitted item is announced on gossip topic `peerd/memory/1` (`ItemAnnounce`: id,
domain, author, the publisher's utility). A peer that hears one and does not hold the
item fetches it from the publisher over `/peerd/memory/1.0.0`, checks the author's
signature, that the body is the announced id and that the signer is the announced
author (`verify_item`), and hands it to admission (`on_candidate`): never on the
author's word, admission replays it. The same protocol serves fetches and searches
of this peer's memory to others, and `fetch` / `search_remote` ask theirs.

What a peer can make us do is bounded: a token bucket per publisher on announcements
(the excess is dropped and counted as `memory_flood`), a cap on pending fetches
overall and per publisher, per-peer concurrency on the protocol (its declaration), a
deadline on every call. Every refusal is an offence of the peer that sent the bytes;
an item that fails admission's replay is one of its author (`harmful_memory`), and an
author whose items keep failing is not fetched from for a while (`AuthorRecord`,
in standing.py with the token bucket).
An item reaches peers that cannot dial its author when a peer that admitted it
announces it in turn: a pending fetch keeps the other publishers heard meanwhile, and
tries them in order.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from libp2p.peer.id import ID

from peerd.memory.item import MemoryItem, Record, verify_item
from peerd.memory.standing import AuthorRecord, TokenBucket
from peerd.node import Node
from peerd.rpc import call, stream_handler
from peerd.streams import Unreachable
from protocols.codec import decode, encode
from protocols.errors import PeerError, RemoteError
from protocols.memory import (
    ANNOUNCE_BURST,
    ANNOUNCE_PER_S,
    MAX_ANNOUNCE_BYTES,
    MAX_UTILITY,
    MEMORY,
    TOPIC,
    ItemAnnounce,
    MemoryReply,
    MemoryRequest,
    SignedItem,
)

log = logging.getLogger(__name__)

MAX_PENDING = 64  # items being fetched after an announcement, all publishers together
MAX_PENDING_PER_PEER = 8  # ... announced by one publisher
MAX_SOURCES = 4  # publishers remembered for one pending item
MAX_FETCHING = 8  # fetch calls in flight at once
MAX_PEERS_TRACKED = 1024  # publishers with a token bucket
MAX_KNOWN = 8192  # ids handed on or announced, not fetched again
OUTBOX = 256  # our own announcements waiting for the pace
FETCH_TIMEOUT_S = 10.0
BUSY_RETRIES = 3  # asking a busy publisher again, after a growing, jittered pause


class LocalMemory(Protocol):
    """What diffusion asks of this peer's own memory (the store)."""

    async def signed(self, ids: Sequence[str]) -> list[SignedItem]:
        """The held items among `ids`; the others left out."""
        ...

    async def search(self, query: str, k: int, domain: str | None
                     ) -> list[tuple[SignedItem, float]]:
        """The `k` nearest items to `query` (of `domain` only, when given), nearest
        first, each with its cosine similarity."""
        ...

    async def has(self, item_id: str) -> bool: ...


Candidate = Callable[[MemoryItem, SignedItem, str], Awaitable[None]]  # (item, signed, source)
Interest = Callable[[ItemAnnounce], bool]


@dataclass(frozen=True, slots=True)
class Found:
    """An item a remote search returned, verified."""

    item: MemoryItem
    signed: SignedItem
    similarity: float  # the serving peer's measure; rank by your own


class Diffusion:
    """The network side of one peer's memory. Its owner (the memory service) calls
    `start` with a nursery of its own, `announce` for each item it admits and
    `report` with admission's verdict on each candidate handed to it."""

    def __init__(self, node: Node, local: LocalMemory, on_candidate: Candidate, *,
                 interest: Interest = lambda announce: True,
                 authors: AuthorRecord | None = None,
                 announce_burst: float = ANNOUNCE_BURST,
                 announce_per_s: float = ANNOUNCE_PER_S,
                 max_pending: int = MAX_PENDING,
                 max_pending_per_peer: int = MAX_PENDING_PER_PEER,
                 fetch_timeout_s: float = FETCH_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.local = local
        self.on_candidate = on_candidate  # admission's intake; must not take forever
        self.interest = interest  # which announced items are worth a fetch
        self.authors = authors or AuthorRecord()
        self.announce_burst = announce_burst  # what we take from each publisher
        self.announce_per_s = announce_per_s
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self.fetch_timeout_s = fetch_timeout_s
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        # our own pace: under what every peer takes from us (the protocol's figures)
        self._pace = TokenBucket(ANNOUNCE_PER_S * 0.8, ANNOUNCE_BURST // 2, clock())
        self._outbox_send, self._outbox = trio.open_memory_channel[ItemAnnounce](OUTBOX)
        self._pending: dict[str, list[tuple[str, ItemAnnounce]]] = {}  # id -> sources
        self._pending_per_peer: Counter[str] = Counter()
        self._known: OrderedDict[str, None] = OrderedDict()
        self._fetching = trio.CapacityLimiter(MAX_FETCHING)
        self._calls: dict[str, trio.Semaphore] = {}  # peer -> our exchanges with it

    async def start(self, nursery: trio.Nursery) -> None:
        """Serve the protocol, take the topic, and run the intake and the announcer in
        `nursery` (the owner's: cancelling it stops diffusion)."""
        node = self.node
        node.pubsub.set_topic_validator(TOPIC, self.validate, False)
        node.set_stream_handler(MEMORY.id, stream_handler(MEMORY, self._serve, node.offence))
        subscription = await node.pubsub.subscribe(TOPIC)
        nursery.start_soon(self._intake, subscription)
        nursery.start_soon(self._announcer)

    def status(self) -> dict[str, Any]:
        return {"diffusion": {
            **dict(self.counts), "pending": len(self._pending),
            "authors_blocked": len(self.authors.blocked_authors(self.clock()))}}

    # ---- serving -------------------------------------------------------------------------

    async def _serve(self, peer: str, request: MemoryRequest) -> MemoryReply:
        request.check()
        if request.is_fetch:
            wanted = set(request.ids)
            held = [s for s in await self.local.signed(request.ids) if s.item_id in wanted]
            self.counts["served_items"] += len(held)
            return MemoryReply(items=tuple(held[:len(wanted)]), similarities=())
        hits = (await self.local.search(request.query, request.k, request.domain or None)
                )[:request.k]
        self.counts["served_searches"] += 1
        return MemoryReply(items=tuple(s for s, _ in hits),
                           similarities=tuple(max(-1.0, min(1.0, sim)) for _, sim in hits))

    # ---- announcing ----------------------------------------------------------------------

    def announce(self, record: Record) -> bool:
        """Queue an item we admitted for announcement (paced; see `_announcer`). False
        when the queue is full: the item is not announced."""
        item = record.item
        utility = max(-MAX_UTILITY, min(MAX_UTILITY, record.stats.weight))
        announce = ItemAnnounce(item_id=item.id, domain=item.domain, author=item.author,
                                utility=utility if math.isfinite(utility) else 0.0,
                                created=item.created)
        announce.check()
        self._remember(item.id)
        try:
            self._outbox_send.send_nowait(announce)
        except trio.WouldBlock:
            self.counts["announce_dropped"] += 1
            return False
        return True

    async def _announcer(self) -> None:
        """Publish our announcements under the rate every receiver allows a publisher."""
        async for announce in self._outbox:
            await trio.sleep(self._pace.wait_s(self.clock()))
            self._pace.take(self.clock())
            try:
                await self.node.pubsub.publish(TOPIC, encode(announce))
                self.counts["announced"] += 1
            except Exception:
                log.warning("announcing memory item %s failed", announce.item_id[:12],
                            exc_info=True)

    # ---- hearing -------------------------------------------------------------------------

    def validate(self, forwarder: Any, msg: Any) -> bool:
        """Topic validator: must never raise (LIBP2P_NOTES.md trap 2)."""
        publisher = str(forwarder)
        try:
            publisher = str(ID(msg.from_id)) if msg.from_id else publisher
            if publisher != self.node.peer_id and not self._bucket(publisher).take(
                    self.clock()):
                raise PeerError(f"announcements beyond {self.announce_burst} at once and "
                                f"{self.announce_per_s}/s", reason="memory_flood")
            if len(msg.data) > MAX_ANNOUNCE_BYTES:
                raise PeerError(f"a {len(msg.data)} byte announcement "
                                f"(at most {MAX_ANNOUNCE_BYTES})", reason="oversized")
            decode(msg.data, ItemAnnounce).check()
            return True
        except PeerError as exc:
            self.node.offence(publisher, exc.reason, f"memory gossip: {exc}")
            return False
        except Exception:
            log.exception("memory gossip validator failed")
            return False

    def _bucket(self, peer: str) -> TokenBucket:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.announce_per_s,
                                                       self.announce_burst, self.clock())
            while len(self._buckets) > MAX_PEERS_TRACKED:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(peer)
        return bucket

    async def _intake(self, subscription: Any) -> None:
        """What the validator passed, until cancelled; fetches run in a nursery of ours."""
        async with trio.open_nursery() as nursery:
            while True:
                msg = await subscription.get()
                try:
                    publisher = str(ID(msg.from_id))
                    announce = decode(msg.data, ItemAnnounce)
                    announce.check()
                except Exception:  # the validator passed it: cannot happen, never fatal
                    log.exception("an announcement the validator passed does not decode")
                    continue
                try:
                    self._heard(publisher, announce, nursery)
                except Exception:  # our bug (or the interest callback's): keep hearing
                    log.exception("taking the announcement of %s failed", announce.item_id[:12])

    def _heard(self, publisher: str, announce: ItemAnnounce, nursery: trio.Nursery) -> None:
        item_id = announce.item_id
        if publisher == self.node.peer_id:
            return
        self.counts["heard"] += 1
        if item_id in self._known:
            return
        if self.authors.blocked(announce.author, self.clock()):
            self.counts["backed_off"] += 1
            return
        if not self.interest(announce):
            self.counts["not_wanted"] += 1
            return
        sources = self._pending.get(item_id)
        if self._pending_per_peer[publisher] >= self.max_pending_per_peer or (
                sources is None and len(self._pending) >= self.max_pending):
            self.counts["dropped_busy"] += 1
            return
        if sources is None:
            self._pending[item_id] = sources = []
            nursery.start_soon(self._fetch_announced, item_id)
        elif len(sources) >= MAX_SOURCES or publisher in (p for p, _ in sources):
            return
        sources.append((publisher, announce))
        self._pending_per_peer[publisher] += 1

    async def _fetch_announced(self, item_id: str) -> None:
        """Try each publisher heard for `item_id` in turn until one serves it intact;
        then hand it to admission."""
        sources = self._pending[item_id]
        got: tuple[MemoryItem, SignedItem, str] | None = None
        try:
            async with self._fetching:
                if await self.local.has(item_id):
                    self._remember(item_id)
                    return
                while sources and got is None:
                    publisher, announce = sources[0]
                    got = await self._fetch_from(publisher, announce)
                    sources.pop(0)
                    self._release(publisher)
        except Exception:  # our bug (the store's): this item is lost, diffusion goes on
            log.exception("fetching announced memory item %s failed", item_id[:12])
        finally:
            for publisher, _ in sources:
                self._release(publisher)
            del self._pending[item_id]
        if got is not None:
            self._remember(item_id)
            try:
                await self.on_candidate(*got)
            except Exception:
                log.exception("admission failed to take memory item %s", item_id[:12])

    async def _fetch_from(self, publisher: str, announce: ItemAnnounce
                          ) -> tuple[MemoryItem, SignedItem, str] | None:
        """The announced item from `publisher`, verified, or None. A publisher busy
        serving others (everyone fetches a fresh item at once) is asked again."""
        for attempt in range(1, BUSY_RETRIES + 2):
            if self.authors.blocked(announce.author, self.clock()):
                self.counts["backed_off"] += 1
                return None
            try:
                fetched = await self.fetch(publisher, (announce.item_id,), announce=announce)
                self.counts["fetched" if fetched else "not_served"] += 1
                return (*fetched[0], publisher) if fetched else None
            except RemoteError as exc:
                if exc.code != "busy" or attempt > BUSY_RETRIES:
                    break
                await trio.sleep(random.uniform(0.5, 1.5) * attempt)
            except (PeerError, Unreachable) as exc:  # a PeerError is counted in fetch
                log.debug("fetching %s from %s: %s", announce.item_id[:12], publisher, exc)
                break
        self.counts["fetch_failed"] += 1
        return None

    def _release(self, publisher: str) -> None:
        self._pending_per_peer[publisher] -= 1
        if self._pending_per_peer[publisher] <= 0:
            del self._pending_per_peer[publisher]

    def _remember(self, item_id: str) -> None:
        self._known[item_id] = None
        self._known.move_to_end(item_id)
        while len(self._known) > MAX_KNOWN:
            self._known.popitem(last=False)

    # ---- asking other peers --------------------------------------------------------------

    async def fetch(self, peer: str, ids: Sequence[str], *,
                    announce: ItemAnnounce | None = None
                    ) -> list[tuple[MemoryItem, SignedItem]]:
        """The items among `ids` that `peer` holds, each verified (with `announce`:
        also that it is the item announced, by that author). Raises PeerError (counted
        against `peer`), RemoteError (it refused) or Unreachable."""
        request = MemoryRequest.fetching(tuple(ids))
        request.check()  # our caller's ids: a WireError before anything is sent
        wanted = set(ids)
        reply = await self._ask(peer, request)
        try:
            if reply.similarities or len({s.item_id for s in reply.items}) != len(reply.items):
                raise PeerError("a fetch answered with similarities or an item twice",
                                reason="malformed")
            out = []
            for signed in reply.items:
                if signed.item_id not in wanted:
                    raise PeerError(f"asked for {len(wanted)} items, got {signed.item_id[:12]}"
                                    ", not one of them", reason="tampered")
                item = verify_item(signed, author=announce.author if announce else None)
                if announce and (item.domain, item.created) != (announce.domain,
                                                                announce.created):
                    raise PeerError(f"item {item.id[:12]} is not what was announced",
                                    reason="misannounced")
                out.append((item, signed))
            return out
        except PeerError as exc:
            self.node.offence(peer, exc.reason, f"memory fetch: {exc}")
            raise

    async def search_remote(self, peer: str, query: str, k: int,
                            domain: str | None = None) -> list[Found]:
        """`peer`'s `k` nearest items to `query`, verified, in its order. Raises
        PeerError (counted against `peer`; a bad query of ours is a WireError before
        anything is sent), RemoteError or Unreachable."""
        request = MemoryRequest.searching(query, k, domain)
        request.check()
        reply = await self._ask(peer, request)
        try:
            if len(reply.items) > k or len(reply.similarities) != len(reply.items) or \
                    len({s.item_id for s in reply.items}) != len(reply.items):
                raise PeerError(f"a search for {k} answered with {len(reply.items)} items, "
                                f"{len(reply.similarities)} similarities", reason="malformed")
            out = []
            for signed, similarity in zip(reply.items, reply.similarities, strict=True):
                item = verify_item(signed)
                if domain and item.domain != domain:
                    raise PeerError(f"a search in {domain} answered with an item of "
                                    f"{item.domain}", reason="wrong_domain")
                out.append(Found(item, signed, similarity))
            return out
        except PeerError as exc:
            self.node.offence(peer, exc.reason, f"memory search: {exc}")
            raise

    async def _ask(self, peer: str, request: MemoryRequest) -> MemoryReply:
        """One exchange, never more at once with `peer` than it serves (it refuses the
        excess as busy)."""
        calls = self._calls.setdefault(peer, trio.Semaphore(MEMORY.max_concurrent_per_peer))
        try:
            async with calls:
                reply: MemoryReply = await call(self.node.host, peer, MEMORY, request,
                                                self.fetch_timeout_s,
                                                dial=self.node.new_stream)
            reply.check()
            return reply
        except RemoteError:
            raise
        except PeerError as exc:
            self.node.offence(peer, exc.reason, f"memory reply: {exc}")
            raise
        except Exception as exc:  # a dial fails in many ways; all mean no answer
            raise Unreachable(peer, f"no memory reply from {peer}: {exc!r:.200}") from None
        finally:
            if calls.value == MEMORY.max_concurrent_per_peer and \
                    not calls.statistics().tasks_waiting:
                self._calls.pop(peer, None)  # idle: forget it

    # ---- authors -------------------------------------------------------------------------

    def report(self, author: str, admitted: bool) -> None:
        """Admission's verdict on an item by `author` it got from a peer."""
        blocked = self.authors.report(author, admitted, self.clock())
        if admitted or author == self.node.peer_id:
            return
        self.node.offence(author, "harmful_memory", "an item of theirs failed our replay"
                          + (f"; not fetched from for {self.authors.backoff_s:.0f} s"
                             if blocked else ""))
