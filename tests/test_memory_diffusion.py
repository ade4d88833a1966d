"""Memory items diffusing over real in-process libp2p hosts: an announced item reaches
every peer of a line and is handed to admission once; a remote search answers as the
peer's own memory does; a rogue peer's forged, tampered, impersonated, oversized and
malformed input is refused and counted while the peer keeps serving; an announcement
flood is cut; an author whose items keep failing replay is fetched from no more.

Each peer's memory here is a dict (the store is another part), searched by a bag of
words; admission is a stand-in the test sets: admit (then announce in turn, as the
service does) or refuse."""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from peerd.agents.sealing import seal
from peerd.memory.diffusion import Diffusion
from peerd.memory.item import ItemStats, MemoryItem, Record, sign_item
from peerd.node import Node
from protocols.codec import decode, encode
from protocols.errors import PeerError
from protocols.framing import encode_uvarint, frame, read_frame
from protocols.memory import (
    MEMORY,
    TOPIC,
    ItemAnnounce,
    MemoryItemMsg,
    MemoryReply,
    MemoryRequest,
    SignedItem,
)
from protocols.spec import ErrorReply
from tests.harness import Rogue, dial, error_code, rogue_host, swarm, wait_for

# ---- a dict-backed memory and a stand-in admission ---------------------------------------


def words(text: str) -> Counter[str]:
    return Counter(re.findall(r"[a-z0-9]+", text.lower()))


def cosine(a: Counter[str], b: Counter[str]) -> float:
    dot = sum(a[w] * b[w] for w in a)
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


class DictMemory:
    def __init__(self) -> None:
        self.items: dict[str, tuple[MemoryItem, SignedItem]] = {}

    def add(self, item: MemoryItem, signed: SignedItem) -> None:
        self.items[item.id] = (item, signed)

    async def signed(self, ids: Sequence[str]) -> list[SignedItem]:
        return [self.items[i][1] for i in ids if i in self.items]

    async def search(self, query: str, k: int, domain: str | None
                     ) -> list[tuple[SignedItem, float]]:
        q = words(query)
        hits = [(signed, cosine(q, words(item.text))) for item, signed in self.items.values()
                if domain is None or item.domain == domain]
        return sorted(hits, key=lambda h: -h[1])[:k]

    async def has(self, item_id: str) -> bool:
        return item_id in self.items


@dataclass
class Peer:
    node: Node
    memory: DictMemory
    admit: bool = True  # the stand-in admission's verdict on every candidate
    candidates: list[tuple[MemoryItem, str]] = field(default_factory=list)  # (item, source)
    diffusion: Diffusion = field(init=False)

    async def on_candidate(self, item: MemoryItem, signed: SignedItem, source: str) -> None:
        self.candidates.append((item, source))
        self.diffusion.report(item.author, self.admit)
        if self.admit:
            self.memory.add(item, signed)
            self.diffusion.announce(record(item, signed))

    def write(self, text: str, domain: str = "arithmetic", announce: bool = True
              ) -> MemoryItem:
        """An item of our own, admitted and (by default) announced."""
        item, signed = sign_item(self.node.key_pair.private_key, self.node.peer_id, text,
                                 domain, "example")
        self.memory.add(item, signed)
        if announce:
            assert self.diffusion.announce(record(item, signed))
        return item


def record(item: MemoryItem, signed: SignedItem, utility: float = 0.2) -> Record:
    return Record(item, signed, ItemStats(weight=utility, admitted_utility=utility))


def topic_peers(node: Node) -> set[str]:
    return {str(p) for p in node.pubsub.peer_topics.get(TOPIC, set())}


@contextlib.asynccontextmanager
async def memory_peers(nodes: Sequence[Node], **options: Any) -> AsyncIterator[list[Peer]]:
    """Diffusion on each node (options for all of them), in a nursery closed first."""
    async with trio.open_nursery() as nursery:
        peers = []
        for node in nodes:
            peer = Peer(node, DictMemory())
            peer.diffusion = Diffusion(node, peer.memory, peer.on_candidate,
                                       fetch_timeout_s=3.0, **options)
            await peer.diffusion.start(nursery)
            peers.append(peer)
        yield peers
        nursery.cancel_scope.cancel()


async def hear_each_other(nodes: Sequence[Node]) -> None:
    ids = {n.peer_id for n in nodes}
    for node in nodes:
        neighbours = {str(p) for p in node.host.get_network().connections} & ids
        await wait_for(lambda node=node, n=neighbours: topic_peers(node) >= n,
                       what=f"{node.name} hears its neighbours on {TOPIC}")


