"""The libp2p host a node runs on: TCP + Noise only + yamux only, a GossipSub
router tuned for a small swarm, and guards around what py-libp2p lets raise or
leaves uncounted. See LIBP2P_NOTES.md for why each setting is what it is.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.config import ConnectionConfig
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from peerd.config import Config
from protocols.errors import WireError

log = logging.getLogger(__name__)

GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
HANG_UP_S = 2.0  # closing every connection on the way out, at most
# A peer that takes in none of a Noise packet (at most 64 KiB) for this long has
# stopped reading its socket: the connection is closed (see `whole_writes`).
WRITE_STALL_S = 20.0


class ConnectionNotifee:
    """Hands the swarm's connection events (peer id) to the node; never raises into
    the swarm."""

    def __init__(self, on_connected: Callable[[str], None],
                 on_disconnected: Callable[[str], None]) -> None:
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected

    async def connected(self, network: Any, conn: Any) -> None:
        try:
            self.on_connected(str(conn.muxed_conn.peer_id))
        except Exception:
            log.warning("connected notification failed", exc_info=True)

    async def disconnected(self, network: Any, conn: Any) -> None:
        try:
            self.on_disconnected(str(conn.muxed_conn.peer_id))
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


def count_insecure_handshakes(host: Any, on_attempt: Callable[[str], None]) -> None:
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
                on_attempt(f"{type(exc).__name__}: {exc}")
            raise

    upgrader.upgrade_security = upgrade_security


def whole_writes(noise: Any) -> None:
    """Make every write to a connection secured by `noise` (a NoiseTransport) whole,
    whatever cancels the task that writes.

    py-libp2p 0.8.1 encrypts a message (taking the session's next nonce), then takes
    the socket's lock and sends it, in the writer's own task. A deadline that fires
    between the two leaves a nonce that never reaches the wire, and one that fires
    during the send leaves half a packet there; either way the far end fails to
    decrypt everything after it and closes the connection, with every stream on it:
    an RTT probe that timed out under load took a peer's bids and answers down with
    it. So each packet's send is shielded (`_make_writes_whole`). A shielded send
    could wait forever on a peer that stopped reading: each packet gets WRITE_STALL_S,
    after which the connection is closed. The guard costs a cancel scope a packet:
    bench/README, "Whole writes".
    """
    for side in ("secure_inbound", "secure_outbound"):
        secure = getattr(noise, side)

        async def secured(*args: Any, _secure: Any = secure) -> Any:
            session = await _secure(*args)
            _make_writes_whole(session)
            return session

        setattr(noise, side, secured)


def _make_writes_whole(session: Any) -> None:
    """Shield each Noise packet's send, from before the first await after its message
    is encrypted (the packet writer is awaited straight after) to its last byte. A
    message of several packets (over 64 KiB) is written whole too: nothing between
    its packets can deliver a cancel."""
    packets = session.conn.read_writer  # SecureSession -> Noise messages -> packets
    send_packet = packets.write_msg

    async def whole_packet(packet: bytes) -> None:
        # one scope a packet (a scope costs microseconds, on every write)
        with trio.CancelScope(shield=True,
                              deadline=trio.current_time() + WRITE_STALL_S) as stalled:
            await send_packet(packet)
        if stalled.cancelled_caught:
            with contextlib.suppress(Exception):
                await packets.close()
            raise ConnectionClosedError(
                f"the peer took in nothing for {WRITE_STALL_S:.0f} s", transport="tcp")

    packets.write_msg = whole_packet


def make_host(config: Config, key_pair: KeyPair) -> Any:
    """TCP + Noise only + yamux only (LIBP2P_NOTES.md trap 4), writes kept whole."""
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    whole_writes(noise)
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




def keep_rpcs_whole(pubsub: Pubsub) -> None:
    """Let no two RPCs to a peer interleave on the wire.

    py-libp2p 0.8.1 writes to a peer's gossip stream from several tasks (the peer's
    sending loop, answers to IWANT, the flush of messages held for a new peer), and
    yamux writes a message longer than a frame (64 KiB) or than the send window as
    several frames, taking its stream lock one frame at a time. Two such writes at once
    interleave their frames, the far end cannot parse the stream and drops it, and from
    then on hears nothing we publish. One lock per stream keeps each RPC whole: every
    write but the stream's first (its hello, before any other task holds the stream)
    goes through `write_msg`, which we wrap on this instance.
    """
    inner = pubsub.write_msg
    locks: weakref.WeakKeyDictionary[Any, trio.Lock] = weakref.WeakKeyDictionary()

    async def write_msg(stream: Any, rpc_msg: Any) -> bool:
        async with locks.setdefault(stream, trio.Lock()):
            return bool(await inner(stream, rpc_msg))

    pubsub.write_msg = write_msg


def make_pubsub(host: Any) -> tuple[Pubsub, GossipSub]:
    router = GossipSub(
        GOSSIP_PROTOCOLS, degree=6, degree_low=4, degree_high=12,
        heartbeat_interval=1,
        # Every testnet peer is 127.0.0.1; IP-diversity rules would starve the mesh.
        eclipse_protection_enabled=False,
        max_messages_per_topic_per_second=100.0,
    )
    pubsub = Pubsub(host, router, strict_signing=True)
    keep_rpcs_whole(pubsub)
    # Pubsub's stream handler runs in the host's nursery and raises once the Pubsub
    # service has stopped (a peer's RPC arriving during shutdown): guard it so it
    # cannot end host.run() (LIBP2P_NOTES.md trap 1).
    for proto in router.get_protocols():
        host.set_stream_handler(proto, _guarded_stream_handler(pubsub.stream_handler))
    return pubsub, router


def closing(conn: Any) -> bool:
    """A swarm connection that is closing: yamux has seen the peer's GO_AWAY or its
    socket end (or closed it itself), though the swarm may still list it."""
    muxed = getattr(conn, "muxed_conn", None)
    if muxed is None:
        return False
    if getattr(muxed, "is_closed", False):
        return True
    shutting_down = getattr(muxed, "event_shutting_down", None)  # yamux's
    return shutting_down is not None and shutting_down.is_set()


async def hang_up(host: Any) -> None:
    """Close every connection at once (each waits ~0.1 s in yamux), then the swarm's
    listeners and transports (`host.close`), within HANG_UP_S; never raises. For a
    node on its way out: py-libp2p's `host.run` stops the swarm's tasks without
    closing its sockets, so its peers would not see it go."""
    async def close(conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    with trio.move_on_after(HANG_UP_S) as scope:
        scope.shield = True
        try:
            async with trio.open_nursery() as nursery:
                for conns in list(host.get_network().connections.values()):
                    for conn in list(conns):
                        nursery.start_soon(close, conn)
            await host.close()
        except Exception:
            log.debug("hanging up failed", exc_info=True)
