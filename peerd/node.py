"""Node: the libp2p host, gossip, the capability ledger and the services around them.

`open_node(config, key)` is an async context manager. It enters the host, Pubsub and
GossipSub with one AsyncExitStack in the calling task and leaves them in reverse
order (LIBP2P_NOTES.md trap 5), then runs the node's own services in a nursery it
owns: heartbeat, gossip intake, expiry, connectivity, RTT probes, peerstore clean-up
and store flushes. Leaving the context cancels them, flushes the ledger and closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import multiaddr
import psutil
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from peerd import __version__
from peerd.config import Config
from peerd.events import EventBus
from peerd.ledger.book import Accepted, Ledger, LedgerReject, sign_entry, verify_entry
from peerd.ledger.store import LedgerStore
from peerd.loopback import loopback_pair
from peerd.metrics import Metrics
from peerd.rpc import call, stream_handler
from protocols import ledger as wire
from protocols.codec import decode, encode
from protocols.errors import PeerError, WireError
from protocols.ledger import (
    Hardware,
    LedgerEntry,
    Load,
    ModelServed,
    SignedEntry,
    SyncRequest,
    SyncResponse,
)
from protocols.task import FEATURES as TASK_FEATURES

log = logging.getLogger(__name__)

GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
LEDGER_DB = "ledger.sqlite"
DIAL_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 3.0
PING_INTERVAL_S = 8.0  # under the 10 s after which the remote idles a ping stream out
SYNC_INTERVAL_S = 30.0  # don't re-pull a snapshot from the same peer more often
MAX_DIAL_BACKOFF_S = 60.0
MAX_OFFENDERS_TRACKED = 4096
CONNECT_SETTLE_S = 0.5


class Node:
    """A running peer. Create with `open_node`; all methods run on the trio loop."""

    def __init__(self, config: Config, key_pair: KeyPair, host: Any, pubsub: Pubsub) -> None:
        self.config = config
        self.key_pair = key_pair
        self.host = host
        self.pubsub = pubsub
        self.peer_id = str(host.get_id())
        self.name = config.name or self.peer_id[-8:]
        self.started_at = time.time()
        self.events = EventBus()
        self.metrics = Metrics()
        self.ledger = Ledger()
        self.store = LedgerStore(config.data_dir / LEDGER_DB)
        self.offences: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.rtt_ms: dict[str, float] = {}
        self._skills = tuple(config.skills)
        # optional wire fields we understand, told to others in our ledger entry
        self.features: tuple[str, ...] = TASK_FEATURES
        self._models: tuple[ModelServed, ...] = ()
        self._accelerator: Hardware | None = None  # set when a model runs on one
        self._load = Load()
        self._reputation: dict[str, float] = {}
        self._seq = 0
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        self._synced_at: dict[str, float] = {}
        self._dial_backoff: dict[str, tuple[float, float]] = {}  # peer -> (next try, delay)
        self._ping_streams: dict[str, Any] = {}
        self._handlers: dict[str, Any] = {}
        self._publish_now = trio.Event()
        self._connected_peers: trio.MemorySendChannel[str]
        self._nursery: trio.Nursery | None = None

    # ---- queries (used by the API) -------------------------------------------------

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def connected_peers(self) -> list[str]:
        return sorted(str(p) for p in self.host.get_network().connections)

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "addrs": self.addrs(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "peers": len(self.connected_peers()),
            "ledger_size": len(self.ledger),
            "seq": self._seq,
            "skills": list(self._skills),
            "version": __version__,
            "data_dir": str(self.config.data_dir),
        }

    def peers(self) -> list[dict[str, Any]]:
        out = []
        for pid in self.connected_peers():
            entry = self.ledger.get(pid)
            conns = self.host.get_network().connections.get(ID.from_base58(pid), [])
            out.append({
                "peer_id": pid,
                "name": entry.name if entry else "",
                "addrs": list(entry.addrs) if entry else [],
                "rtt_ms": round(self.rtt_ms[pid], 3) if pid in self.rtt_ms else None,
                "connections": len(conns),
                "offences": sum(self.offences[pid].values()) if pid in self.offences else 0,
            })
        return out

    def ledger_view(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for e in self.ledger.entries():
            row = e.to_wire()
            row.pop("t", None)
            row.pop("v", None)
            row["expires_in_s"] = round(e.expires_at - now, 3)
            row["received_at"] = self.ledger.received_at(e.peer_id)
            row["self"] = e.peer_id == self.peer_id
            out.append(row)
        return out

    # ---- changes -------------------------------------------------------------------

    def set_skills(self, skills: list[str]) -> LedgerEntry:
        """Change our advertised skills; the new entry goes out on gossip at once."""
        self._skills = tuple(skills)
        return self._refresh_own_entry()

    def set_models(self, models: tuple[ModelServed, ...]) -> LedgerEntry:
        """Change the model spans we advertise; gossiped at once."""
        self._models = models
        return self._refresh_own_entry()

    def set_accelerator(self, device: str, name: str, memory_bytes: int) -> None:
        """Advertise the accelerator a model runs on (from the next entry on)."""
        self._accelerator = Hardware(device=device, memory_bytes=memory_bytes,
                                     cpu_count=os.cpu_count() or 0, accelerator=name)

    def set_load(self, sessions: int, queue: int) -> None:
        """Recorded for the next heartbeat (load changes too often to gossip each)."""
        self._load = Load(sessions=sessions, queue=queue)

    def set_reputation(self, scores: dict[str, float]) -> None:
        """Our observations of other peers (Symphony), published from the next heartbeat."""
        self._reputation = {p: s for p, s in scores.items() if p != self.peer_id}

    def set_stream_handler(self, protocol: str, handler: Any) -> None:
        """Serve `protocol` to other peers and to ourselves (see `new_stream`)."""
        self._handlers[protocol] = handler
        self.host.set_stream_handler(TProtocol(protocol), handler)

    async def new_stream(self, peer_id: str, protocol: str) -> Any:
        """A stream to `peer_id` speaking `protocol`; to ourselves, an in-process one."""
        if peer_id == self.peer_id:
            handler = self._handlers.get(protocol)
            if handler is None:
                raise ConnectionRefusedError(f"this peer does not serve {protocol}")
            ours, theirs = loopback_pair(self.peer_id)
            self.nursery.start_soon(handler, theirs)
            return ours
        return await self.host.new_stream(ID.from_base58(peer_id), [TProtocol(protocol)])

    @property
    def nursery(self) -> trio.Nursery:
        """The node's own nursery: services attached to the node run their tasks here."""
        assert self._nursery is not None, "node is not running"
        return self._nursery

    def offence(self, peer: str, reason: str, detail: str) -> None:
        """Count input refused from `peer` (metrics, events, per-peer tally)."""
        self._tally(peer, reason)
        self.metrics.rejections.labels(reason).inc()
        log.info("refused input from %s: %s (%s)", peer, reason, detail)
        self.events.publish("peer.offence", peer_id=peer, reason=reason, detail=detail[:300])

    def _tally(self, peer: str, reason: str) -> None:
        if peer not in self.offences and len(self.offences) >= MAX_OFFENDERS_TRACKED:
            del self.offences[next(iter(self.offences))]  # forget the oldest offender
        self.offences[peer][reason] += 1

    # ---- the ledger ----------------------------------------------------------------

    def _own_entry(self) -> LedgerEntry:
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        vm = psutil.virtual_memory()
        return LedgerEntry(
            peer_id=self.peer_id,
            seq=self._seq,
            timestamp=time.time(),
            ttl_s=self.config.ttl_s,
            name=self.name,
            addrs=tuple(self.addrs()),
            hardware=self._accelerator or Hardware(device="cpu", memory_bytes=int(vm.available),
                                                   cpu_count=os.cpu_count() or 0),
            models=self._models,
            skills=self._skills,
            load=replace(self._load, cpu_percent=psutil.cpu_percent(interval=None)),
            reputation=dict(self._reputation),
            software=f"peerd/{__version__}",
            features=self.features,
        )

    def _refresh_own_entry(self) -> LedgerEntry:
        entry = self._own_entry()
        signed = sign_entry(entry, self.key_pair.private_key)
        self._merge(signed, source=self.peer_id, origin="self")
        self._publish_now.set()
        return entry

    def _reject_entry(self, source: str, reason: str, detail: str, via: str, *,
                      offence: bool = True) -> None:
        self.metrics.rejections.labels(reason).inc()
        if offence:
            self._tally(source, reason)
        self.events.publish("ledger.rejected", peer_id=source, reason=reason,
                            detail=detail[:300], via=via)
        log.info("ledger entry from %s refused (%s): %s", source, reason, detail)

    def _merge(self, signed: SignedEntry, *, source: str, origin: str) -> bool:
        """Offer one entry to the ledger; True when it was new. Never raises PeerError."""
        try:
            outcome = self.ledger.offer(signed, time.time())
        except LedgerReject as exc:
            if exc.reason in ("stale_seq", "expired"):
                # A snapshot (or a gossip copy that raced ours) may honestly carry an
                # older entry of a third peer; the gossip validator catches replays.
                self.metrics.rejections.labels("late_copy").inc()
            else:
                self._reject_entry(source, exc.reason, str(exc), origin)
            return False
        if not isinstance(outcome, Accepted):
            return False
        entry = outcome.entry
        self._dirty.add(entry.peer_id)
        self._removed.discard(entry.peer_id)
        self.metrics.ledger_entries.set(len(self.ledger))
        if entry.peer_id != self.peer_id:
            self.events.publish(
                "ledger.accepted", peer_id=entry.peer_id, name=entry.name, seq=entry.seq,
                via=origin, source=source, new=outcome.previous is None,
                changed=_capabilities_changed(outcome.previous, entry),
            )
        return True

    # ---- services ------------------------------------------------------------------

    async def _run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            send, recv = trio.open_memory_channel[str](256)
            self._connected_peers = send
            subscription = await self.pubsub.subscribe(wire.TOPIC)
            nursery.start_soon(self._gossip_intake, subscription)
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._expiry_loop)
            nursery.start_soon(self._flush_loop)
            nursery.start_soon(self._connectivity_loop)
            nursery.start_soon(self._on_connect_loop, recv)
            nursery.start_soon(self._rtt_loop)
            nursery.start_soon(self._anti_entropy_loop)
            nursery.start_soon(self._peerstore_cleanup_loop)
            task_status.started()

    async def _gossip_intake(self, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            source = str(ID(msg.from_id)) if msg.from_id else "unknown"
            self.metrics.messages.labels("in", "ledger.gossip").inc()
            if source == self.peer_id:
                continue
            try:
                signed = decode(msg.data, SignedEntry)
            except WireError as exc:  # the validator already refused these; be safe
                self.offence(source, exc.reason, str(exc))
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
                self.offence(publisher, "oversized", f"{len(msg.data)} byte gossip message")
                return False
            signed = decode(msg.data, SignedEntry)
            try:
                entry = verify_entry(signed)
            except LedgerReject as exc:
                self._reject_entry(publisher, exc.reason, str(exc), "gossip", offence=True)
                return False
            own = publisher == entry.peer_id
            held = self.ledger.get(entry.peer_id)
            if held is not None and entry.seq < held.seq:
                if own:
                    self.metrics.rejections.labels("late_copy").inc()
                else:
                    self._reject_entry(publisher, "stale_seq", f"replay of {entry.peer_id}'s "
                                       f"seq {entry.seq} (we hold {held.seq})", "gossip")
                return False
            if entry.expires_at <= time.time():
                self._reject_entry(publisher, "expired", f"entry of {entry.peer_id} expired",
                                   "gossip", offence=not own)
                return False
            return True
        except PeerError as exc:
            self.offence(str(forwarder), exc.reason, str(exc))
            return False
        except Exception:
            log.exception("gossip validator failed")
            return False

    async def _heartbeat(self) -> None:
        while True:
            entry = self.ledger.get(self.peer_id)
            stale = entry is None or time.time() - entry.timestamp >= self.config.heartbeat_s
            if stale:
                self._refresh_own_entry()
            if self._publish_now.is_set():
                self._publish_now = trio.Event()
                await self._publish_own()
            with trio.move_on_after(self.config.heartbeat_s):
                await self._publish_now.wait()

    async def _publish_own(self) -> None:
        signed = self.ledger.signed(self.peer_id)
        if signed is None:
            return
        try:
            await self.pubsub.publish(wire.TOPIC, encode(signed))
            self.metrics.messages.labels("out", "ledger.gossip").inc()
        except Exception:
            log.warning("publishing our ledger entry failed", exc_info=True)

    async def _expiry_loop(self) -> None:
        while True:
            await trio.sleep(min(1.0, self.config.heartbeat_s / 4))
            for entry in self.ledger.expire(time.time()):
                self._removed.add(entry.peer_id)
                self._dirty.discard(entry.peer_id)
                self.events.publish("ledger.expired", peer_id=entry.peer_id, name=entry.name)
            self.metrics.ledger_entries.set(len(self.ledger))

    async def _flush_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self._dirty or self._removed:
                items, removed = self._take_changes()
                await trio.to_thread.run_sync(self._write, items, removed)

    def _take_changes(self) -> tuple[list[tuple[LedgerEntry, SignedEntry]], set[str]]:
        """Changed entries since the last flush, collected on the event loop."""
        dirty, self._dirty = self._dirty, set()
        removed, self._removed = self._removed, set()
        items = []
        for pid in dirty:
            entry, signed = self.ledger.get(pid), self.ledger.signed(pid)
            if entry is not None and signed is not None:
                items.append((entry, signed))
        return items, removed

    def _write(self, items: list[tuple[LedgerEntry, SignedEntry]], removed: set[str]) -> None:
        self.store.save(items)
        self.store.delete(removed)

    def flush(self) -> None:
        """Write changed entries to SQLite now (at shutdown)."""
        self._write(*self._take_changes())

    # -- connectivity

    async def _connectivity_loop(self) -> None:
        await trio.sleep(0.05)
        while True:
            await self._fill_connections()
            self._repair_gossip_streams()
            await trio.sleep(2.0)

    def _repair_gossip_streams(self) -> None:
        """Re-open the gossip stream to every connected peer that lost it.

        py-libp2p registers a peer with pubsub on the connection event only; when
        two connections to one peer race and the one carrying the pubsub stream
        closes, the peer stays connected but out of the mesh for good. (Pubsub
        has the retry for this; it just is not triggered in that case.)
        """
        retry = getattr(self.pubsub, "_schedule_peer_stream_retry", None)
        if retry is None:
            return
        for pid in self.host.get_network().connections:
            if pid not in self.pubsub.peers:
                try:
                    retry(pid)
                except Exception:
                    log.debug("gossip stream repair for %s failed", pid, exc_info=True)

    async def _fill_connections(self) -> None:
        connected = set(self.connected_peers())
        want = self.config.target_peers - len(connected)
        if want <= 0:
            return
        now = trio.current_time()
        candidates: list[tuple[str, list[str]]] = []
        for addr in self.config.bootstrap:
            pid = addr.rsplit("/p2p/", 1)[-1]
            candidates.append((pid, [addr]))
        for e in self.ledger.entries():
            candidates.append((e.peer_id, [a if "/p2p/" in a else f"{a}/p2p/{e.peer_id}"
                                           for a in e.addrs]))
        seen: set[str] = set()
        chosen = []
        for pid, addrs in candidates:
            if pid == self.peer_id or pid in connected or pid in seen or not addrs:
                continue
            if self._dial_backoff.get(pid, (0.0, 0.0))[0] > now:
                continue
            seen.add(pid)
            chosen.append((pid, addrs))
        async with trio.open_nursery() as nursery:
            for pid, addrs in chosen[:want]:
                nursery.start_soon(self._dial, pid, addrs)

    async def _dial(self, pid: str, addrs: list[str]) -> None:
        for addr in addrs:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self.host.connect(info)
                self._dial_backoff.pop(pid, None)
                return
            except Exception as exc:
                log.debug("dial %s at %s failed: %r", pid, addr, exc)
        _, delay = self._dial_backoff.get(pid, (0.0, 0.5))
        delay = min(delay * 2, MAX_DIAL_BACKOFF_S)
        self._dial_backoff[pid] = (trio.current_time() + delay, delay)

    async def _on_connect_loop(self, recv: trio.MemoryReceiveChannel[str]) -> None:
        async with trio.open_nursery() as nursery:
            async for pid in recv:
                last = self._synced_at.get(pid)
                if last is not None and trio.current_time() - last < SYNC_INTERVAL_S:
                    continue
                self._synced_at[pid] = trio.current_time()
                nursery.start_soon(self._welcome, pid)

    async def _welcome(self, pid: str) -> None:
        """A new connection: pull the peer's ledger (both sides do, so each learns the
        other's entry within a round trip) and measure the link.

        Waits a moment first, and opens one stream at a time: streams opened while
        py-libp2p is still running identify and setting up gossip on a fresh
        connection stall its protocol negotiation (seen: the gossip stream never
        came up, leaving the peer outside the mesh)."""
        await trio.sleep(CONNECT_SETTLE_S)
        await self._pull_snapshot(pid)
        await self._probe_rtt(pid)

    async def _anti_entropy_loop(self) -> None:
        """Every half heartbeat, pull the ledger from one random neighbour.

        Gossip is fast but lossy under load; this push-pull backstop keeps every
        ledger converging (and refreshed before entries expire) regardless."""
        rng = random.Random()
        while True:
            await trio.sleep(max(0.5, self.config.heartbeat_s / 2))
            peers = self.connected_peers()
            if peers:
                await self._pull_snapshot(rng.choice(peers))

    async def _pull_snapshot(self, pid: str) -> None:
        """Late-joiner sync: pull the peer's whole ledger over /peerd/ledger-sync."""
        try:
            response: SyncResponse = await call(self.host, pid, wire.SYNC, SyncRequest())
        except PeerError as exc:
            self.offence(pid, exc.reason, f"ledger sync reply: {exc}")
            return
        except Exception as exc:
            log.debug("ledger sync from %s failed: %r", pid, exc)
            return
        self.metrics.messages.labels("in", "ledger.sync").inc()
        for signed in response.entries:
            self._merge(signed, source=pid, origin="sync")

    async def _serve_sync(self, peer: str, request: SyncRequest) -> SyncResponse:
        self.metrics.messages.labels("out", "ledger.sync").inc()
        budget = wire.SYNC.max_response_bytes - 4096  # room for framing and map overhead
        entries = []
        for signed in self.ledger.signed_entries()[: wire.MAX_SNAPSHOT_ENTRIES]:
            budget -= len(signed.body) + len(signed.sig) + 32
            if budget < 0:
                break
            entries.append(signed)
        return SyncResponse(entries=tuple(entries))

    # -- RTT probes

    async def _rtt_loop(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL_S)
            async with trio.open_nursery() as nursery:
                for pid in self.connected_peers():
                    nursery.start_soon(self._probe_rtt, pid)

    async def _probe_rtt(self, pid: str) -> None:
        """Round trip over libp2p's ping protocol, in ms (EWMA of the best of 3).

        The probe stream stays open between probes (the remote idles it out after
        10 s; we probe every 5 s), so a probe measures the link, not stream set-up.
        """
        try:
            with trio.fail_after(PING_TIMEOUT_S):
                stream = self._ping_streams.get(pid)
                if stream is None:
                    stream = await self.host.new_stream(ID.from_base58(pid), [PING_PROTOCOL_ID])
                    self._ping_streams[pid] = stream
                best = min([await ping_once(stream) for _ in range(3)])
        except Exception as exc:
            log.debug("RTT probe to %s failed: %r", pid, exc)
            stream = self._ping_streams.pop(pid, None)
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.reset()
            return
        old = self.rtt_ms.get(pid)
        self.rtt_ms[pid] = best if old is None else 0.7 * old + 0.3 * best

    # -- py-libp2p housekeeping

    async def _peerstore_cleanup_loop(self) -> None:
        """Replaces PeerStore.start_cleanup_task, which dies on expired peers (trap 3)."""
        while True:
            await trio.sleep(60.0)
            store = self.host.get_peerstore()
            connected = set(self.host.get_network().connections)
            try:
                for pid, data in list(store.peer_data_map.items()):
                    if pid not in connected and data.is_expired():
                        store.peer_data_map.pop(pid, None)
                        store.peer_record_map.pop(pid, None)
            except Exception:
                log.warning("peerstore clean-up failed", exc_info=True)

    # -- notifications from the swarm (must never raise)

    def _on_connected(self, pid: str) -> None:
        self.metrics.connections.labels("connected").inc()
        self.metrics.peers.set(len(self.host.get_network().connections))
        self.events.publish("peer.connected", peer_id=pid)
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, AttributeError):
            self._connected_peers.send_nowait(pid)

    def _on_disconnected(self, pid: str) -> None:
        if ID.from_base58(pid) in self.host.get_network().connections:
            return  # another connection to the same peer is still up
        self.metrics.connections.labels("disconnected").inc()
        self.metrics.peers.set(len(self.host.get_network().connections))
        self.rtt_ms.pop(pid, None)
        self._ping_streams.pop(pid, None)
        self._synced_at.pop(pid, None)
        self.events.publish("peer.disconnected", peer_id=pid)

    def _on_insecure_attempt(self, detail: str) -> None:
        self.metrics.rejections.labels("insecure_handshake").inc()
        self.events.publish("connection.refused", reason="insecure_handshake", detail=detail)