# ---- diffusion -------------------------------------------------------------------------


async def test_an_item_announced_by_a_reaches_b_and_c_once(tmp_path: Path) -> None:
    """A line A - B - C: B fetches from A; C hears A's announcement through B but cannot
    dial A, and fetches from B once B has admitted the item and announced it in turn."""
    async with swarm(3, tmp_path, target_peers=1) as nodes, memory_peers(nodes) as peers:
        a, b, c = peers
        await hear_each_other(nodes)
        item = a.write("Q: 17 + 25? Add the tens, then the ones: 30 + 12 = 42. A: 42")
        await wait_for(lambda: b.candidates and c.candidates, 20.0, "B and C get the item")
        assert b.candidates == [(item, a.node.peer_id)]
        assert c.candidates == [(item, b.node.peer_id)]
        assert (await c.memory.signed([item.id]))[0] == a.memory.items[item.id][1]
        # announced again (soft state, a restart): nobody fetches or admits it twice
        a.diffusion.announce(record(*a.memory.items[item.id]))
        await wait_for(lambda: c.diffusion.counts["heard"] >= 3, what="C hears it again")
        await trio.sleep(0.3)
        assert len(b.candidates) == len(c.candidates) == 1
        assert a.diffusion.counts["served_items"] == 1
        assert not any(n.offences for n in nodes)


async def test_a_remote_search_returns_the_peers_nearest_items(tmp_path: Path) -> None:
    async with swarm(2, tmp_path, target_peers=1) as nodes, memory_peers(nodes) as peers:
        a, b = peers
        texts = ["to add two numbers add the ones then the tens",
                 "to multiply by ten append a zero",
                 "subtract by counting up from the smaller number",
                 "add numbers column by column carrying the tens",
                 "a haiku has three lines"]
        items = [a.write(t, announce=False) for t in texts]
        poem = a.write("numbers in a poem: add rhythm", domain="poetry", announce=False)
        query = "how do I add two numbers"
        found = await b.diffusion.search_remote(a.node.peer_id, query, 3)
        local = await a.memory.search(query, 3, None)  # the reference: A's own answer
        assert [f.signed for f in found] == [s for s, _ in local]
        assert [f.similarity for f in found] == pytest.approx([sim for _, sim in local])
        assert found[0].item == items[0] and len(found) == 3
        found = await b.diffusion.search_remote(a.node.peer_id, query, 5, "poetry")
        assert [f.item for f in found] == [poem]
        # a fetch returns what A holds of what was asked, verified
        got = await b.diffusion.fetch(a.node.peer_id, [items[1].id, "f" * 64, items[4].id])
        assert sorted(i.id for i, _ in got) == sorted([items[1].id, items[4].id])
        assert b.candidates == [] and not b.node.offences


# ---- a rogue peer ----------------------------------------------------------------------


def rogue_item(rogue: Rogue, text: str, author: str | None = None) -> tuple[bytes, bytes]:
    """(body, the rogue's signature over it) of an item naming `author` (the rogue)."""
    msg = MemoryItemMsg(text=text, domain="arithmetic", kind="rule",
                        author=author or rogue.peer_id, origin="", parent="", created=1.7e9)
    return seal(msg, rogue.key_pair.private_key)


def announce_of(body: bytes, author: str) -> ItemAnnounce:
    return ItemAnnounce(item_id=SignedItem(body=body, sig=b"").item_id, domain="arithmetic",
                        author=author, utility=0.5, created=1.7e9)


def serve_raw(rogue: Rogue, replies: dict[str, bytes | list[bytes]]) -> None:
    """The rogue answers a fetch of item id X with the raw bytes `replies[X]` (or the
    next of a list of them)."""

    async def handler(stream: Any) -> None:
        try:
            with trio.move_on_after(5.0):
                request = decode(await read_frame(stream, 64 * 1024), MemoryRequest)
                reply = replies.get(request.ids[0], frame(b"\x80"))
                await stream.write(reply.pop(0) if isinstance(reply, list) else reply)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    rogue.host.set_stream_handler(TProtocol(MEMORY.id), handler)


@contextlib.asynccontextmanager
async def rogue_on_topic(tmp_path: Path, node: Node) -> AsyncIterator[Rogue]:
    async with rogue_host(tmp_path, pubsub=True) as rogue:
        await dial(rogue.host, node)
        pid = ID.from_base58(node.peer_id)
        assert rogue.pubsub is not None
        await wait_for(lambda: pid in rogue.pubsub.peer_topics.get(TOPIC, set()),  # type: ignore[union-attr]
                       what=f"the rogue hears {node.name} on {TOPIC}")
        yield rogue


