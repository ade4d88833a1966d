"""Node: the kernel of a peer. The libp2p host, streams, a nursery, connectivity, RTT
and offences; nothing of any system.

`open_node(config, key)` is an async context manager. It enters the host, Pubsub and
GossipSub with one AsyncExitStack in the calling task and leaves them in reverse
order (LIBP2P_NOTES.md trap 5), then runs the kernel's own loops in a nursery it owns:
connectivity (dialing towards `target_peers`), the welcome of each new connection,
RTT probes and peerstore clean-up. Systems plug in as services (service.py) started in
that nursery with `Node.start`; leaving the context cancels them and closes the host.

Four hooks let services take part without the kernel knowing them: `add_dial_source`
(whom to dial: the ledger's addresses), `keep_connected` (whom to stay connected to
beyond `target_peers`: the peers a model's routes cross), `on_connect` (what to do with a new
connection: the ledger pulls a snapshot) and `on_disconnect` (a peer's last connection
closed: the tools' dispatcher ends the calls in flight there at once).

Leaving the context hangs up every connection and listener before the host stops
(host.hang_up), so peers see the node leave at once, as they see a process that died.

One module past the usual size: it is one thing, the kernel's loops around one host,
sharing its bookkeeping (connections, dial back-off, RTTs, offences); what a system
does lives in its service.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import multiaddr
import trio
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from peerd import __version__
from peerd.config import Config
from peerd.eager import open_eager
from peerd.events import EventBus
from peerd.host import (
    ConnectionNotifee,
    closing,
    count_insecure_handshakes,
    hang_up,
    make_host,
    make_pubsub,
    ping_once,
)
from peerd.loopback import loopback_pair
from peerd.metrics import Metrics
from peerd.service import Service

log = logging.getLogger(__name__)

S = TypeVar("S", bound=Service)
DialSource = Callable[[], Iterable[tuple[str, Sequence[str]]]]  # -> (peer id, addrs)
KeepSource = Callable[[], Iterable[str]]  # -> peer ids, most wanted first
ConnectHook = Callable[[str], Awaitable[None]]  # (peer id); must not raise
DisconnectHook = Callable[[str], None]  # (peer id); runs in the swarm's notification

GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
DIAL_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 3.0
PING_INTERVAL_S = 8.0  # under the 10 s after which the remote idles a ping stream out
WELCOME_INTERVAL_S = 30.0  # don't welcome the same peer again sooner (a flapping link)
MAX_DIAL_BACKOFF_S = 60.0
MAX_KEPT = 16  # connections kept beyond target_peers for the services' `keep_connected`
MAX_OFFENDERS_TRACKED = 4096
CONNECT_SETTLE_S = 0.5


class Node:
    """A running peer's kernel. Create with `open_node`; all methods run on the trio
    loop."""

    def __init__(self, config: Config, key_pair: KeyPair, host: Any, pubsub: Pubsub) -> None:
        self.config = config
        self.key_pair = key_pair
        self.host = host
        self.pubsub = pubsub  # shared by the services' gossip topics
        self.peer_id = str(host.get_id())
        self.name = config.name or self.peer_id[-8:]
        self.started_at = time.time()
        self.events = EventBus()
        self.metrics = Metrics()
        self.offences: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.rtt_ms: dict[str, float] = {}
        self.services: list[Service] = []  # started (or starting), in order
        self._dial_sources: list[DialSource] = []
        self._keep_sources: list[KeepSource] = []
        self._connect_hooks: list[ConnectHook] = []
        self._disconnect_hooks: list[DisconnectHook] = []
        self._welcomed_at: dict[str, float] = {}
        self._dial_backoff: dict[str, tuple[float, float]] = {}  # peer -> (next try, delay)
        self._ping_streams: dict[str, Any] = {}
        self._handlers: dict[str, Any] = {}
        self._connected_peers: trio.MemorySendChannel[str]
        self._nursery: trio.Nursery | None = None

    # ---- services ------------------------------------------------------------------

    async def start(self, *services: Service) -> None:
        """Start `services` in the node's nursery, in order; returns once each is
        serving. All of them are in `self.services` before the first starts, so the
        first ledger entry (built when the ledger's service starts) already carries
        every one's fields. A service that fails to start is dropped with those after
        it, and its error raised."""
        self.services.extend(services)
        for i, service in enumerate(services):
            try:
                await self.nursery.start(service.run)
            except BaseException:
                for dropped in services[i:]:
                    self.services.remove(dropped)
                raise

    def service(self, kind: type[S]) -> S:
        """The started service of this type (LookupError if none)."""
        for service in self.services:
            if isinstance(service, kind):
                return service
        raise LookupError(f"no {kind.__name__} service on this node")

    def add_dial_source(self, source: DialSource) -> None:
        """Peers worth dialing, and where (asked each time connections run short)."""
        self._dial_sources.append(source)

    def keep_connected(self, source: KeepSource) -> None:
        """Peers to stay connected to whatever `target_peers` says (the first MAX_KEPT
        of all sources together), dialed at the addresses the dial sources give; e.g.
        the peers a request's route may cross, so that its first request through them
        does not wait for a connection and routing knows their RTT."""
        self._keep_sources.append(source)

    def on_connect(self, hook: ConnectHook) -> None:
        """Run `hook(peer_id)` for each new connection, one hook at a time, before the
        first RTT probe (at most once per WELCOME_INTERVAL_S per peer)."""
        self._connect_hooks.append(hook)

    def on_disconnect(self, hook: DisconnectHook) -> None:
        """Call `hook(peer_id)` at once when the last connection to a peer closes (the
        moment `peer.disconnected` is published). It runs inside the swarm's
        notification: it must be quick and not block (set an event, cancel a scope)."""
        self._disconnect_hooks.append(hook)

    # ---- queries -------------------------------------------------------------------

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def connected_peers(self) -> list[str]:
        return sorted(str(p) for p in self.host.get_network().connections)

    def welcomed_at(self, peer_id: str) -> float | None:
        """When (trio's clock) the connection the connect hooks last ran for came up;
        None if they never ran for `peer_id`."""
        return self._welcomed_at.get(peer_id)

    def link_up(self, peer_id: str) -> bool:
        """A connection to `peer_id` is up (always, to ourselves): false when there is
        none or each one is closing (host.closing), which yamux knows before the swarm
        lets the connection go and `peer.disconnected` is published."""
        if peer_id == self.peer_id:
            return True
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            return False
        return any(not closing(c) for c in self.host.get_network().connections.get(pid, []))

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "addrs": self.addrs(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "peers": len(self.connected_peers()),
            "version": __version__,
            "data_dir": str(self.config.data_dir),
        }

    def peers(self) -> list[dict[str, Any]]:
        out = []
        for pid in self.connected_peers():
            conns = self.host.get_network().connections.get(ID.from_base58(pid), [])
            out.append({
                "peer_id": pid,
                "rtt_ms": round(self.rtt_ms[pid], 3) if pid in self.rtt_ms else None,
                "connections": len(conns),
                "offences": sum(self.offences[pid].values()) if pid in self.offences else 0,
            })
        return out

    # ---- streams -------------------------------------------------------------------

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

    async def new_stream_eager(self, peer_id: str, protocol: str) -> Any:
        """As `new_stream`, without waiting for the protocol's negotiation: the caller's
        first frame goes with it, and its first read raises eager.NotSpoken if the peer
        does not serve `protocol` (peerd/eager.py)."""
        if peer_id == self.peer_id:
            return await self.new_stream(peer_id, protocol)
        return await open_eager(self.host, peer_id, protocol)

    @property
    def nursery(self) -> trio.Nursery:
        """The node's own nursery: services and their tasks run here."""
        assert self._nursery is not None, "node is not running"
        return self._nursery

    # ---- offences ------------------------------------------------------------------

    def offence(self, peer: str, reason: str, detail: str) -> None:
        """Count input refused from `peer` (metrics, events, per-peer tally)."""
        self.tally(peer, reason)
        self.metrics.rejections.labels(reason).inc()
        log.info("refused input from %s: %s (%.1000s)", peer, reason, detail)
        self.events.publish("peer.offence", peer_id=peer, reason=reason, detail=detail[:300])

    def tally(self, peer: str, reason: str) -> None:
        """Count an offence of `peer` only (the caller reports it its own way)."""
        if peer not in self.offences and len(self.offences) >= MAX_OFFENDERS_TRACKED:
            del self.offences[next(iter(self.offences))]  # forget the oldest offender
        self.offences[peer][reason] += 1

    # ---- the kernel's loops --------------------------------------------------------

    async def _run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            send, recv = trio.open_memory_channel[str](256)
            self._connected_peers = send
            nursery.start_soon(self._connectivity_loop)
            nursery.start_soon(self._on_connect_loop, recv)
            nursery.start_soon(self._rtt_loop)
            nursery.start_soon(self._peerstore_cleanup_loop)
            task_status.started()

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
        kept = self._kept()
        if want <= 0 and not kept - connected:
            return
        now = trio.current_time()
        candidates: list[tuple[str, Sequence[str]]] = [
            (addr.rsplit("/p2p/", 1)[-1], [addr]) for addr in self.config.bootstrap]
        for source in self._dial_sources:
            try:
                candidates.extend(source())
            except Exception:
                log.warning("a dial source failed", exc_info=True)
        # a peer no source offers any more (gone from the book) is not tried again: its
        # back-off goes with it, or the map would keep every peer that ever failed
        offered = {pid for pid, _ in candidates}
        for pid in [p for p in self._dial_backoff if p not in offered]:
            del self._dial_backoff[pid]
        seen: set[str] = set()
        chosen = []
        for pid, addrs in candidates:
            if pid == self.peer_id or pid in connected or pid in seen or not addrs:
                continue
            if self._dial_backoff.get(pid, (0.0, 0.0))[0] > now:
                continue
            seen.add(pid)
            chosen.append((pid, addrs))
        dial = [c for c in chosen if c[0] in kept]
        dial += [c for c in chosen if c[0] not in kept][:max(0, want - len(dial))]
        async with trio.open_nursery() as nursery:
            for pid, addrs in dial:
                nursery.start_soon(self._dial, pid, addrs)

    def _kept(self) -> set[str]:
        kept: dict[str, None] = {}
        for source in self._keep_sources:
            try:
                kept.update((pid, None) for pid in source() if pid != self.peer_id)
            except Exception:
                log.warning("a keep-connected source failed", exc_info=True)
        return set(list(kept)[:MAX_KEPT])

    async def _dial(self, pid: str, addrs: Sequence[str]) -> None:
        # one deadline for all of a peer's addresses too: the round waits for its
        # dials, and a peer may list many that drop packets
        with trio.move_on_after(2 * DIAL_TIMEOUT_S):
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
                last = self._welcomed_at.get(pid)
                if last is not None and trio.current_time() - last < WELCOME_INTERVAL_S:
                    continue
                self._welcomed_at[pid] = trio.current_time()
                nursery.start_soon(self._welcome, pid)

    async def _welcome(self, pid: str) -> None:
        """A new connection: the services' hooks (the ledger pulls the peer's snapshot),
        then the first RTT probe.

        Waits a moment first, and opens one stream at a time: streams opened while
        py-libp2p is still running identify and setting up gossip on a fresh
        connection stall its protocol negotiation (seen: the gossip stream never
        came up, leaving the peer outside the mesh)."""
        await trio.sleep(CONNECT_SETTLE_S)
        for hook in self._connect_hooks:
            try:
                await hook(pid)
            except Exception:
                log.warning("a connection hook failed for %s", pid, exc_info=True)
        await self._probe_rtt(pid)

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
        self._welcomed_at.pop(pid, None)
        self.events.publish("peer.disconnected", peer_id=pid)
        for hook in self._disconnect_hooks:
            try:
                hook(pid)
            except Exception:
                log.warning("a disconnection hook failed for %s", pid, exc_info=True)

    def _on_insecure_attempt(self, detail: str) -> None:
        self.metrics.rejections.labels("insecure_handshake").inc()
        self.events.publish("connection.refused", reason="insecure_handshake", detail=detail)


@contextlib.asynccontextmanager
async def open_node(config: Config, key_pair: KeyPair) -> AsyncIterator[Node]:
    host = make_host(config, key_pair)
    pubsub, router = make_pubsub(host)
    node = Node(config, key_pair, host, pubsub)
    host.get_network().register_notifee(ConnectionNotifee(node._on_connected,
                                                          node._on_disconnected))
    count_insecure_handshakes(host, node._on_insecure_attempt)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            host.run([multiaddr.Multiaddr(a) for a in config.listen]))
        stack.push_async_callback(hang_up, host)  # after Pubsub, before the host stops
        await stack.enter_async_context(background_trio_service(pubsub))
        await stack.enter_async_context(background_trio_service(router))
        await pubsub.wait_until_ready()
        async with trio.open_nursery() as nursery:
            await nursery.start(node._run)
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()

