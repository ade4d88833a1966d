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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.peer.id import ID

from peerd.agents.sealing import unseal
from peerd.node import Node
from protocols.codec import decode, encode
from protocols.errors import PeerError
from protocols.weights import MAX_GOSSIP_BYTES, TOPIC, Have, SignedAnnounce, VersionAnnounce

log = logging.getLogger(__name__)

MAX_HOLDERS_TRACKED = 256  # versions whose holders we remember
AnnounceHook = Callable[[VersionAnnounce], Awaitable[None]]


class Announcements:
    def __init__(self, node: Node, announce_s: float,
                 on_have: Callable[[Have], None] = lambda have: None) -> None:
        self.node = node
        self.announce_s = announce_s
        self.on_have = on_have  # a holder heard of a run we follow
        self.following: dict[str, str | None] = {}  # run -> trainer (None: first heard)
        self.announced: dict[str, tuple[VersionAnnounce, SignedAnnounce]] = {}  # newest
        self.hooks: list[AnnounceHook] = []
        self._holders: dict[bytes, dict[str, float]] = {}  # manifest hash -> peer -> seen

    def follow(self, run_id: str, trainer: str | None = None) -> None:
        self.following[run_id] = trainer

    def latest(self, run_id: str) -> VersionAnnounce | None:
        got = self.announced.get(run_id)
        return got[0] if got else None

    def holders(self, manifest_hash: bytes) -> list[str]:
        cutoff = time.monotonic() - 3 * self.announce_s
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
        self._holders.setdefault(have.manifest_hash, {})[have.holder] = time.monotonic()
        while len(self._holders) > MAX_HOLDERS_TRACKED:
            del self._holders[next(iter(self._holders))]
        self.on_have(have)

    def _heard_announce(self, signed: SignedAnnounce, nursery: trio.Nursery) -> None:
        announce = self.verify(signed)
        run = announce.run_id
        if run not in self.following or announce.author == self.node.peer_id:
            return
        if self.following[run] is None:
            self.following[run] = announce.author  # the first author heard
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
