"""The ledger's gossip service: our own entry, gossip, sync, expiry and the SQLite store.

It keeps the book (book.py) current on a running node:
- our own entry, built from every started service's `entry_fields()` (service.py),
  signed, re-published every heartbeat and at once on `refresh()`;
- other peers' entries from gossip (topic `peerd/ledger/1`, checked in the topic
  validator before they travel on) and from snapshots pulled over
  `/peerd/ledger-sync/1.0.0`: from every peer we connect to (a hook on the node's
  connections) and from one random neighbour every half heartbeat (anti-entropy);
- expiry, and the store (store.py): changed entries are written off the event loop
  every second and at shutdown, so a restarted peer starts warm.

It also tells the node whom to dial (the addresses in the book) and serves `/ledger`
and `/peers` in the local API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import psutil
import trio
from libp2p.peer.id import ID
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd import __version__
from peerd.api.ledger import routes
from peerd.datadir import LEDGER_DB
from peerd.ledger.book import (
    Accepted,
    EntryTooLarge,
    Ledger,
    LedgerReject,
    sign_entry,
    verify_entry,
)
from peerd.ledger.store import LedgerStore
from peerd.node import Node
from peerd.rpc import call, stream_handler
from peerd.service import EntryFields, Service
from protocols import ledger as wire
from protocols.codec import decode, encode
from protocols.errors import PeerError, WireError
from protocols.ledger import Hardware, LedgerEntry, Load, SignedEntry, SyncRequest, SyncResponse

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
LEAVE_TIMEOUT_S = 0.5  # unsubscribing from gossip at shutdown, politely


class LedgerGossip(Service):
    """The capability ledger on a running node. Opening it opens (and checks) the store:
    a corrupt database raises `LedgerStoreError` here, before anything runs."""

    name = "ledger"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.book = Ledger()
        self.store = LedgerStore(node.config.data_dir / LEDGER_DB)
        self._seq = 0
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        self._publish_now = trio.Event()

    # ---- our own entry -------------------------------------------------------------

    def refresh(self) -> LedgerEntry:
        """Re-sign our entry from what every service says now and gossip it at once.
        An entry over MAX_ENTRY_BYTES goes out without our reputation reports (the part
        others can best do without); if it is still too large, EntryTooLarge, and the
        last entry stands."""
        entry = self._own_entry()
        try:
            entry.check()
        except WireError as exc:  # no peer would take it: our bug (a service's fields)
            raise ValueError(f"our own ledger entry is invalid: {exc}") from None
        try:
            signed = sign_entry(entry, self.node.key_pair.private_key)
        except EntryTooLarge as exc:
            log.warning("%s: signing it without our reputation reports", exc)
            entry = replace(entry, reputation={})
            signed = sign_entry(entry, self.node.key_pair.private_key)
        self._merge(signed, source=self.node.peer_id, origin="self")
        self._publish_now.set()
        return entry

    def republish(self) -> None:
        """`refresh`, for a service that changed its fields and has nothing to undo if
        they do not make a valid entry: that is logged (our bug), the last entry stands,
        and the service goes on."""
        try:
            self.refresh()
        except ValueError:
            log.exception("our ledger entry cannot be re-signed")

    def _own_entry(self) -> LedgerEntry:
        fields = self._service_fields()
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        node = self.node
        return LedgerEntry(
            peer_id=node.peer_id,
            seq=self._seq,
            timestamp=time.time(),
            ttl_s=node.config.ttl_s,
            name=node.name,
            addrs=tuple(a for a in node.addrs() if len(a) <= wire.MAX_ADDR_CHARS
                        )[:wire.MAX_ADDRS],
            hardware=fields.get("hardware") or Hardware(
                device="cpu", memory_bytes=int(psutil.virtual_memory().available),
                cpu_count=os.cpu_count() or 0),
            models=fields.get("models", ()),
            skills=fields.get("skills", ()),
            load=replace(fields.get("load", Load()),
                         cpu_percent=psutil.cpu_percent(interval=None)),
            reputation=dict(fields.get("reputation", {})),
            software=f"peerd/{__version__}",
            features=fields.get("features", ()),
            weights_http_port=fields.get("weights_http_port", 0),
            tools=fields.get("tools", ()),
        )

    def _service_fields(self) -> EntryFields:
        """The fields of every service the node holds. A field has one owner: a second
        service that claims it is our bug, logged, and the first owner's value stands."""
        merged: EntryFields = {}
        features: list[str] = []
        owners: dict[str, str] = {}
        for service in self.node.services:
            fields = service.entry_fields()
            features.extend(f for f in fields.pop("features", ()) if f not in features)
            for key in fields:
                if key in owners:
                    log.error("services %s and %s both set the ledger field %r",
                              owners[key], service.name, key)
                    continue
                owners[key] = service.name
                merged[key] = fields[key]  # type: ignore[literal-required]
        merged["features"] = tuple(features)
        return merged

    # ---- merging ------------------------------------------------------------------

    def _keep(self) -> set[str]:
        """The entries a full book never evicts: ours, and those of the peers we are
        connected to (a live connection proves the peer exists)."""
        return {self.node.peer_id, *self.node.connected_peers()}

    def _merge(self, signed: SignedEntry, *, source: str, origin: str,
               keep: set[str] | None = None) -> bool:
        """Offer one entry to the book; True when it was new. Never raises PeerError."""
        try:
            outcome = self.book.offer(signed, time.time(),
                                      self._keep() if keep is None else keep)
        except LedgerReject as exc:
            if exc.reason in ("stale_seq", "expired", "book_full"):
                # A snapshot (or a gossip copy that raced ours) may honestly carry an
                # older entry of a third peer; the gossip validator catches replays.
                # A full book is no one's fault.
                self.node.metrics.rejections.labels(
                    "book_full" if exc.reason == "book_full" else "late_copy").inc()
            else:
                self._reject(source, exc.reason, str(exc), origin)
            return False
        if not isinstance(outcome, Accepted):
            return False
        entry = outcome.entry
        for gone in outcome.evicted:
            self._forget(gone, "ledger.evicted")
        self._dirty.add(entry.peer_id)
        self._removed.discard(entry.peer_id)
        self.node.metrics.ledger_entries.set(len(self.book))
        if entry.peer_id != self.node.peer_id:
            self.node.events.publish(
                "ledger.accepted", peer_id=entry.peer_id, name=entry.name, seq=entry.seq,
                via=origin, source=source, new=outcome.previous is None,
                changed=_capabilities_changed(outcome.previous, entry),
            )
        return True

    def _reject(self, source: str, reason: str, detail: str, via: str, *,
                offence: bool = True) -> None:
        self.node.metrics.rejections.labels(reason).inc()
        if offence:
            self.node.tally(source, reason)
        self.node.events.publish("ledger.rejected", peer_id=source, reason=reason,
                                 detail=detail[:300], via=via)
        log.info("ledger entry from %s refused (%s): %s", source, reason, detail)

    # ---- the service ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        node = self.node
        try:
            await trio.to_thread.run_sync(self._load)
            node.pubsub.set_topic_validator(wire.TOPIC, self._validate_gossip, False)
            node.set_stream_handler(wire.SYNC.id,
                                    stream_handler(wire.SYNC, self._serve_sync, node.offence))
            node.add_dial_source(self._dial_candidates)
            node.on_connect(self._pull_snapshot)
            subscription = await node.pubsub.subscribe(wire.TOPIC)
            self.refresh()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._gossip_intake, subscription)
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._expiry_loop)
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._anti_entropy_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(LEAVE_TIMEOUT_S), contextlib.suppress(Exception):
                    await node.pubsub.unsubscribe(wire.TOPIC)  # leave gossip politely
                await trio.to_thread.run_sync(self._close)

    def _load(self) -> None:
        """Warm start (worker thread): every stored entry re-verified; never our own old
        entry, which we re-sign fresh."""
        self.store.load_into(self.book, time.time(), on_reject=lambda reason:
                             self.node.metrics.rejections.labels(reason).inc())
        self.book.remove(self.node.peer_id)
        self.node.metrics.ledger_entries.set(len(self.book))

    def _close(self) -> None:
        """Shutdown (worker thread): the last changes to SQLite, then close it."""
        try:
            self._write(*self._take_changes())
        except Exception:
            log.warning("flushing the ledger at shutdown failed", exc_info=True)
        finally:
            self.store.close()

    def status(self) -> dict[str, Any]:
        return {"ledger_size": len(self.book), "seq": self._seq}

    def routes(self) -> Sequence[BaseRoute]:
        return routes(self)

    # ---- gossip -------------------------------------------------------------------

    async def _gossip_intake(self, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            source = str(ID(msg.from_id)) if msg.from_id else "unknown"
            self.node.metrics.messages.labels("in", "ledger.gossip").inc()
            if source == self.node.peer_id:
                continue
            try:
                signed = decode(msg.data, SignedEntry)
            except WireError as exc:  # the validator already refused these; be safe
                self.node.offence(source, exc.reason, str(exc))
                continue
            self._merge(signed, source=source, origin="gossip")

    def _validate_gossip(self, forwarder: Any, msg: Any) -> bool:
        """Topic validator: must never raise (LIBP2P_NOTES.md trap 2).

        Only authentic, current entries travel on. Honest peers publish only their own
        entry, so an entry published by another peer (strict signing authenticates the
        publisher) that is stale or expired is a deliberate replay: an offence. The
        author's own late copies are gossip's normal catch-up: dropped quietly.
        """
        try:
            publisher = str(ID(msg.from_id)) if msg.from_id else str(forwarder)
            if len(msg.data) > wire.MAX_ENTRY_BYTES + 1024:
                self.node.offence(publisher, "oversized", f"{len(msg.data)} byte gossip message")
                return False
            signed = decode(msg.data, SignedEntry)
            try:
                entry = verify_entry(signed)
            except LedgerReject as exc:
                self._reject(publisher, exc.reason, str(exc), "gossip", offence=True)
                return False
            own = publisher == entry.peer_id
            held = self.book.get(entry.peer_id)
            if held is not None and entry.seq < held.seq:
                if own:
                    self.node.metrics.rejections.labels("late_copy").inc()
                else:
                    self._reject(publisher, "stale_seq", f"replay of {entry.peer_id}'s "
                                 f"seq {entry.seq} (we hold {held.seq})", "gossip")
                return False
            if entry.expires_at <= time.time():
                self._reject(publisher, "expired", f"entry of {entry.peer_id} expired",
                             "gossip", offence=not own)
                return False
            if not self.book.has_room(entry.peer_id, len(signed.body), self._keep()):
                self.node.metrics.rejections.labels("book_full").inc()
                return False  # not passed on either: no one's fault
            return True
        except PeerError as exc:
            self.node.offence(str(forwarder), exc.reason, str(exc))
            return False
        except Exception:
            log.exception("gossip validator failed")
            return False

    async def _heartbeat(self) -> None:
        heartbeat_s = self.node.config.heartbeat_s
        while True:
            entry = self.book.get(self.node.peer_id)
            if entry is None or time.time() - entry.timestamp >= heartbeat_s:
                self.republish()
            if self._publish_now.is_set():
                self._publish_now = trio.Event()
                await self._publish_own()
            with trio.move_on_after(heartbeat_s):
                await self._publish_now.wait()

    async def _publish_own(self) -> None:
        signed = self.book.signed(self.node.peer_id)
        if signed is None:
            return
        try:
            await self.node.pubsub.publish(wire.TOPIC, encode(signed))
            self.node.metrics.messages.labels("out", "ledger.gossip").inc()
        except Exception:
            log.warning("publishing our ledger entry failed", exc_info=True)

    async def _expiry_loop(self) -> None:
        while True:
            await trio.sleep(min(1.0, self.node.config.heartbeat_s / 4))
            for entry in self.book.expire(time.time()):
                self._forget(entry, "ledger.expired")
            self.node.metrics.ledger_entries.set(len(self.book))

    def _forget(self, entry: LedgerEntry, event: str) -> None:
        """An entry left the book (expired, or evicted from a full one): out of the store."""
        self._removed.add(entry.peer_id)
        self._dirty.discard(entry.peer_id)
        self.node.events.publish(event, peer_id=entry.peer_id, name=entry.name)

    # ---- sync ---------------------------------------------------------------------

    async def _anti_entropy_loop(self) -> None:
        """Every half heartbeat, pull the ledger from one random neighbour.

        Gossip is fast but lossy under load; this push-pull backstop keeps every
        ledger converging (and refreshed before entries expire) regardless."""
        rng = random.Random()
        while True:
            await trio.sleep(max(0.5, self.node.config.heartbeat_s / 2))
            peers = self.node.connected_peers()
            if peers:
                await self._pull_snapshot(rng.choice(peers))

    async def _pull_snapshot(self, pid: str) -> None:
        """Late-joiner sync: pull the peer's whole ledger over /peerd/ledger-sync. Both
        sides of a new connection do, so each learns the other's entry in a round trip."""
        try:
            response: SyncResponse = await call(self.node.host, pid, wire.SYNC, SyncRequest())
        except PeerError as exc:
            self.node.offence(pid, exc.reason, f"ledger sync reply: {exc}")
            return
        except Exception as exc:
            log.debug("ledger sync from %s failed: %r", pid, exc)
            return
        self.node.metrics.messages.labels("in", "ledger.sync").inc()
        keep = self._keep()
        for signed in response.entries:
            self._merge(signed, source=pid, origin="sync", keep=keep)

    async def _serve_sync(self, peer: str, request: SyncRequest) -> SyncResponse:
        self.node.metrics.messages.labels("out", "ledger.sync").inc()
        budget = wire.SYNC.max_response_bytes - 4096  # room for framing and map overhead
        entries = []
        for signed in self.book.signed_entries()[: wire.MAX_SNAPSHOT_ENTRIES]:
            budget -= len(signed.body) + len(signed.sig) + 32
            if budget < 0:
                break
            entries.append(signed)
        return SyncResponse(entries=tuple(entries))

    def _dial_candidates(self) -> Iterator[tuple[str, list[str]]]:
        """Every peer in the book, at the addresses it advertises."""
        for e in self.book.entries():
            yield e.peer_id, [a if "/p2p/" in a else f"{a}/p2p/{e.peer_id}" for a in e.addrs]

    # ---- the store ----------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL_S)
            if self._dirty or self._removed:
                try:
                    await trio.to_thread.run_sync(self._write, *self._take_changes())
                except Exception:  # the store is a cache of the book: serve on without it
                    log.exception("writing the ledger to %s failed", self.store.path)

    def _take_changes(self) -> tuple[list[tuple[LedgerEntry, SignedEntry]], set[str]]:
        """Changed entries since the last flush, collected on the event loop."""
        dirty, self._dirty = self._dirty, set()
        removed, self._removed = self._removed, set()
        items = []
        for pid in dirty:
            entry, signed = self.book.get(pid), self.book.signed(pid)
            if entry is not None and signed is not None:
                items.append((entry, signed))
        return items, removed

    def _write(self, items: list[tuple[LedgerEntry, SignedEntry]], removed: set[str]) -> None:
        self.store.save(items)
        self.store.delete(removed)

    # ---- views (the API) ------------------------------------------------------------

    def ledger_view(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for e in self.book.entries():
            row = e.to_wire()
            row.pop("t", None)
            row.pop("v", None)
            row["expires_in_s"] = round(e.expires_at - now, 3)
            row["received_at"] = self.book.received_at(e.peer_id)
            row["self"] = e.peer_id == self.node.peer_id
            out.append(row)
        return out

    def peers_view(self) -> list[dict[str, Any]]:
        """The node's connected peers, named as the book knows them."""
        out = []
        for row in self.node.peers():
            entry = self.book.get(row["peer_id"])
            out.append({"peer_id": row["peer_id"], "name": entry.name if entry else "",
                        "addrs": list(entry.addrs) if entry else [],
                        **{k: v for k, v in row.items() if k != "peer_id"}})
        return out


def _capabilities_changed(old: LedgerEntry | None, new: LedgerEntry) -> bool:
    if old is None:
        return True
    keep = {"seq": 0, "timestamp": 0.0, "load": Load(), "hardware": Hardware()}
    return replace(old, **keep) != replace(new, **keep)  # type: ignore[arg-type]
