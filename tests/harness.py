"""An in-process N-node test harness: real libp2p hosts on loopback, one trio loop.

Every host, Pubsub and GossipSub service is entered in ONE `AsyncExitStack` in the
calling task and left in reverse order (LIBP2P_NOTES.md trap 5). To stop a single
node mid-test, open it in an inner `async with open_test_node(...)` block: nodes
must be closed last-opened-first, never out of order.

Besides real peerd nodes, `rogue_host` opens a bare libp2p host (same Noise/yamux
options, optionally with Pubsub) that is NOT a peerd node, to play a misbehaving
peer; `rogue_host(insecure=True)` offers only the plaintext transport.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.exceptions import MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from trio_typing import TaskStatus

from peerd.config import Config
from peerd.events import Event
from peerd.host import GOSSIP_PROTOCOLS, keep_rpcs_whole, make_host
from peerd.identity import ensure_data_dir, load_or_create_key
from peerd.inference.slot import ModelOptions, ModelSlot
from peerd.ledger.book import Ledger, sign_entry
from peerd.ledger.gossip import LedgerGossip
from peerd.node import Node, open_node
from peerd.service import EntryFields, Service
from protocols import ledger as wire
from protocols.codec import decode
from protocols.framing import StreamClosed, read_frame
from protocols.ledger import LedgerEntry, SignedEntry
from protocols.spec import ErrorReply

if TYPE_CHECKING:
    from peerd.inference.runtime import ModelRuntime

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
DEFAULT_TIMEOUT_S = 10.0
POLL_S = 0.02

Topology = Literal["line", "star", "none"]


# ---- waiting ---------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], object], timeout_s: float = DEFAULT_TIMEOUT_S, what: str = ""
) -> None:
    """Poll `predicate` until it is truthy; fail the test after `timeout_s` seconds."""
    deadline = trio.current_time() + timeout_s
    while not predicate():
        if trio.current_time() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        await trio.sleep(POLL_S)


# ---- peerd nodes -----------------------------------------------------------------


def node_config(data_dir: Path, **overrides: Any) -> Config:
    """A loopback config on an OS-chosen port; `overrides` are Config fields."""
    settings: dict[str, Any] = {"data_dir": data_dir, "listen": (LOOPBACK,), "name": data_dir.name}
    settings.update(overrides)
    return Config(**settings)


@contextlib.asynccontextmanager
async def open_test_node(data_dir: Path, **overrides: Any) -> AsyncIterator[Node]:
    """One peerd node whose identity lives in `data_dir` (as the daemon keeps it), so
    reopening the same directory restarts the same peer. It runs the ledger's gossip,
    as every daemon does; other services are the test's to start."""
    ensure_data_dir(data_dir)
    key_pair = load_or_create_key(data_dir)
    async with open_node(node_config(data_dir, **overrides), key_pair) as node:
        await node.start(LedgerGossip(node))
        yield node


def gossip(node: Node) -> LedgerGossip:
    """The node's ledger service."""
    return node.service(LedgerGossip)


def book(node: Node) -> Ledger:
    """The node's ledger: every live entry it holds."""
    return gossip(node).book


class Advertiser(Service):
    """A stand-in for a system that advertises skills in the ledger (Symphony does),
    for tests of the ledger itself."""

    name = "advertiser"

    def __init__(self) -> None:
        self.skills: tuple[str, ...] = ()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()

    def entry_fields(self) -> EntryFields:
        return {"skills": self.skills}


async def advertise(node: Node, skills: Sequence[str]) -> LedgerEntry:
    """Change the skills `node` advertises; its new entry goes out on gossip at once."""
    try:
        advertiser = node.service(Advertiser)
    except LookupError:
        advertiser = Advertiser()
        await node.start(advertiser)
    advertiser.skills = tuple(skills)
    return gossip(node).refresh()


async def serve_model(node: Node, options: ModelOptions) -> ModelRuntime:
    """Start the model service on `node` (as `peerd start --model` does) and return its
    runtime once loaded and advertised."""
    slot = ModelSlot(node, gossip(node), options)
    await node.start(slot)
    await slot.settled.wait()
    if slot.runtime is None:
        raise AssertionError(f"the model failed to load: {slot.error}")
    return slot.runtime


