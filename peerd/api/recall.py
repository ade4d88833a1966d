"""What the OpenAI endpoints ask of a peer's memory for a request with `memory` set:
the notes to put before the prompt. The memory service (peerd/memory/) gives it; the
daemon hands it to the model service, which knows no memory of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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
