"""What the rest of the peer asks of its memory, without importing it: the notes to
put before a prompt (`Recall`: the OpenAI endpoints' and Symphony's `memory` option),
and the keeping of a scored run (`ScoredRuns`: Symphony's tasks with a reference, RL
rollouts with their reward). The memory service (peerd/memory/) gives both; the daemon
hands it to the services that ask, which know no memory of their own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from protocols.memory import ScecMsg


@dataclass(frozen=True, slots=True)
class Note:
    id: str
    text: str
    domain: str
    similarity: float
    weight: float
    score: float  # similarity x weight: what ranked it

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "domain": self.domain, "similarity": self.similarity,
                "weight": self.weight, "score": self.score}


class Recall(Protocol):
    async def notes(self, text: str, k: int | None, domain: str | None) -> list[Note]:
        """The items to give a request on `text`, best first (at most k; the memory's
        own k when None); ModelUnavailable while the memory is still opening."""
        ...


class ScoredRuns(Protocol):
    async def observe(self, scec: ScecMsg, used: Sequence[str], *, served: bool = True
                      ) -> str:
        """Keep a scored run's SCEC; its hash. `used`: the ids of the items it was given,
        whose weights move by its score against the domain's no-memory baseline (with
        none, the baseline moves). `served` False: the run was not the served model's own
        (an RL policy sampling as it trains): kept as an admission task, nothing moves.
        ModelUnavailable while the memory is still opening; WireError for an SCEC out of
        bounds."""
        ...