async def publish_slowly(rogue: Rogue, messages: Sequence[bytes]) -> None:
    for data in messages:  # under the rogue's own pubsub rate limit (10/s)
        await rogue.publish(data, TOPIC)
        await trio.sleep(0.12)


async def test_a_rogues_bad_items_and_messages_are_refused_and_counted(tmp_path: Path
                                                                       ) -> None:
    honest = str(ID.from_pubkey(create_new_key_pair().public_key))
    async with swarm(2, tmp_path, target_peers=1) as nodes, \
            memory_peers(nodes, announce_burst=20) as peers, \
            rogue_on_topic(tmp_path, nodes[0]) as rogue:
        a, b = peers
        rid = rogue.peer_id
        forged = rogue_item(rogue, "forged: signed by the rogue in another's name", honest)
        tampered, other = rogue_item(rogue, "announced"), rogue_item(rogue, "served instead")
        posing = rogue_item(rogue, "the rogue's own, announced as another's")
        big, garbage = rogue_item(rogue, "oversized"), rogue_item(rogue, "malformed")
        serve_raw(rogue, {
            announce_of(forged[0], honest).item_id: frame(encode(MemoryReply(
                items=(SignedItem(*forged),), similarities=()))),
            announce_of(tampered[0], rid).item_id: frame(encode(MemoryReply(
                items=(SignedItem(*other),), similarities=()))),
            announce_of(posing[0], honest).item_id: frame(encode(MemoryReply(
                items=(SignedItem(*posing),), similarities=()))),
            announce_of(big[0], rid).item_id: encode_uvarint(MEMORY.max_response_bytes + 1)
            + b"x" * 64,
            announce_of(garbage[0], rid).item_id: frame(b"\xc1 not msgpack"),
        })
        await hear_each_other(nodes)
        await publish_slowly(rogue, [
            encode(announce_of(forged[0], honest)), encode(announce_of(tampered[0], rid)),
            encode(announce_of(posing[0], honest)), encode(announce_of(big[0], rid)),
            encode(announce_of(garbage[0], rid)),
            # and on gossip itself: garbage, an oversized announcement, a bad value
            b"\xc1 garbage", encode(announce_of(big[0], "x" * 2000)),
            encode(announce_of(garbage[0], rid)).replace(b"arithmetic", b"ARITHMETIC"),
        ])
        offences = a.node.offences[rid]
        want = {"bad_signature": 1, "tampered": 1, "impersonation": 1, "oversized": 2,
                "malformed": 3}
        await wait_for(lambda: offences == want, what=f"offences {dict(offences)}")
        # bad requests to A's own memory: each an error reply, each counted
        cases = [
            (frame(b"\xc1garbage"), "malformed"),
            (encode_uvarint(MEMORY.max_request_bytes + 1) + b"x" * 64, "oversized"),
            (frame(encode(MemoryRequest(ids=("a" * 64,), query="both", k=1, domain=""))),
             "malformed"),
            (frame(encode(MemoryRequest.searching("q", 0))), "malformed"),
            (frame(encode(MemoryRequest.fetching(tuple(f"{i:064x}" for i in range(33))))),
             "oversized"),
            (frame(encode(announce_of(big[0], rid))), "wrong_type"),
        ]
        for raw, code in cases:
            assert error_code(await rogue.exchange(a.node, MEMORY.id, raw)) == code, raw[:30]
        assert sum(offences.values()) == sum(want.values()) + len(cases)
        assert a.candidates == [] and a.memory.items == {}
        # A keeps serving, and keeps taking honest items
        item = b.write("carry the one when a column sums past nine")
        await wait_for(lambda: a.candidates, what="A gets B's item")
        assert a.candidates == [(item, b.node.peer_id)]
        found = await b.diffusion.search_remote(a.node.peer_id, "carry a column", 1)
        assert [f.item for f in found] == [item]
        assert not b.node.offences