class _Notifee:
    """Bridges swarm notifications to the node; never raises into the swarm."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def connected(self, network: Any, conn: Any) -> None:
        try:
            self.node._on_connected(str(conn.muxed_conn.peer_id))
        except Exception:
            log.warning("connected notification failed", exc_info=True)

    async def disconnected(self, network: Any, conn: Any) -> None:
        try:
            self.node._on_disconnected(str(conn.muxed_conn.peer_id))
        except Exception:
            log.warning("disconnected notification failed", exc_info=True)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, maddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, maddr: Any) -> None:
        return None


async def ping_once(stream: Any) -> float:
    payload = secrets.token_bytes(32)
    t0 = time.perf_counter()
    await stream.write(payload)
    got = b""
    while len(got) < len(payload):
        chunk = await stream.read(len(payload) - len(got))
        if not chunk:
            raise WireError("ping stream closed")
        got += chunk
    if got != payload:
        raise WireError("ping payload mismatch")
    return (time.perf_counter() - t0) * 1000


def _guarded_stream_handler(inner: Any) -> Any:
    async def handler(stream: Any) -> None:
        try:
            await inner(stream)
        except Exception as exc:
            log.debug("pubsub stream handler failed: %r", exc)
            with contextlib.suppress(Exception):
                await stream.reset()

    return handler


def _capabilities_changed(old: LedgerEntry | None, new: LedgerEntry) -> bool:
    if old is None:
        return True
    keep = {"seq": 0, "timestamp": 0.0, "load": Load(), "hardware": Hardware()}
    return replace(old, **keep) != replace(new, **keep)  # type: ignore[arg-type]


def _count_insecure_handshakes(host: Any, node: Node) -> None:
    """Count inbound connections that failed to agree on Noise (e.g. plaintext).

    py-libp2p logs these at debug level and offers no hook, so we wrap the
    upgrader's bound method on this host's own swarm instance.
    """
    upgrader = host.get_network().upgrader
    inner = upgrader.upgrade_security

    async def upgrade_security(raw_conn: Any, is_initiator: bool, peer_id: Any = None) -> Any:
        try:
            return await inner(raw_conn, is_initiator, peer_id)
        except Exception as exc:
            if not is_initiator:
                node._on_insecure_attempt(f"{type(exc).__name__}: {exc}")
            raise

    upgrader.upgrade_security = upgrade_security


def make_host(config: Config, key_pair: KeyPair) -> Any:
    """TCP + Noise only + yamux only (LIBP2P_NOTES.md trap 4)."""
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    announce = [multiaddr.Multiaddr(a) for a in config.announce] or None
    # Our connectivity loop keeps `target_peers` connections from the ledger; py-libp2p's
    # own auto-connector (aiming at ~200 peerstore peers) would race it with duplicate
    # connections, whose closing silently drops the pubsub stream to that peer.
    connections = ConnectionConfig(min_connections=0, low_watermark=0,
                                   high_watermark=max(64, 4 * config.target_peers),
                                   max_connections=max(128, 8 * config.target_peers),
                                   max_connections_per_peer=1)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[multiaddr.Multiaddr(a) for a in config.listen],
        announce_addrs=announce,
        connection_config=connections,
    )


@contextlib.asynccontextmanager
async def open_node(config: Config, key_pair: KeyPair) -> AsyncIterator[Node]:
    host = make_host(config, key_pair)
    router = GossipSub(
        GOSSIP_PROTOCOLS, degree=6, degree_low=4, degree_high=12,
        heartbeat_interval=1,
        # Every testnet peer is 127.0.0.1; IP-diversity rules would starve the mesh.
        eclipse_protection_enabled=False,
        max_messages_per_topic_per_second=100.0,
    )
    pubsub = Pubsub(host, router, strict_signing=True)
    # Pubsub's stream handler runs in the host's nursery and raises once the Pubsub
    # service has stopped (a peer's RPC arriving during shutdown): guard it so it
    # cannot end host.run() (LIBP2P_NOTES.md trap 1).
    for proto in router.get_protocols():
        host.set_stream_handler(proto, _guarded_stream_handler(pubsub.stream_handler))
    node = Node(config, key_pair, host, pubsub)
    node.store.load_into(node.ledger, time.time(),
                         on_reject=lambda reason: node.metrics.rejections.labels(reason).inc())
    # The warm start must not resurrect our own old entry: we re-sign a fresh one.
    node.ledger.remove(node.peer_id)
    node.metrics.ledger_entries.set(len(node.ledger))
    pubsub.set_topic_validator(wire.TOPIC, node._validate_gossip, False)
    host.set_stream_handler(TProtocol(wire.SYNC.id),
                            stream_handler(wire.SYNC, node._serve_sync, node.offence))
    host.get_network().register_notifee(_Notifee(node))
    _count_insecure_handshakes(host, node)
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                host.run([multiaddr.Multiaddr(a) for a in config.listen]))
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await pubsub.wait_until_ready()
            node._refresh_own_entry()
            async with trio.open_nursery() as nursery:
                await nursery.start(node._run)
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.move_on_after(0.5) as leave:
                        leave.shield = True
                        with contextlib.suppress(Exception):
                            await pubsub.unsubscribe(wire.TOPIC)  # leave gossip politely
    finally:
        with contextlib.suppress(Exception):
            node.flush()
        node.store.close()

