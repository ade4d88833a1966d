"""Helpers for Symphony tests over real in-process hosts: fake solvers (no model),
matchers that claim what a test needs, and running a `Symphony` on each node."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.peer.id import ID

from peerd.agents.skills import SkillMatcher
from peerd.agents.solver import Solution, Solver
from peerd.agents.symphony import Symphony
from peerd.node import Node
from protocols.beacon import TOPIC
from protocols.task import TaskRequest
from tests.harness import book, gossip, has_entry, wait_for


def true_sum(question: str) -> str:
    """The answer to "What is A + B?" (the questions these tests ask)."""
    a, b = map(int, re.findall(r"\d+", question)[:2])
    return str(a + b)


@dataclass
class FakeSolver:
    """Answers `answer(question)` after `delay_s`, with a chain that states it."""

    answer: Callable[[str], str] = true_sum
    confidence: float = 0.5
    delay_s: float = 0.0
    able: bool = True
    # what measuring a chain gives as a requester (None: this peer cannot measure)
    measures: Callable[[TaskRequest, str], float | None] = lambda request, cot: None
    solved: int = 0
    requests: list[TaskRequest] = field(default_factory=list)  # as they arrived
    gate: trio.Semaphore | None = None  # when given, each solve waits for one token

    def capable(self) -> bool:
        return self.able

    async def solve(self, request: TaskRequest) -> Solution:
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.acquire()
        await trio.sleep(self.delay_s)
        self.solved += 1
        said = self.answer(request.question)
        return Solution(said, f"Adding the two numbers gives {said}.\nAnswer: {said}",
                        self.confidence, tokens=12)

    async def measure(self, request: TaskRequest, cot: str) -> float | None:
        return self.measures(request, cot)


def liar(question: str) -> str:
    return str(int(true_sum(question)) + 1)


@dataclass
class FixedMatcher:
    """Claims the same match for every requirement (a liar claims 1.0), after `delay_s`
    (it runs in a worker thread: its bids come that much later)."""

    score: float
    name: str = "fixed"
    delay_s: float = 0.0

    def match(self, requirement: str, skills: Sequence[str]) -> float:
        if self.delay_s > 0:
            import time

            time.sleep(self.delay_s)
        return self.score


@dataclass
class SlowMatcher:
    """A matcher that takes `delay_s` (it runs in a worker thread): its bids come late."""

    delay_s: float
    name: str = "slow"

    def match(self, requirement: str, skills: Sequence[str]) -> float:
        import time

        time.sleep(self.delay_s)
        return 0.0


@contextlib.asynccontextmanager
async def symphonies(nodes: Sequence[Node], solvers: Sequence[Solver | None],
                     matchers: Sequence[SkillMatcher | None] | None = None,
                     skills: Sequence[Sequence[str]] | None = None,
                     ) -> AsyncIterator[list[Symphony]]:
    """A running Symphony on each node, advertising `skills` (one list per node, as
    `peerd start --skill` gives them); they stop with their nodes."""
    matchers = matchers or [None] * len(nodes)
    skills = skills or [()] * len(nodes)
    services = [Symphony(n, gossip(n), s, m, skills=k)
                for n, s, m, k in zip(nodes, solvers, matchers, skills, strict=True)]
    for node, service in zip(nodes, services, strict=True):
        await node.start(service)
        # started after the ledger's service: announce the skills at once (a daemon
        # starts them together, so its first entry has them)
        gossip(node).refresh()
    yield services


def in_beacon_mesh(node: Node, peers: Sequence[Node]) -> bool:
    mesh = node.pubsub.router.mesh.get(TOPIC, set())
    return all(ID.from_base58(p.peer_id) in mesh for p in peers)


async def ready_to_elect(requester: Node, workers: Sequence[Node]) -> None:
    """The requester's beacons reach every worker, and it expects their bids."""
    await wait_for(lambda: in_beacon_mesh(requester, workers), 15,
                   "every worker in the requester's beacon mesh")
    await wait_for(lambda: all(has_entry(requester, w.peer_id) and
                               (book(requester).get(w.peer_id).skills  # type: ignore[union-attr]
                                or book(requester).get(w.peer_id).models)  # type: ignore[union-attr]
                               for w in workers), 15, "the workers' skills in the ledger")
