"""A task this peer requests, as the API sees it: what the user asked (`TaskSpec`),
each worker's vote, and the record `GET /v1/tasks/{id}` shows while it runs and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peerd.agents.election import Candidate, Fallback
from protocols.beacon import MAX_BID_WINDOW_S, MAX_REQUIREMENT_CHARS
from protocols.task import TaskRequest


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a user asks for (validated by the API)."""

    question: str
    workers: int = 3
    requirement: str = ""  # "" -> the question
    deadline_s: float = 120.0  # each worker's time to answer
    answer_format: str = "text"
    max_tokens: int = 256
    bid_window_s: float = 2.0
    min_match: float = 0.0
    # A scored task (agents/scored.py): the settled answer is scored against `reference`
    # by `scorer` (peerd/memory/scoring.py), and the run kept by the memory as an SCEC
    # in `domain`. The reference never leaves this peer: a worker that saw it could
    # answer it without solving anything.
    reference: str | None = None
    scorer: str = "number"
    domain: str = "general"
    prompt: str = ""  # the question before the memory's notes went in ("" -> question)
    memory: tuple[str, ...] = ()  # the notes' texts, in prompt order
    memory_ids: tuple[str, ...] = ()  # their ids, one each

    def __post_init__(self) -> None:
        # the API says this to a user; an in-process caller learns it here, not from
        # every worker refusing the beacon in silence ("no peer bid")
        if not (math.isfinite(self.bid_window_s) and 0 < self.bid_window_s <= MAX_BID_WINDOW_S):
            raise ValueError(f"bid_window_s must be in (0, {MAX_BID_WINDOW_S:g}] s: workers "
                             f"refuse a beacon with a longer window; got {self.bid_window_s}")

    @property
    def effective_requirement(self) -> str:
        return (self.requirement or self.question)[:MAX_REQUIREMENT_CHARS]

    @property
    def task_prompt(self) -> str:
        """The user's question, without the notes the memory put before it."""
        return self.prompt or self.question


@dataclass(slots=True)
class Vote:
    seat: int
    peer_id: str
    answer: str | None  # normalised
    raw: str
    confidence: float
    match: float
    reputation: float
    cot: str
    elapsed_s: float
    request: TaskRequest  # what the worker was asked: its chain is measured against it
    weight: float = 0.0
    measured: float | None = None  # our own model's confidence in the chain


@dataclass(slots=True)
class TaskRecord:
    """A task this peer requested: what GET /v1/tasks/{id} shows, live."""

    id: str
    spec: TaskSpec
    status: str = "running"  # running | done | failed
    answer: str | None = None
    error: str = ""
    votes: list[Vote] = field(default_factory=list)
    elected: list[str] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    bids: dict[str, Candidate] = field(default_factory=dict)
    beacon_ms: float = 0.0
    solve_ms: float = 0.0
    measure_ms: float = 0.0
    total_ms: float = 0.0
    score: float | None = None  # a scored task's, once settled
    scec: str | None = None  # the hash of its SCEC, once the memory has kept it

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            **({"error": self.error} if self.error else {}),
            "answer": self.answer,
            "votes": [{"peer_id": v.peer_id, "answer": v.answer,
                       "confidence": round(v.confidence, 4),
                       "measured": None if v.measured is None else round(v.measured, 4),
                       "weight": round(v.weight, 6), "cot": v.cot}
                      for v in sorted(self.votes, key=lambda v: v.seat)],
            "elected": list(self.elected),
            "fallbacks": [{"seat": f.seat, "peer_id": f.peer_id, "reason": f.reason,
                           "replacement": f.replacement} for f in self.fallbacks],
            "timings": {"beacon_ms": round(self.beacon_ms, 3),
                        "solve_ms": round(self.solve_ms, 3),
                        "measure_ms": round(self.measure_ms, 3),
                        "total_ms": round(self.total_ms, 3)},
            **({"reference": self.spec.reference, "scorer": self.spec.scorer,
                "score": self.score, "scec": self.scec}
               if self.spec.reference is not None else {}),
        }