@contextlib.asynccontextmanager
async def swarm(
    n: int,
    tmp_path: Path,
    *,
    heartbeat_s: float = 1.0,
    connect: Topology = "line",
    **overrides: Any,
) -> AsyncIterator[list[Node]]:
    """`n` real nodes in data dirs `tmp_path/n0 .. n{n-1}`, wired as a line
    (n0-n1-...), a star around n0, or not at all. Keyword `overrides` are Config
    fields; pass `target_peers=1` to stop nodes dialing ledger peers on their own
    (a line then stays a line)."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                open_test_node(tmp_path / f"n{i}", heartbeat_s=heartbeat_s, **overrides))
            for i in range(n)
        ]
        if connect == "line":
            for a, b in itertools.pairwise(nodes):
                await connect_nodes(b, a)
        elif connect == "star":
            for b in nodes[1:]:
                await connect_nodes(b, nodes[0])
        yield nodes


def peer_info(node: Node) -> PeerInfo:
    """Where to dial `node` (its first listen address, with the real bound port)."""
    addr = node.addrs()[0]
    if "/p2p/" not in addr:
        addr = f"{addr}/p2p/{node.peer_id}"
    return info_from_p2p_addr(multiaddr.Multiaddr(addr))


def is_connected(host: Any, peer_id: str) -> bool:
    return ID.from_base58(peer_id) in host.get_network().connections


async def connect_nodes(a: Node, b: Node, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """`a` dials `b`; returns when both sides see the connection."""
    await dial(a.host, b, timeout_s)
    await wait_for(lambda: is_connected(b.host, a.peer_id), timeout_s, f"{b.name} sees {a.name}")


async def dial(host: Any, node: Node, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    with trio.fail_after(timeout_s):
        await host.connect(peer_info(node))


# `swarm(connect=...)` shadows the name inside swarm; elsewhere `connect` reads better.
connect = connect_nodes


def has_entry(node: Node, peer_id: str, **fields: Any) -> bool:
    """`node` holds a live entry of `peer_id` whose attributes equal `fields`."""
    entry = book(node).get(peer_id)
    return entry is not None and all(getattr(entry, k) == v for k, v in fields.items())


def converged(nodes: Sequence[Node]) -> bool:
    everyone = {n.peer_id for n in nodes}
    return all({e.peer_id for e in book(n).entries()} >= everyone for n in nodes)


# ---- observing a node ------------------------------------------------------------


def gossip_window_empty(node: Node) -> bool:
    """True once `node`'s GossipSub has no recent ledger message left to advertise
    (IHAVE) to a newcomer, so anything a new peer learns after this point came by
    a fresh publish or by ledger-sync. The window is 3 router heartbeats (~3 s)."""
    return not node.pubsub.router.mcache.window(wire.TOPIC)


_REJECTION = re.compile(r'^peerd_rejections_total\{reason="([^"]+)"\} (\S+)$', re.M)


def rejections(node: Node) -> dict[str, float]:
    """The node's refused-input counters by reason, read from its Prometheus text."""
    text = node.metrics.render().decode()
    return {reason: float(value) for reason, value in _REJECTION.findall(text)}


def events(node: Node, type: str, **fields: Any) -> list[Event]:
    """Recent events of `type` whose data match `fields`."""
    return [e for e in node.events.recent()
            if e.type == type and all(e.data.get(k) == v for k, v in fields.items())]


# ---- entries ---------------------------------------------------------------------


def make_entry(peer_id: str, *, seq: int = 1, timestamp: float | None = None,
               ttl_s: float = 30.0, **fields: Any) -> LedgerEntry:
    return LedgerEntry(peer_id=peer_id, seq=seq,
                       timestamp=time.time() if timestamp is None else timestamp,
                       ttl_s=ttl_s, **fields)


def signed_by(key_pair: KeyPair, **fields: Any) -> SignedEntry:
    """An entry about `key_pair`'s own peer id (unless `peer_id=` says otherwise),
    signed with `key_pair`."""
    peer_id = fields.pop("peer_id", None) or str(ID.from_pubkey(key_pair.public_key))
    return sign_entry(make_entry(peer_id, **fields), key_pair.private_key)


