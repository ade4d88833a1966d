"""The ledger over real libp2p hosts on loopback: gossip, late-joiner sync, expiry,
warm restart."""

from __future__ import annotations

import sqlite3
import time
from functools import partial
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from trio_typing import TaskStatus

from peerd.datadir import LEDGER_DB
from peerd.node import Node
from peerd.service import EntryFields, Service
from tests.harness import (
    advertise,
    book,
    connect,
    converged,
    events,
    gossip,
    gossip_window_empty,
    has_entry,
    is_connected,
    open_test_node,
    swarm,
    wait_for,
)


async def test_swarm_nodes_listen_on_real_ports(tmp_path: Path) -> None:
    async with swarm(2, tmp_path, connect="none") as (a, b):
        for node in (a, b):
            addr = node.addrs()[0]
            assert addr.startswith("/ip4/127.0.0.1/tcp/") and "/tcp/0/" not in addr
            assert addr.endswith(f"/p2p/{node.peer_id}")
        assert a.peer_id != b.peer_id
        assert not is_connected(a.host, b.peer_id)
        # Each node holds its own freshly signed entry from the start.
        assert [e.peer_id for e in book(a).entries()] == [a.peer_id]


async def test_line_of_four_converges_and_a_change_crosses_it(tmp_path: Path) -> None:
    # target_peers=1: nobody dials ledger peers on their own, so the line stays a
    # line and the change at one end must cross three hops of gossip.
    async with swarm(4, tmp_path, heartbeat_s=1.0, ttl_heartbeats=10,
                     target_peers=1) as nodes:
        first, last = nodes[0], nodes[-1]
        await wait_for(lambda: converged(nodes), 20, "every ledger holds all 4 entries")
        for node in nodes:
            assert len(book(node)) == 4
        assert first.connected_peers() == [nodes[1].peer_id]
        assert last.connected_peers() == [nodes[2].peer_id]

        await advertise(first, ["rust", "review"])
        await wait_for(lambda: has_entry(last, first.peer_id, skills=("rust", "review")), 10,
                       "the skills change reaches the far end")
        seen = events(last, "ledger.accepted", peer_id=first.peer_id, changed=True, via="gossip")
        assert seen, "the far end heard the change over gossip"
        assert seen[-1].data["source"] == first.peer_id  # authored by first, relayed
        assert not is_connected(last.host, first.peer_id)

        # Everyone else got it too, and the entry is the very bytes first signed.
        await wait_for(lambda: all(has_entry(n, first.peer_id, skills=("rust", "review"))
                                   for n in nodes), 10)
        own = book(first).signed(first.peer_id)
        assert all(book(n).signed(first.peer_id) == own for n in nodes)


async def test_star_converges(tmp_path: Path) -> None:
    async with swarm(3, tmp_path, heartbeat_s=1.0, ttl_heartbeats=10, connect="star",
                     target_peers=1) as nodes:
        hub, *leaves = nodes
        assert sorted(hub.connected_peers()) == sorted(n.peer_id for n in leaves)
        await wait_for(lambda: converged(nodes), 20, "the leaves learn each other via the hub")


async def test_late_joiner_gets_the_ledger_by_sync_before_any_heartbeat(
    tmp_path: Path,
) -> None:
    # With a 30 s heartbeat nobody re-publishes during the test, and once b's gossip
    # window is empty it cannot replay a's last publish (IHAVE/IWANT) either: what
    # the late joiner learns about `a` it can only have pulled over ledger-sync.
    async with swarm(2, tmp_path, heartbeat_s=30.0) as (a, b):
        await wait_for(lambda: converged([a, b]), 10)
        await wait_for(lambda: gossip_window_empty(b), 15, "b's gossip window to empty")
        async with open_test_node(tmp_path / "late", heartbeat_s=30.0) as late:
            started = trio.current_time()
            await connect(late, b)
            await wait_for(lambda: has_entry(late, a.peer_id) and has_entry(late, b.peer_id),
                           10, "the late joiner holds a's and b's entries")
            took = trio.current_time() - started
            assert took < 10.0  # well before the 30 s heartbeat
            via_a = events(late, "ledger.accepted", peer_id=a.peer_id)
            assert via_a and via_a[0].data["via"] == "sync"
            assert via_a[0].data["source"] == b.peer_id  # b re-served a's signed entry
            assert book(late).signed(a.peer_id) == book(a).signed(a.peer_id)
            # And b learnt the newcomer in the same exchange.
            await wait_for(lambda: has_entry(b, late.peer_id), 10)


