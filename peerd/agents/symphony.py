"""Symphony as a service: both sides of decentralised multi-agent work on one node.

The requester side (requester.py) runs this peer's tasks: beacon, election, seats,
vote, reputation. The worker side (worker.py) bids on other peers' beacons where our
model can answer and our skills match, and answers the tasks it bid on.

In our ledger entry Symphony owns the skills we advertise (from the config, changed
through `POST /capabilities`), our reputation observations of other peers, and the
optional task fields we understand (`features`). It serves `/v1/tasks` and
`/capabilities` in the local API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd.agents.record import TaskRecord, TaskSpec
from peerd.agents.requester import Requester
from peerd.agents.skills import LexicalMatcher, SkillMatcher
from peerd.agents.solver import Solver
from peerd.agents.worker import TaskWorker
from peerd.api.recall import Recall, ScoredRuns
from peerd.api.tasks import routes
from peerd.ledger.gossip import LedgerGossip
from peerd.node import Node
from peerd.service import EntryFields, Service
from protocols.beacon import TOPIC
from protocols.ledger import LedgerEntry
from protocols.task import FEATURES

if TYPE_CHECKING:
    from starlette.routing import BaseRoute


class Symphony(Service):
    name = "symphony"

    def __init__(self, node: Node, ledger: LedgerGossip, solver: Solver | None = None,
                 matcher: SkillMatcher | None = None, *, skills: Sequence[str] = (),
                 warm_up: bool = False) -> None:
        self.node = node
        self.ledger = ledger
        self.skills = tuple(skills)
        # the optional task fields we understand, told to others in our ledger entry
        self.features: tuple[str, ...] = FEATURES
        self.worker = TaskWorker(node, solver, matcher or LexicalMatcher(),
                                 lambda: self.skills)
        self.requester = Requester(node, ledger.book, solver, self.worker)
        self.warm_up = warm_up  # load the skill matcher's model once our model is up
        # the peer's memory, for a task's `memory` option (the daemon hands it over)
        self.recall: Recall | None = None
        # and for a task with a reference: it keeps the scored run (agents/scored.py)
        self.scored: ScoredRuns | None = None

    def set_skills(self, skills: Sequence[str]) -> LedgerEntry:
        """Change our advertised skills; the new entry goes out on gossip at once.
        EntryTooLarge (ledger/book.py) when they do not fit in it: the old ones stay."""
        before, self.skills = self.skills, tuple(skills)
        try:
            return self.ledger.refresh()
        except ValueError:
            self.skills = before
            raise

    async def run_task(self, spec: TaskSpec) -> TaskRecord:
        return await self.requester.run_task(spec, self.scored)

    async def task(self, task_id: str) -> dict[str, Any] | None:
        return await self.requester.task(task_id)

    # ---- the service ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve the task and bid protocols and follow beacons until cancelled."""
        try:
            self.worker.register()
            self.requester.register()
            subscription = await self.node.pubsub.subscribe(TOPIC)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.worker.follow, subscription)
                if self.warm_up:
                    nursery.start_soon(self.worker.warm_up)
                task_status.started()
        finally:
            self.requester.close()

    def entry_fields(self) -> EntryFields:
        own = self.node.peer_id
        return {"skills": self.skills, "features": self.features,
                "reputation": {p: s for p, s in self.requester.book.published().items()
                               if p != own}}

    def routes(self) -> Sequence[BaseRoute]:
        return routes(self)

    def status(self) -> dict[str, Any]:
        """Our skills, and who holds our task seats (worker.py)."""
        return {"skills": list(self.skills), "lent": {"seats": self.worker.seats.held()}}
