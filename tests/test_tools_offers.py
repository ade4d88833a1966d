"""The swarm's tool offers at scale (peerd/plans/service.py `offers`, with Symphony's
reputation views, peerd/agents/reputation.py): a book of thousands of ledger entries
costs one walk of their reports, not one walk per entry, and the batched views are
exactly the single ones."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from libp2p.crypto.ed25519 import create_new_key_pair

from peerd.agents import reputation
from peerd.config import Config
from peerd.node import Node
from peerd.plans.service import Tools
from protocols.ledger import LedgerEntry
from protocols.tool import ToolBrief


class Counted(Mapping[str, float]):
    """A peer's published scores that count every score read out of them."""

    reads = 0

    def __init__(self, scores: dict[str, float]) -> None:
        self._scores = scores

    def __getitem__(self, key: str) -> float:
        Counted.reads += 1
        return self._scores[key]

    def __iter__(self) -> Iterator[str]:
        Counted.reads += len(self._scores)
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, key: object) -> bool:
        Counted.reads += 1
        return key in self._scores


def random_reports(rng: random.Random, peers: list[str], owner: str
                   ) -> dict[str, dict[str, Any]]:
    """Each observer's published scores, the owner's among them; some reports are junk
    (out of range, not numbers) as a peer may publish them."""
    junk: list[Any] = [1.5, -0.1, float("nan"), True, "0.5", None]
    reports: dict[str, dict[str, Any]] = {}
    for observer in [*peers, owner]:
        if rng.random() < 0.2:
            continue  # publishes nothing
        scores: dict[str, Any] = {}
        for subject in rng.sample(peers, rng.randint(0, len(peers))):
            scores[subject] = rng.choice(junk) if rng.random() < 0.1 else rng.random()
        reports[observer] = scores
    return reports


def test_batched_views_are_exactly_the_single_views() -> None:
    rng = random.Random(7)
    for trial in range(200):
        peers = [f"p{i}" for i in range(rng.randint(1, 12))]
        owner = "me"
        reports = random_reports(rng, peers, owner)
        own = {p: v for p, v in reports.get(owner, {}).items()
               if isinstance(v, float) and 0.0 <= v <= 1.0}
        subjects = rng.sample([*peers, owner, "stranger"], rng.randint(0, len(peers) + 2))
        batched = reputation.views(subjects, owner, own, reports)
        assert batched == {s: reputation.view(s, owner, own, reports) for s in subjects}, trial


def test_batched_views_read_each_report_once_not_once_per_subject() -> None:
    peers = [f"p{i}" for i in range(3000)]
    reports: dict[str, Mapping[str, float]] = {
        p: Counted({q: 0.5 for q in peers[i:i + 3]}) for i, p in enumerate(peers)}
    subjects = peers[:200]
    Counted.reads = 0
    got = reputation.views(subjects, "me", {}, reports)
    assert len(got) == 200
    # at most a few reads per published score: 3000 reports of 3 scores, not 200 x 3000
    assert Counted.reads <= 4 * 3 * len(peers), Counted.reads


def lone_node(tmp: Path, peer_id: str) -> Node:
    """A node object with no network: what `Tools.offers` reads of the kernel."""
    host = SimpleNamespace(get_id=lambda: peer_id)
    return Node(Config(data_dir=tmp), create_new_key_pair(), host, pubsub=None)  # type: ignore[arg-type]


def entry(peer: str, scores: Mapping[str, float], tools: tuple[ToolBrief, ...] = ()
          ) -> LedgerEntry:
    return LedgerEntry(peer_id=peer, seq=1, timestamp=0.0, ttl_s=60.0, name=peer[-4:],
                       reputation=scores, tools=tools)  # type: ignore[arg-type]


async def test_offers_over_thousands_of_entries_walk_the_reports_once(tmp_path: Path) -> None:
    peers = [f"peer{i:05d}" for i in range(4096)]
    offering = set(peers[::512])  # few peers offer tools; every one publishes scores
    brief = ToolBrief("echo", "ab" * 32, 2)
    entries = [entry(p, Counted({q: 0.25 for q in peers[i + 1:i + 4]}),
                     (brief,) if p in offering else ()) for i, p in enumerate(peers)]
    mine = entry("me", Counted({p: 0.75 for p in peers[:100]}))
    book = SimpleNamespace(entries=lambda: [*entries, mine], get=lambda _: None)
    tools = Tools(lone_node(tmp_path, "me"), SimpleNamespace(book=book))  # type: ignore[arg-type]

    Counted.reads = 0
    offers = tools.offers()
    assert sorted(o.peer for _, o, _ in offers) == sorted(offering)
    # each entry's scores are read a bounded number of times: not once per other entry
    assert Counted.reads <= 4 * (3 * len(peers) + 100), Counted.reads

    # and the standing each offer carries is the single view of its peer
    reports = {e.peer_id: e.reputation for e in [*entries, mine]}
    for _, offer, _ in offers:
        assert offer.reputation == reputation.view(offer.peer, "me", mine.reputation,
                                                   reports)
    Counted.reads = 0  # a dispatch asks for one tool's offers the same way
    assert len(tools.offers("echo")) == len(offering)
    assert Counted.reads <= 4 * (3 * len(peers) + 100), Counted.reads
