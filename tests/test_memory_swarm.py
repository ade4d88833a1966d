"""Memory across peers, service to service over real libp2p hosts: an item one peer
admits reaches another, which admits it only by its own replay. Where the item helps on
the receiver's tasks it is kept there (authored by the first peer, fetched from it);
where it hurts there it is refused, and the author is counted an offence."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from peerd.inference.slot import ModelOptions, ModelSlot
from peerd.memory.service import Memory
from tests.harness import gossip, swarm
from tests.models import tiny_llama_dir
from tests.test_memory_service import LOOSE, planted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@contextlib.asynccontextmanager
async def two_peers(tmp_path: Path, tiny: Path) -> AsyncIterator[list[Memory]]:
    async with swarm(2, tmp_path) as nodes:
        memories = []
        for node in nodes:
            slot = ModelSlot(node, gossip(node), ModelOptions(str(tiny), torch_threads=1))
            memory = Memory(node, slot, node.config.data_dir, embedder="hashing",
                            settings=LOOSE, task_similarity=0.0)
            await node.start(slot, memory)
            await slot.settled.wait()
            memories.append(memory)
        yield memories


async def heard_from(memory: Memory, author: str) -> str:
    """The state of the first candidate `memory` took from `author`, once decided."""
    assert memory.admissions is not None
    with trio.fail_after(60):
        while True:
            for c in list(memory.admissions.candidates.values()):
                if c.source == author and c.done.is_set():
                    return c.state
            await trio.sleep(0.1)


async def test_an_item_that_helps_there_too_is_admitted_by_the_receivers_replay(
        tmp_path: Path, tiny: Path) -> None:
    async with two_peers(tmp_path, tiny) as (a, b):
        candidate, runs = await planted(a, "chat", helps=True)
        await planted(b, "chat", helps=True)  # b's own runs, where it helps as well
        c = await a.propose(candidate, "chat", "rule", origin=runs[0])
        await c.done.wait()
        assert c.state == "admitted", c.to_json()
        assert await heard_from(b, a.node.peer_id) == "admitted"
        kept = await b.live_store().get(c.item_id)
        assert kept is not None
        assert kept.item.author == a.node.peer_id and kept.stats.source == a.node.peer_id
        # b measured it itself: its weight is its own replay's, not a's word
        assert b.admissions is not None
        ours = next(x for x in b.admissions.candidates.values()
                    if x.source == a.node.peer_id)
        assert ours.utility is not None
        assert kept.stats.admitted_utility == pytest.approx(ours.utility.total)


async def test_an_item_that_hurts_there_is_refused_and_counted_against_its_author(
        tmp_path: Path, tiny: Path) -> None:
    async with two_peers(tmp_path, tiny) as (a, b):
        candidate, runs = await planted(a, "chat", helps=True)
        await planted(b, "chat", helps=False)  # on b's runs, the same text hurts
        c = await a.propose(candidate, "chat", "rule", origin=runs[0])
        await c.done.wait()
        assert c.state == "admitted"
        assert await heard_from(b, a.node.peer_id) == "refused"
        assert await b.live_store().get(c.item_id) is None
        assert b.node.offences[a.node.peer_id]["harmful_memory"] == 1