async def test_entry_expires_everywhere_after_its_peer_stops(tmp_path: Path) -> None:
    heartbeat = 0.3  # ttl = 3 heartbeats = 0.9 s
    async with swarm(2, tmp_path, heartbeat_s=heartbeat) as (a, b):
        async with open_test_node(tmp_path / "leaver", heartbeat_s=heartbeat) as leaver:
            await connect(leaver, a)
            await wait_for(lambda: converged([a, b, leaver]), 10)
            gone = leaver.peer_id
            assert leaver.config.ttl_s == 3 * heartbeat
        await wait_for(lambda: gone not in book(a) and gone not in book(b), 10,
                       "the stopped peer's entry expires on both nodes")
        for node in (a, b):
            assert events(node, "ledger.expired", peer_id=gone)
        # The live peers keep refreshing each other.
        await trio.sleep(3 * heartbeat)
        await wait_for(lambda: has_entry(a, b.peer_id) and has_entry(b, a.peer_id), 10)
        # The expiry reaches SQLite too (flushed within a second or so).
        await wait_for(lambda: gone not in stored_peers(a), 10, "the row is deleted")


async def test_restarted_node_starts_warm_with_the_same_peer_id(tmp_path: Path) -> None:
    async with swarm(2, tmp_path, heartbeat_s=30.0) as (a, b):
        await wait_for(lambda: converged([a, b]), 10)
        a_id, b_id = a.peer_id, b.peer_id
        a_entry = book(b).signed(a_id)
        b_seq = book(b).get(b_id).seq  # type: ignore[union-attr]
    # Both are down; b's data dir alone must bring back its identity and ledger.
    async with open_test_node(tmp_path / "n1", heartbeat_s=30.0) as b2:
        assert b2.peer_id == b_id
        assert book(b2).signed(a_id) == a_entry  # loaded from SQLite, still live
        assert has_entry(b2, a_id)
        own = book(b2).get(b_id)
        assert own is not None and own.seq > b_seq  # a freshly signed entry of its own
        assert gossip(b2).status()["ledger_size"] == 2


def stored_peers(node: Node) -> set[str]:
    """Peer ids with a row in the node's SQLite file (read through a second handle)."""
    con = sqlite3.connect(node.config.data_dir / LEDGER_DB)
    try:
        return {row[0] for row in con.execute("SELECT peer_id FROM entries")}
    finally:
        con.close()


async def test_rpcs_written_at_once_reach_the_peer_whole(tmp_path: Path) -> None:
    # RPCs of several yamux frames each, written to b's gossip stream by several tasks
    # at once (py-libp2p's pubsub does this: its sending loop beside IWANT answers).
    # Interleaved, b could not parse the stream and would drop it, hearing nothing
    # more from a on gossip.
    async with swarm(2, tmp_path, heartbeat_s=30.0) as (a, b):
        await wait_for(lambda: converged([a, b]), 10)
        stream = a.pubsub.peers[ID.from_base58(b.peer_id)]
        sent: list[bool] = []

        async def write_big(i: int) -> None:
            msg = rpc_pb2.Message(from_id=a.host.get_id().to_bytes(), data=bytes([i]) * 150_000,
                                  seqno=i.to_bytes(8, "big"), topicIDs=["nobody-listens"])
            sent.append(await a.pubsub.write_msg(stream, rpc_pb2.RPC(publish=[msg])))

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(write_big, i)
        assert sent == [True] * 6
        await advertise(a, ["after-big-rpcs"])
        await wait_for(lambda: has_entry(b, a.peer_id, skills=("after-big-rpcs",)), 10,
                       "b still hears a on gossip")
        assert events(b, "ledger.accepted", peer_id=a.peer_id, changed=True, via="gossip")


async def test_a_kept_peer_is_dialed_beyond_target_peers(tmp_path: Path) -> None:
    # a line with target_peers=1 stays a line (above), except for the peers a service
    # asks to keep: n0 is connected to n2 once the ledger tells n0 where n2 is
    async with swarm(3, tmp_path, heartbeat_s=1.0, ttl_heartbeats=10,
                     target_peers=1) as (n0, n1, n2):
        def broken() -> list[str]:
            raise RuntimeError("a source that fails is skipped")

        n0.keep_connected(broken)
        n0.keep_connected(lambda: [n0.peer_id, n2.peer_id])  # itself: ignored
        await wait_for(lambda: converged([n0, n1, n2]), 20, "every ledger holds all 3")
        await wait_for(lambda: is_connected(n0.host, n2.peer_id), 15, "n0 keeps n2")
        assert sorted(n0.connected_peers()) == sorted([n1.peer_id, n2.peer_id])
        await trio.sleep(2.5)  # another round of the connectivity loop: nothing more
        assert len(n0.connected_peers()) == 2


