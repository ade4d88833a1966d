"""The runs a peer follows, on gossip topic `peerd/weights/1`: which versions their
trainers announced, and who holds them.

Whom to follow is the receiver's choice: it acts only on announcements of the runs it
`follow`s, and only on those authored by the trainer it names (or, when it names none,
by the first author it hears after following). A `SignedAnnounce` carries its author's
own signature, checked before anything else looks at it, so it can be relayed (and
re-served with the manifest) by anyone. Announcements of runs we do not follow travel
on when their signature checks; older versions than the newest we know are dropped
quietly (honest late copies are common). A `Have` must be published by its holder
(pubsub's strict signing authenticates the publisher); holders are soft state,
forgotten three re-announce periods after they were last heard.

What a remote peer can make us remember is bounded. Holders are kept only for the
versions a followed run's trainer announced (its newest MAX_VERSIONS_KNOWN, `know`):
anyone can name a manifest hash in a Have, and made-up ones used to push the real
version's holders out. A Have of a hash not announced (yet: gossip can overtake the
announcement) is held apart, for MAX_EARLY_HASHES hashes at most, and counts once its
announcement comes. A version's holders are capped
(MAX_HOLDERS_PER_VERSION, `admit_holder`): anyone can relay Haves signed by fresh keys,
so the stale leave as each one comes, a newcomer pushes out the stalest, and never a
holder we are connected to. A followed run unheard for FOLLOW_IDLE_S (no announcement
by its trainer, no request naming it) is forgotten (`idle`), unless we author it and
train it still: its trainer is gone, and a request that names it again follows it
again. A run of ours that ended (`retired`) goes the same way once nobody asks for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
from libp2p.peer.id import ID

from peerd.agents.sealing import unseal
from peerd.node import Node
from protocols.codec import decode, encode
from protocols.errors import PeerError
from protocols.weights import MAX_GOSSIP_BYTES, TOPIC, Have, SignedAnnounce, VersionAnnounce

log = logging.getLogger(__name__)

MAX_VERSIONS_KNOWN = 8  # a followed run's newest announced versions, whose holders we keep
MAX_HOLDERS_PER_VERSION = 64  # a pull asks a handful at a time; more only cost memory
MAX_EARLY_HASHES = 16  # hashes named in Haves before their announcement, held apart
# A run's trainer re-announces every announce_s while it lives, so a run unheard this
# long has none; long, because forgetting the run we follow costs a fresh pull.
FOLLOW_IDLE_S = 600.0
AnnounceHook = Callable[[VersionAnnounce], Awaitable[None]]


class Announcements:
    def __init__(self, node: Node, announce_s: float,
                 on_have: Callable[[Have], None] = lambda have: None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.announce_s = announce_s
        self.on_have = on_have  # a holder heard of a run we follow
        self.clock = clock
        self.following: dict[str, str | None] = {}  # run -> trainer (None: first heard)
        self.heard: dict[str, float] = {}  # followed run -> last heard of (clock)
        self.announced: dict[str, tuple[VersionAnnounce, SignedAnnounce]] = {}  # newest
        self.retired: set[str] = set()  # runs we author that ended (`idle` may take them)
        self.hooks: list[AnnounceHook] = []
        # followed run -> the manifest hashes its trainer announced -> their versions
        self.versions: dict[str, dict[bytes, int]] = {}
        self._holders: dict[bytes, dict[str, float]] = {}  # known hash -> peer -> seen
        # a hash not announced (yet) -> (the run its Haves name, peer -> seen)
        self._early: dict[bytes, tuple[str, dict[str, float]]] = {}

    def follow(self, run_id: str, trainer: str | None = None) -> None:
        self.following[run_id] = trainer
        self.heard[run_id] = self.clock()

    def touch(self, run_id: str) -> None:
        """`run_id` was heard of (asked for, pulled): not idle. Follows nothing new."""
        if run_id in self.following:
            self.heard[run_id] = self.clock()

    def forget(self, run_id: str) -> None:
        """Follow `run_id` no more; forget its announcements and its holders."""
        self.following.pop(run_id, None)
        self.heard.pop(run_id, None)
        self.retired.discard(run_id)
        self.announced.pop(run_id, None)
        for key in self.versions.pop(run_id, {}):
            self._holders.pop(key, None)
        for key in [k for k, (run, _) in self._early.items() if run == run_id]:
            del self._early[key]

    def know(self, announce: VersionAnnounce) -> None:
        """`announce` verified (signed by its run's trainer): its holders are kept, among
        the run's newest MAX_VERSIONS_KNOWN versions; those heard of early count now."""
        run, key = announce.run_id, announce.manifest_hash
        if run not in self.following:
            return
        known = self.versions.setdefault(run, {})
        known[key] = announce.version
        if len(known) > MAX_VERSIONS_KNOWN:
            oldest = min(known, key=known.__getitem__)
            del known[oldest]
            self._holders.pop(oldest, None)
        early = self._early.pop(key, None)
        if key in known and early is not None and early[0] == run:
            self._holders.setdefault(key, early[1])

    def idle(self, idle_s: float) -> list[str]:
        """The followed runs not heard of for `idle_s`, but those we author and
        train still."""
        cutoff = self.clock() - idle_s
        return [run for run in self.following
                if self.heard.get(run, cutoff) <= cutoff
                and (run in self.retired or not self._authored(run))]

    def _authored(self, run_id: str) -> bool:
        got = self.announced.get(run_id)
        return got is not None and got[0].author == self.node.peer_id

    def latest(self, run_id: str) -> VersionAnnounce | None:
        got = self.announced.get(run_id)
        return got[0] if got else None

    def holders(self, manifest_hash: bytes) -> list[str]:
        cutoff = self.clock() - 3 * self.announce_s
        return [p for p, seen in self._holders.get(manifest_hash, {}).items() if seen >= cutoff]

    def verify(self, signed: SignedAnnounce) -> VersionAnnounce:
        """The announcement, once its signature, values and author check out (the run's
        trainer, when we follow the run and know it). Raises PeerError."""
        announce = unseal(signed.body, signed.sig, VersionAnnounce, lambda a: a.author)
        announce.check(time.time())
        trainer = self.following.get(announce.run_id)
        if trainer is not None and announce.author != trainer:
            raise PeerError(f"{announce.author} is not the trainer of {announce.run_id}",
                            reason="not_trainer")
        return announce

    async def publish(self, item: SignedAnnounce | Have) -> None:
        try:
            await self.node.pubsub.publish(TOPIC, encode(item))
        except Exception:
            log.warning("publishing %s failed", type(item).__name__, exc_info=True)

    def validate(self, forwarder: Any, msg: Any) -> bool:
        """Topic validator: must never raise (LIBP2P_NOTES.md trap 2)."""
        publisher = str(forwarder)
        try:
            publisher = str(ID(msg.from_id)) if msg.from_id else publisher
            if len(msg.data) > MAX_GOSSIP_BYTES:
                raise PeerError(f"{len(msg.data)} byte weights gossip", reason="oversized")
            item = decode(msg.data, SignedAnnounce, Have)
            if isinstance(item, Have):
                item.check(time.time())
                if item.holder != publisher:
                    raise PeerError(f"a Have of {item.holder} published by {publisher}",
                                    reason="impersonation")
                return True
            announce = self.verify(item)
            newest = self.latest(announce.run_id)
            if newest is not None and (announce.version, announce.timestamp) < (
                    newest.version, newest.timestamp):
                self.node.metrics.rejections.labels("stale_announce").inc()
                return False
            return True
        except PeerError as exc:
            self.node.offence(publisher, exc.reason, f"weights gossip: {exc}")
            return False
        except Exception:
            log.exception("weights gossip validator failed")
            return False

    async def intake(self, subscription: Any) -> None:
        """What the validator passed, until cancelled; hooks run in a nursery of ours."""
        async with trio.open_nursery() as nursery:
            while True:
                msg = await subscription.get()
                try:
                    item = decode(msg.data, SignedAnnounce, Have)
                    if isinstance(item, Have):
                        self._heard_have(item)
                    else:
                        self._heard_announce(item, nursery)
                except PeerError:
                    continue

    def _heard_have(self, have: Have) -> None:
        if have.holder == self.node.peer_id or have.run_id not in self.following:
            return
        key = have.manifest_hash
        if key not in self.versions.get(have.run_id, {}):  # not announced (yet)
            run, early = self._early.pop(key, (have.run_id, {}))
            self._early[key] = (have.run_id, admit_holder(
                early if run == have.run_id else {}, have.holder, self.clock(),
                3 * self.announce_s, MAX_HOLDERS_PER_VERSION, self.node.link_up))
            while len(self._early) > MAX_EARLY_HASHES:  # the least recently heard go
                del self._early[next(iter(self._early))]
            return
        holders = self._holders[key] = admit_holder(
            self._holders.get(key, {}), have.holder, self.clock(), 3 * self.announce_s,
            MAX_HOLDERS_PER_VERSION, self.node.link_up)
        if have.holder in holders:  # (no room: not one a pull should ask either)
            self.on_have(have)

    def _heard_announce(self, signed: SignedAnnounce, nursery: trio.Nursery) -> None:
        announce = self.verify(signed)
        run = announce.run_id
        if run not in self.following or announce.author == self.node.peer_id:
            return
        if self.following[run] is None:
            self.following[run] = announce.author  # the first author heard
        self.touch(run)  # by its trainer (verify), re-announcements too: the run lives
        self.know(announce)
        newest = self.latest(run)
        if newest is not None and announce.version <= newest.version:
            return
        self.announced[run] = (announce, signed)
        self.node.events.publish("weights.announced", run_id=run, version=announce.version,
                                 author=announce.author, kind=announce.kind)
        for hook in self.hooks:
            nursery.start_soon(self._run_hook, hook, announce)

    async def _run_hook(self, hook: AnnounceHook, announce: VersionAnnounce) -> None:
        try:
            await hook(announce)
        except Exception:
            log.exception("a weights announcement hook failed (%s v%d)", announce.run_id,
                          announce.version)


def admit_holder(holders: Mapping[str, float], holder: str, now: float, max_age_s: float,
                 cap: int, kept: Callable[[str], bool]) -> dict[str, float]:
    """A version's holders (peer -> last heard) once `holder` is heard at `now`: those
    heard within `max_age_s`, at most `cap`. A newcomer takes the place of the stalest
    holder not `kept` (one we are connected to, which a stranger minting keys cannot
    push out), and finds no room when every one is."""
    cutoff = now - max_age_s
    fresh = {p: seen for p, seen in holders.items() if seen >= cutoff}
    if holder not in fresh and len(fresh) >= cap:
        stalest = [p for _, p in sorted((seen, p) for p, seen in fresh.items())]
        victim = next((p for p in stalest if not kept(p)), None)
        if victim is None:
            return fresh
        del fresh[victim]
    fresh[holder] = now
    return fresh
