"""Farmed replays: the pure rules (docs/sedm.md, "Farmed replays"). No I/O.

A farmed verdict stands on other peers' replays, so it is accepted only when it is
reproduced:

- two peers' results agree on every task: the same SCEC hashes in the job's order,
  and for each arm the same output hash, score and prompt tokens (greedy decoding of
  the same model reproduces its output exactly: replay.py); or
- the requester, when it has a model, ran some of the tasks itself and a result
  agrees with its own run on each of them.

A result a reproduction contradicts (the requester's own run, or two other peers that
agree with each other) is an offence of the peer that signed it. A result that names
other tasks than the job's is one too: it replayed something else. When two results
disagree and nothing reproduces either, nobody can tell which lied: no one is counted,
nothing is accepted.

An accepted farmed verdict's utility is the local judge's rule (admission.utility) on
the agreed scores and prompt tokens. A farmed run's wall time is the replaying peer's,
neither reproducible nor checkable, so it is not charged: Δlatency is 0.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from peerd.agents.election import Candidate
from peerd.memory.admission import TaskOutcomes, Verdict, Weights, admit, utility
from peerd.memory.replay import Outcome
from protocols.errors import PeerError
from protocols.ledger import LedgerEntry
from protocols.memory_replay import FEATURE_REPLAY, ArmReplay, ReplayResult, ScecReplay

WHOLE_MODEL_MATCH = 1.0  # a replaying peer that holds every layer itself
PIPELINE_MATCH = 0.5  # ... that runs it through the swarm's pipeline
DEFAULT_WEIGHTS = Weights()


def output_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def arm_of(outcome: Outcome) -> ArmReplay:
    return ArmReplay(output_sha256=output_hash(outcome.output), score=outcome.score,
                     prompt_tokens=outcome.prompt_tokens)


def replay_of(task: TaskOutcomes) -> ScecReplay:
    """One task as the judge ran it, as a replay result names it."""
    return ScecReplay(scec=task.task, without=arm_of(task.without),
                      with_item=arm_of(task.with_))


def agree(a: ScecReplay, b: ScecReplay) -> bool:
    """Exact: the same greedy outputs give the same scores and token counts, so any
    difference is another model, another version, or a lie."""
    return a == b


@dataclass(frozen=True, slots=True)
class Settlement:
    accepted: bool
    reason: str  # "agreed", "reproduced"; refused: "disagreed", "too_few"
    tasks: tuple[ScecReplay, ...]  # the accepted replays in the job's order; () if refused
    by: tuple[str, ...]  # the peers whose results were accepted
    offenders: tuple[str, ...]  # peers whose results were contradicted or off the job


def settle(hashes: Sequence[str], results: Mapping[str, ReplayResult],
           reproduced: Mapping[str, ScecReplay] | None = None) -> Settlement:
    """The acceptance rule. `hashes`: the job's SCEC hashes in order; `results`: the
    verified results by replaying peer; `reproduced`: the requester's own runs of some
    of the tasks, by SCEC hash (None or empty when it ran none)."""
    reproduced = {h: r for h, r in (reproduced or {}).items() if h in hashes}
    valid: dict[str, tuple[ScecReplay, ...]] = {}
    offenders: list[str] = []
    for peer, result in results.items():
        if tuple(t.scec for t in result.tasks) == tuple(hashes):
            valid[peer] = result.tasks
        else:
            offenders.append(peer)
    if reproduced:
        confirmed = [p for p, tasks in valid.items()
                     if all(agree(t, reproduced[t.scec]) for t in tasks if t.scec in reproduced)]
        offenders += [p for p in valid if p not in confirmed]
        if confirmed:
            return Settlement(True, "reproduced", valid[confirmed[0]], tuple(confirmed),
                              tuple(offenders))
        return Settlement(False, "disagreed" if valid else "too_few", (), (),
                          tuple(offenders))
    groups: defaultdict[tuple[ScecReplay, ...], list[str]] = defaultdict(list)
    for peer, tasks in valid.items():
        groups[tasks].append(peer)
    ranked = sorted(groups.items(), key=lambda g: -len(g[1]))
    if ranked and len(ranked[0][1]) >= 2 and (len(ranked) == 1
                                              or len(ranked[1][1]) < len(ranked[0][1])):
        tasks, by = ranked[0]
        offenders += [p for p in valid if p not in by]
        return Settlement(True, "agreed", tasks, tuple(by), tuple(offenders))
    return Settlement(False, "disagreed" if len(valid) >= 2 else "too_few", (), (),
                      tuple(offenders))


def verdict_of(tasks: Sequence[ScecReplay], weights: Weights = DEFAULT_WEIGHTS,
               min_gain: float = 0.0) -> Verdict:
    """The local judge's verdict on accepted farmed replays (latency not charged: its
    outcomes carry 0 s; their output is not sent, only its hash)."""

    def outcome(arm: ArmReplay) -> Outcome:
        return Outcome(output="", score=arm.score, latency_s=0.0,
                       prompt_tokens=arm.prompt_tokens, completion_tokens=0)

    judged = tuple(TaskOutcomes(t.scec, without=outcome(t.without),
                                with_=outcome(t.with_item)) for t in tasks)
    gain = utility([t.without for t in judged], [t.with_ for t in judged], weights)
    return Verdict(admitted=admit(gain, min_gain), utility=gain, tasks=judged)


def check_result(result: ReplayResult, *, job_id: str, model: str, hashes: Sequence[str],
                 replayer: str, requester: str) -> None:
    """What a verified result must say of itself to be the answer to our job from
    `replayer`. PeerError otherwise (its tasks are settle's business: a result that
    replayed other tasks is contradicted there, with the others)."""
    result.check()
    if result.replayer != replayer:
        raise PeerError(f"a replay result signed by {result.replayer:.60}, not by the peer "
                        "asked", reason="impersonation")
    if result.job_id != job_id or result.requester != requester:
        raise PeerError("a replay result for another job or requester", reason="wrong_job")
    if result.model != model:
        raise PeerError(f"a replay result on model {result.model!r:.60}, not the one asked",
                        reason="wrong_model")
    if len(result.tasks) != len(hashes):
        raise PeerError(f"a replay result of {len(result.tasks)} tasks for a job of "
                        f"{len(hashes)}", reason="wrong_job")


def replayers(entries: Iterable[LedgerEntry], model: str, me: str,
              rtt_ms: Mapping[str, float]) -> list[Candidate]:
    """The peers that could replay on `model`, as Symphony's election ranks bidders
    (peerd/agents/election.py): they list FEATURE_REPLAY and serve the model. Match:
    1 for a peer holding every layer, 0.5 for one that runs through the pipeline; load:
    its sessions and queued turns; latency: our round trip to it (a job's time is the
    model's, the same everywhere for the same model)."""
    out = []
    for e in entries:
        if e.peer_id == me or FEATURE_REPLAY not in e.features:
            continue
        served = [m for m in e.models if m.model_id == model]
        if not served:
            continue
        whole = any(m.layer_start == 0 and 0 < m.num_layers <= m.layer_end for m in served)
        out.append(Candidate(e.peer_id, WHOLE_MODEL_MATCH if whole else PIPELINE_MATCH,
                             load=e.load.sessions + e.load.queue,
                             expected_latency_s=rtt_ms.get(e.peer_id, 0.0) / 1e3))
    return out


def job_model(models: Sequence[str]) -> str:
    """The model a model-less requester asks for: the one most of its tasks were
    recorded on (the first of them on a tie)."""
    counts: dict[str, int] = {}
    for m in models:
        counts[m] = counts.get(m, 0) + 1
    return max(counts, key=lambda m: (counts[m], -models.index(m)))


@dataclass(frozen=True, slots=True)
class Farmed:
    """What farming gave the admission desk: accepted replays (`tasks`), or a verdict
    the requester reached on its own model after a disagreement (`local`), or neither
    (`reason` and `message` say why: the candidate is refused)."""

    tasks: tuple[ScecReplay, ...] = ()
    local: Verdict | None = None
    reason: str = ""  # when refused: "no_replayers", "unverified"
    message: str = ""
    by: tuple[str, ...] = ()  # the peers whose replays were accepted
    asked: tuple[str, ...] = ()  # every peer a job was sent to
    offenders: tuple[str, ...] = ()