# ---- misbehaving peers -----------------------------------------------------------


@dataclass
class Rogue:
    """A bare libp2p host that is not a peerd node. `pubsub` is set when asked for."""

    host: Any
    key_pair: KeyPair
    pubsub: Pubsub | None = None

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    async def publish(self, data: bytes, topic: str = wire.TOPIC) -> None:
        assert self.pubsub is not None, "open the rogue with pubsub=True"
        await self.pubsub.publish(topic, data)

    def answer(self, protocol: str, reply: bytes) -> None:
        """Serve `protocol` by reading one request frame (whatever it holds) and
        writing the raw `reply` bytes back: a peer that answers badly."""

        async def handler(stream: Any) -> None:
            try:
                with trio.move_on_after(DEFAULT_TIMEOUT_S):
                    with contextlib.suppress(Exception):
                        await read_frame(stream, 64 * 1024)
                    await stream.write(reply)
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()

        self.host.set_stream_handler(TProtocol(protocol), handler)

    async def exchange(self, node: Node, protocol: str, raw: bytes,
                       max_reply: int = 64 * 1024, half_close: bool = True,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes | None:
        """Write `raw` bytes (framing is the caller's business) on a new stream to
        `node`, half-close it unless told not to, and read one reply frame; None when
        the node closed the stream without one."""
        with trio.fail_after(timeout_s):
            stream = await self.host.new_stream(ID.from_base58(node.peer_id),
                                                [TProtocol(protocol)])
            try:
                await stream.write(raw)
                if half_close:
                    with contextlib.suppress(Exception):
                        await stream.close_write()
                try:
                    return await read_frame(stream, max_reply)
                except (StreamClosed, StreamReset, MuxedStreamReset):
                    return None
            finally:
                with contextlib.suppress(Exception):
                    await stream.reset()


def error_code(reply: bytes | None) -> str | None:
    """The code of an ErrorReply frame (None when the stream closed without reply)."""
    if reply is None:
        return None
    return decode(reply, ErrorReply).code


def _insecure_host(key_pair: KeyPair) -> Any:
    return new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[multiaddr.Multiaddr(LOOPBACK)],
    )


@contextlib.asynccontextmanager
async def rogue_host(
    tmp_path: Path, *, pubsub: bool = False, insecure: bool = False
) -> AsyncIterator[Rogue]:
    """A raw host with peerd's transport options (Noise + yamux), or plaintext only
    with `insecure=True`. With `pubsub=True` it also runs GossipSub, subscribed to
    nothing: its publishes go out as fanout to whoever subscribes to the topic."""
    key_pair = create_new_key_pair()
    if insecure:
        host = _insecure_host(key_pair)
    else:
        host = make_host(node_config(tmp_path / "rogue"), key_pair)
    rogue = Rogue(host, key_pair)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(host.run([multiaddr.Multiaddr(LOOPBACK)]))
        if pubsub:
            router = GossipSub(GOSSIP_PROTOCOLS, degree=6, degree_low=4, degree_high=12,
                               heartbeat_interval=1)
            # RPCs kept whole as peerd's are: py-libp2p's own can interleave a large
            # publish with another write and break its stream to the node.
            rogue.pubsub = Pubsub(host, router, strict_signing=True)
            keep_rpcs_whole(rogue.pubsub)
            await stack.enter_async_context(background_trio_service(rogue.pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await rogue.pubsub.wait_until_ready()
        yield rogue


async def wait_for_topic_peer(rogue: Rogue, node: Node,
                              timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Wait until the rogue's Pubsub knows `node` subscribes to the ledger topic, so a
    publish reaches it."""
    assert rogue.pubsub is not None
    pid = ID.from_base58(node.peer_id)
    await wait_for(lambda: pid in rogue.pubsub.peer_topics.get(wire.TOPIC, set()),  # type: ignore[union-attr]
                   timeout_s, f"the rogue learns {node.name} subscribes to {wire.TOPIC}")