async def test_a_rogue_reply_to_a_search_is_refused(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as nodes, memory_peers(nodes) as peers, \
            rogue_host(tmp_path) as rogue:
        a = peers[0]
        await dial(rogue.host, a.node)
        _, signed = sign_item(rogue.key_pair.private_key, rogue.peer_id, "x", "poetry", "rule")
        rogue.answer(MEMORY.id, frame(encode(MemoryReply(items=(signed,) * 2,
                                                         similarities=(0.9, 0.8)))))
        with pytest.raises(PeerError, match="2 items"):
            await a.diffusion.search_remote(rogue.peer_id, "x", 1)
        rogue.answer(MEMORY.id, frame(encode(MemoryReply(items=(signed,),
                                                         similarities=(0.9,)))))
        with pytest.raises(PeerError, match="poetry"):
            await a.diffusion.search_remote(rogue.peer_id, "x", 1, "arithmetic")
        assert a.node.offences[rogue.peer_id] == {"malformed": 1, "wrong_domain": 1}


async def test_an_announcement_flood_is_cut_by_the_bucket(tmp_path: Path) -> None:
    async with swarm(2, tmp_path, target_peers=1) as nodes, \
            memory_peers(nodes, announce_burst=3, announce_per_s=0.01) as peers, \
            rogue_on_topic(tmp_path, nodes[0]) as rogue:
        a, b = peers
        await hear_each_other(nodes)
        await publish_slowly(rogue, [encode(announce_of(rogue_item(rogue, f"spam {i}")[0],
                                                        rogue.peer_id)) for i in range(8)])
        offences = a.node.offences[rogue.peer_id]
        await wait_for(lambda: offences["memory_flood"] == 5, what=f"offences {offences}")
        assert a.diffusion.counts["heard"] == 3
        # an honest peer's announcement still goes through
        item = b.write("halve an even number by halving its digits' pairs")
        await wait_for(lambda: a.candidates == [(item, b.node.peer_id)], what="B's item")
        assert not a.node.offences.get(b.node.peer_id)


# ---- the record of authors -------------------------------------------------------------


async def test_an_author_whose_items_keep_failing_is_fetched_from_no_more(tmp_path: Path
                                                                           ) -> None:
    async with swarm(2, tmp_path, target_peers=1) as nodes, memory_peers(nodes) as peers:
        a, b = peers
        b.admit = False  # B's replay refuses whatever A writes
        await hear_each_other(nodes)
        for i in range(3):
            a.write(f"a harmful rule number {i}: always answer 7")

        def offences() -> int:
            return b.node.offences[a.node.peer_id]["harmful_memory"]

        await wait_for(lambda: offences() == 3, what="three refusals counted")
        assert b.diffusion.authors.blocked(a.node.peer_id, b.diffusion.clock())
        assert a.diffusion.counts["served_items"] == 3
        a.write("a fourth harmful rule")
        await wait_for(lambda: b.diffusion.counts["backed_off"] == 1, what="back-off")
        await trio.sleep(0.3)
        assert a.diffusion.counts["served_items"] == 3 and len(b.candidates) == 3
        assert b.diffusion.status()["diffusion"]["authors_blocked"] == 1


async def test_a_refused_item_is_not_fetched_again_when_announced_again(tmp_path: Path
                                                                         ) -> None:
    async with swarm(2, tmp_path, target_peers=1) as nodes, memory_peers(nodes) as peers:
        a, b = peers
        b.admit = False
        await hear_each_other(nodes)
        item = a.write("round 2.5 to 2: to the even neighbour")
        await wait_for(lambda: b.candidates, what="B gets the item")
        a.diffusion.announce(record(*a.memory.items[item.id]))
        await wait_for(lambda: b.diffusion.counts["heard"] == 2, what="B hears it again")
        await trio.sleep(0.3)
        assert a.diffusion.counts["served_items"] == 1 and len(b.candidates) == 1
        assert b.node.offences[a.node.peer_id] == {"harmful_memory": 1}
        assert not b.diffusion.authors.blocked(a.node.peer_id, b.diffusion.clock())


async def test_a_publisher_busy_at_first_is_asked_again(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as nodes, memory_peers(nodes) as peers, \
            rogue_on_topic(tmp_path, nodes[0]) as rogue:
        a = peers[0]
        body, sig = rogue_item(rogue, "a fine item from a busy peer")
        busy = frame(encode(ErrorReply(code="busy", message="too many streams")))
        good = frame(encode(MemoryReply(items=(SignedItem(body, sig),), similarities=())))
        replies: list[bytes] = [busy, busy, good]
        serve_raw(rogue, {announce_of(body, rogue.peer_id).item_id: replies})
        await rogue.publish(encode(announce_of(body, rogue.peer_id)), TOPIC)
        await wait_for(lambda: a.candidates, what="A gets the item on the third try")
        assert a.candidates[0][0].text == "a fine item from a busy peer" and replies == []
        assert a.diffusion.counts["fetched"] == 1 and not a.node.offences