async def test_a_flood_of_made_up_peers_fills_the_book_to_its_cap_and_no_further(
        tmp_path: Path) -> None:
    """Peer ids cost nothing: b re-serves entries of 300 made-up peers (signed by fresh
    keys, as anyone can). a's book, and its SQLite file, stop at the cap, and keep a's
    own entry and that of b, the peer it is connected to."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from peerd.ledger.book import sign_entry
    from protocols.ledger import LedgerEntry

    cap = 40
    async with swarm(2, tmp_path, heartbeat_s=30.0, connect="none") as (a, b):
        book(a).max_entries = cap
        now = time.time()
        for i in range(300):
            kp = create_new_key_pair()
            fake = LedgerEntry(peer_id=str(ID.from_pubkey(kp.public_key)), seq=1,
                               timestamp=now, ttl_s=3600.0, name=f"fake-{i}")
            book(b).offer(sign_entry(fake, kp.private_key), now)
        assert len(book(b)) == 301
        await connect(a, b)
        await wait_for(lambda: has_entry(a, b.peer_id) and len(book(a)) == cap, 10,
                       "a pulls b's snapshot into a full book")
        held = {e.peer_id for e in book(a).entries()}
        assert {a.peer_id, b.peer_id} <= held
        assert events(a, "ledger.evicted")
        await wait_for(lambda: stored_peers(a) == {e.peer_id for e in book(a).entries()},
                       10, "the file holds what the book holds")
        # b is kept, and a still hears it: its next entry replaces the old one
        await advertise(b, ["still-heard"])
        await wait_for(lambda: has_entry(a, b.peer_id, skills=("still-heard",)), 10,
                       "a hears b's change in a full book")
        assert len(book(a)) == cap


async def test_an_entry_too_large_to_sign_leaves_the_last_one_and_the_service_running(
        tmp_path: Path) -> None:
    """A service whose fields push our entry past 64 KiB: the re-signing fails, the last
    entry stands, and the heartbeat (which re-signs) keeps the gossip service up; it
    ended it, and the daemon with it. Without its reputation reports an entry is signed
    at a size that would not fit with them."""
    import pytest

    from peerd.ledger.book import EntryTooLarge
    from protocols.ledger import MAX_ENTRY_BYTES

    async with swarm(2, tmp_path, heartbeat_s=0.2, ttl_heartbeats=50) as (a, b):
        await wait_for(lambda: converged([a, b]), 10)
        before = book(a).get(a.peer_id)
        assert before is not None
        with pytest.raises(EntryTooLarge):
            await advertise(a, ["x" * 1100] * (MAX_ENTRY_BYTES // 1100 + 1))
        assert book(a).get(a.peer_id) == before
        await trio.sleep(0.6)  # three heartbeats, each failing to re-sign
        await advertise(a, ["fits"])
        await wait_for(lambda: has_entry(b, a.peer_id, skills=("fits",)), 10,
                       "a's gossip service still runs")

        class Reporter(Service):
            name = "reporter"

            async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
                task_status.started()

            def entry_fields(self) -> EntryFields:
                return {"reputation": {f"{i:03d}".ljust(128, "p"): 0.5 for i in range(256)}}

        await a.start(Reporter())
        entry = await advertise(a, ["y" * 1000] * 40)
        assert entry.reputation == {} and len(entry.skills) == 40


async def test_the_dial_back_off_forgets_peers_no_source_offers_any_more(
        tmp_path: Path) -> None:
    """Every peer that failed a dial kept an entry in the back-off map for good (with a
    flood of made-up ledger entries, hundreds of thousands a day)."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    gone = [str(ID.from_pubkey(create_new_key_pair().public_key)) for _ in range(3)]
    offered = {pid: [f"/ip4/127.0.0.1/tcp/1/p2p/{pid}"] for pid in gone}
    async with open_test_node(tmp_path / "n", target_peers=4) as node:
        node.add_dial_source(lambda: list(offered.items()))
        await wait_for(lambda: set(node._dial_backoff) == set(gone), 30,
                       "every unreachable peer backed off")
        offered.clear()
        await wait_for(lambda: not node._dial_backoff, 15, "the back-off map empties")


async def test_a_peer_listing_many_silent_addresses_costs_one_dial_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each address was tried for its own deadline, one after the other, and the
    connectivity round waits for its dials: a peer listing addresses that accept and
    then say nothing held every new connection back for minutes."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    import peerd.node as node_module

    monkeypatch.setattr(node_module, "DIAL_TIMEOUT_S", 0.3)
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    pid = str(ID.from_pubkey(create_new_key_pair().public_key))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), silent, 0)
        port = listeners[0].socket.getsockname()[1]
        async with open_test_node(tmp_path / "n", target_peers=4) as node:
            node.add_dial_source(lambda: [(pid, [f"/ip4/127.0.0.1/tcp/{port}/p2p/{pid}"] * 12)])
            await wait_for(lambda: pid in node._dial_backoff, 15, "the dial gives up")
            assert 1 <= len(held) <= 3  # tried for 2 deadlines, not 12
        nursery.cancel_scope.cancel()
