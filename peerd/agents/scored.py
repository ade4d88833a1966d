"""A Symphony task with a reference answer: its settled answer scored, and the run kept
by this peer's memory as a self-contained execution context (SCEC, docs/sedm.md).

The SCEC describes the run as the requester saw it. Its prompt is the user's question
(the memory's notes, which the workers got before it, are its `memory`, by id); its
output the settled answer, scored against the reference; its sampling that of the
seat whose chain settled it (the heaviest vote for the settled answer): temperature,
seed and token budget as the requester assigned them, top_p as a worker's solver
samples (solver.py). Its model is what that worker's ledger entry says it serves, or
else this peer's own served model, or "unknown" (a worker that advertises skills only);
the version is "" (the base model): the ledger names no policy version. It is an
admission task, not a reproduction: a worker's prompt adds its answer format's examples
(solver.py), so a replay of the SCEC on one model asks the bare question, as every
admission replay does (admission.py).

The reference never leaves this peer: it is in no beacon and no task request.
"""

from __future__ import annotations

import logging

from peerd.agents.record import TaskRecord, Vote
from peerd.api.recall import ScoredRuns
from peerd.inference.face import ModelUnavailable
from peerd.ledger.book import Ledger
from peerd.memory.scoring import score
from protocols.errors import WireError
from protocols.memory import MAX_LATENCY_S, ScecMsg

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown"  # no ledger entry names a model the answer came from


def score_of(record: TaskRecord) -> float:
    """The settled answer against the task's reference (0 when nothing settled)."""
    spec = record.spec
    if spec.reference is None:
        raise ValueError(f"task {record.id} has no reference to score against")
    if record.answer is None:
        return 0.0
    return score(spec.scorer, record.answer, spec.reference)


def settling_vote(record: TaskRecord) -> Vote | None:
    """The heaviest vote for the settled answer (the lowest seat on a tie); else the
    heaviest vote; None without votes."""
    votes = [v for v in record.votes if v.answer == record.answer] or record.votes
    return min(votes, key=lambda v: (-v.weight, v.seat)) if votes else None


def served_model(ledger: Ledger, worker: str | None, own: str) -> str:
    """The model id the worker's ledger entry serves (the head's shard first), else our
    own served model's, else UNKNOWN_MODEL."""
    for peer in (worker, own):
        entry = ledger.get(peer) if peer else None
        if entry is not None and entry.models:
            return min(entry.models, key=lambda m: m.layer_start).model_id
    return UNKNOWN_MODEL


def scec_of(record: TaskRecord, score_: float, model: str) -> ScecMsg:
    """The SCEC of a settled, scored task. WireError when a field is out of bounds (a
    question longer than an SCEC keeps): the run is then not kept."""
    spec = record.spec
    assert spec.reference is not None
    vote = settling_vote(record)
    request = vote.request if vote is not None else None
    temperature = request.temperature if request is not None else 0.0
    scec = ScecMsg(
        prompt=spec.task_prompt, domain=spec.domain, model=model, version="",
        max_tokens=request.max_tokens if request is not None else spec.max_tokens,
        temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,  # as solver.py
        seed=request.seed if request is not None else None, stop=(),
        memory=spec.memory, memory_ids=spec.memory_ids, answer=spec.reference,
        scorer=spec.scorer, output=record.answer or "", score=score_, prompt_tokens=0,
        latency_s=min(record.total_ms / 1e3, MAX_LATENCY_S))
    scec.check()
    return scec


async def keep(record: TaskRecord, ledger: Ledger, own: str, scored: ScoredRuns | None
               ) -> None:
    """Score a settled task with a reference, and hand its SCEC to the memory (when this
    peer keeps one): `record.score` and `record.scec` are set. A run the memory cannot
    keep (still opening, a field out of bounds) is logged; the task stands."""
    record.score = score_of(record)
    if scored is None:
        return
    vote = settling_vote(record)
    model = served_model(ledger, vote.peer_id if vote is not None else None, own)
    try:
        record.scec = await scored.observe(scec_of(record, record.score, model),
                                           record.spec.memory_ids)
    except (WireError, ModelUnavailable) as exc:
        log.warning("task %s: its run is not kept by the memory: %s", record.id, exc)
