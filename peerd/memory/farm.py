"""Farmed replays: both sides on the network (docs/sedm.md, "Farmed replays").

Replaying (every peer that serves a model with the memory, listing FEATURE_REPLAY in
its ledger entry): a `ReplayJob` on `/peerd/memory/replay/1.0.0` is checked, its SCECs
decoded, and if the model asked is ours both arms of each task run greedily through
admission.judge, exactly as the local judge runs them; the result is signed and
returned. A job for another model, or one we cannot run now, is refused in words and
counted against nobody; malformed input is the sender's offence. At most
REPLAY.max_concurrent jobs run at once (the excess is refused "busy"), and each gives
up REPLAY_MARGIN_S before the exchange's deadline, so a slow model never looks like
the requester's fault.

Requesting (the admission desk of a peer that farms): the peers that may replay are
read from the ledger (farming.replayers) and ranked by Symphony's election rule
(election.py: match, load, latency, reputation), not through a bid round: a bid
round answers a free-text requirement with skill matches and task seats, while a
replay needs one fact every entry states (it serves the model). The two best are
seated with `fill_seats` (a peer that fails or misses its deadline is replaced by the
next, within FILL_ROUNDS deadlines in all; one that took the job and never answered
ranks last for a while, as a no-show does in Symphony's requester). Their verified
results are settled by farming.settle; what happens when they do not agree is in
`Farm.replay`. A peer caught with a false result is an offence
(`false_replay`), scores 0 in this peer's replay reputation, and ranks last for a
while. The reputation book and who was caught lately (wall-clock times) are kept in the
memory's directory, so a restart forgives neither.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from peerd.agents.election import Candidate, Election, WorkFailed, fill_seats
from peerd.agents.reputation import NoShows, ReputationBook, view
from peerd.agents.sealing import seal, unseal
from peerd.datadir import keep_json, read_json
from peerd.inference.face import LanguageModel, ModelUnavailable, Refused, SwarmUnavailable
from peerd.memory.admission import MemoryFor, Verdict, judge
from peerd.memory.farming import Farmed, check_result, replay_of, replayers, settle
from peerd.memory.scec import decode_scec, encode_scec, scec_hash
from peerd.node import Node
from peerd.rpc import Busy, call, stream_handler
from protocols.errors import PeerError, RemoteError
from protocols.ledger import LedgerEntry
from protocols.memory import ScecMsg
from protocols.memory_replay import (
    REPLAY,
    REPLAY_MARGIN_S,
    ReplayJob,
    ReplayResult,
    SignedReplayResult,
)

REPLAYERS = 2  # results that must agree
REPLAY_REPUTATION_FILE = "replay_reputation.json"  # in the memory's directory
CAUGHT_FILE = "replay_caught.json"  # beside it: peer -> when it was last caught (wall clock)
DEADLINE_S = REPLAY.timeout_s - REPLAY_MARGIN_S  # one replaying peer's time for a job
NO_SHOWS = frozenset({"deadline", "unreachable"})  # as Symphony's requester counts them
# a job's seats are filled within this many replayer deadlines, replacements included
# (the tiebreaker, when one is asked, gets one more): replayers that take a job and
# never answer cannot hold the admission desk one deadline after another
FILL_ROUNDS = 2

LocalJudge = Callable[[Sequence[ScecMsg]], Awaitable[Verdict]]  # our model's judge


class ReplayUnavailable(Busy):
    """We cannot run this job (no model now, another model, our deadline, a run that
    failed): the requester is told why, nothing is counted against it."""

    reason = "unavailable"


class Farm:
    """One peer's side of farmed replays. `model`: this peer's model face
    (ModelUnavailable when none); `entries`: the ledger's live entries."""

    def __init__(self, node: Node, model: Callable[[], LanguageModel],
                 entries: Callable[[], list[LedgerEntry]], *, wanted: int = REPLAYERS,
                 deadline_s: float = DEADLINE_S, book_path: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.model = model
        self.entries = entries
        self.wanted = wanted
        self.deadline_s = deadline_s
        self.clock = clock
        self.book_path = book_path  # where the book outlives a restart (None: it does not)
        self.book = ReputationBook.from_json(  # what our jobs saw of each replayer
            node.peer_id, None if book_path is None else read_json(book_path))
        self.caught_path = None if book_path is None else book_path.with_name(CAUGHT_FILE)
        self.caught = NoShows.from_json(  # replayers caught with a false result: ranked last
            None if self.caught_path is None else read_json(self.caught_path), clock())
        self.no_shows = NoShows()  # replayers that left a job of ours unanswered: ranked last
        self.counts: Counter[str] = Counter()

    def register(self) -> None:
        """Serve replays (a peer serving a model)."""
        self.node.set_stream_handler(REPLAY.id, stream_handler(REPLAY, self._serve,
                                                               self.node.offence))

    def status(self) -> dict[str, Any]:
        return dict(self.counts)

    # ---- replaying for others ------------------------------------------------------------

    async def _serve(self, peer: str, job: ReplayJob) -> SignedReplayResult:
        job.check()
        try:
            face = self.model()
        except ModelUnavailable as exc:
            raise ReplayUnavailable(str(exc), reason="no_model") from None
        if face.model_id != job.model:
            raise ReplayUnavailable(f"this peer serves {face.model_id!r:.80}, not "
                                    f"{job.model!r:.80}", reason="unknown_model")
        scecs = [decode_scec(raw) for raw in job.scecs]  # WireError: the sender's offence
        given = {scec_hash(s): texts for s, texts in zip(scecs, job.given, strict=True)}

        async def memory_for(scec: ScecMsg) -> Sequence[str]:
            return given[scec_hash(scec)]

        self.counts["jobs_served"] += 1
        verdict: Verdict | None = None
        with trio.move_on_after(min(self.deadline_s, REPLAY.timeout_s - REPLAY_MARGIN_S)):
            try:
                verdict = await judge(face, job.candidate, scecs, memory_for)
            except (Refused, SwarmUnavailable, ValueError) as exc:
                raise ReplayUnavailable(f"the replay failed: {exc}",
                                        reason="replay_failed") from None
        if verdict is None:
            raise ReplayUnavailable("the replay did not finish in time", reason="deadline")
        result = ReplayResult(job_id=job.job_id, requester=peer, replayer=self.node.peer_id,
                              model=face.model_id, version="",  # served models are base
                              tasks=tuple(replay_of(t) for t in verdict.tasks))
        body, sig = seal(result, self.node.key_pair.private_key)
        return SignedReplayResult(body=body, sig=sig)

    # ---- asking others -----------------------------------------------------------------

    async def replay(self, candidate: str, tasks: Sequence[ScecMsg], memory_for: MemoryFor,
                     model: str, local: LocalJudge | None) -> Farmed:
        """Have other peers replay `tasks` without and with `candidate` on `model`, and
        settle their results. `local`: our own model's judge, when we have one.

        Two results that agree are accepted. With our model: a single result is
        accepted when our own run of the first task agrees with it; on any other
        outcome (no result, results that disagree, one our run contradicts) we judge
        on our model. Without: when two results disagree a third peer is asked, if
        there is one; with no agreement the candidate is unverified."""
        given = [tuple(await memory_for(s)) for s in tasks]
        job = ReplayJob(job_id="job-" + secrets.token_hex(8), model=model, candidate=candidate,
                        scecs=tuple(encode_scec(s) for s in tasks), given=tuple(given))
        job.check()  # ours: a WireError here is the desk's to report
        hashes = [scec_hash(s) for s in tasks]
        entries = self.entries()
        reports = {e.peer_id: e.reputation for e in entries}
        election = Election(job.job_id, self.node.peer_id, self.wanted, expected_bidders=0,
                            closes_at=-math.inf, deadline_s=self.deadline_s,
                            reputation=lambda p: view(p, self.node.peer_id, self.book.own(),
                                                      reports),
                            demoted=lambda p: (self.caught.recent(p, self.clock())
                                               or self.no_shows.recent(p, self.clock())))
        for c in replayers(entries, model, self.node.peer_id, self.node.rtt_ms):
            election.offer(c)
        results: dict[str, ReplayResult] = {}
        asked: list[str] = []

        async def work(seat: int, c: Candidate) -> ReplayResult:
            asked.append(c.peer_id)
            results[c.peer_id] = await self._ask(c.peer_id, job, hashes)
            self.no_shows.delivered(c.peer_id)
            return results[c.peer_id]

        def no_show(peer: str) -> None:  # silent or gone; a refusal in words costs nothing
            self.book.observe(peer, agreed=False, punctual=False, now=time.time())
            self.no_shows.missed(peer, self.clock())

        seats = election.elect()
        _, fallbacks = await fill_seats(election, seats, work, self.deadline_s,
                                        within_s=FILL_ROUNDS * self.deadline_s)
        for f in fallbacks:
            if f.reason in NO_SHOWS:
                no_show(f.peer_id)
        settled = settle(hashes, results)
        if not settled.accepted and local is None and len(results) >= 2:
            tiebreaker = election.replacement()
            if tiebreaker is not None:
                reason = "deadline"
                with trio.move_on_after(self.deadline_s):
                    try:
                        await work(0, tiebreaker)
                        reason = ""
                    except WorkFailed as exc:
                        reason = exc.reason
                if reason in NO_SHOWS:
                    no_show(tiebreaker.peer_id)
                settled = settle(hashes, results)
        verdict: Verdict | None = None
        if not settled.accepted and local is not None:
            if len(results) == 1:  # one result: our run of one task may confirm it
                first = await local(tasks[:1])
                settled = settle(hashes, results, {hashes[0]: replay_of(first.tasks[0])})
            if not settled.accepted:  # ours decides; every task of it checks the results
                verdict = await local(tasks)
                settled = settle(hashes, results, {t.task: replay_of(t)
                                                   for t in verdict.tasks})
        self._account(settled.by, settled.offenders, job.job_id)
        if self.book_path is not None:
            await trio.to_thread.run_sync(keep_json, self.book_path, self.book.to_json())
        if self.caught_path is not None and (settled.by or settled.offenders):
            await trio.to_thread.run_sync(keep_json, self.caught_path, self.caught.to_json())
        if verdict is not None:
            return Farmed(local=verdict, asked=tuple(asked), offenders=settled.offenders,
                          message=f"replayed here after {len(results)} farmed results "
                          "settled nothing")
        if settled.accepted:
            return Farmed(tasks=settled.tasks, by=settled.by, asked=tuple(asked),
                          offenders=settled.offenders)
        if not asked:
            return Farmed(reason="no_replayers", message=f"no model here, and no peer "
                          f"serving {model!r:.80} offers replays")
        return Farmed(reason="unverified", asked=tuple(asked), offenders=settled.offenders,
                      message=f"{len(results)} of {len(asked)} peers asked answered and "
                      f"no two agreed ({settled.reason})")

    async def _ask(self, peer: str, job: ReplayJob, hashes: Sequence[str]) -> ReplayResult:
        """`peer`'s verified result for `job`; WorkFailed (a PeerError is counted)."""
        self.counts["jobs_asked"] += 1
        try:
            signed: SignedReplayResult = await call(
                self.node.host, peer, REPLAY, job, timeout_s=self.deadline_s + 5.0,
                dial=self.node.new_stream)
            signed.check()
            result = unseal(signed.body, signed.sig, ReplayResult, lambda r: r.replayer)
            check_result(result, job_id=job.job_id, model=job.model, hashes=hashes,
                         replayer=peer, requester=self.node.peer_id)
            return result
        except PeerError as exc:
            self.node.offence(peer, exc.reason, f"memory replay: {exc}")
            raise WorkFailed(exc.reason, str(exc)) from None
        except RemoteError as exc:
            raise WorkFailed(exc.code, exc.message) from None
        except trio.TooSlowError:
            raise WorkFailed("deadline") from None
        except Exception as exc:  # the transport: a peer that went away, a closed stream
            raise WorkFailed("unreachable", f"{type(exc).__name__}: {exc}") from None

    def _account(self, agreed: Sequence[str], offenders: Sequence[str], job_id: str) -> None:
        now = time.time()
        for peer in agreed:
            self.book.observe(peer, agreed=True, punctual=True, now=now)
            self.caught.delivered(peer)
        for peer in offenders:
            self.counts["false_replay"] += 1
            self.book.observe(peer, agreed=False, punctual=True, now=now)
            self.caught.missed(peer, self.clock())
            self.node.offence(peer, "false_replay", f"memory replay job {job_id}: its "
                              "result was contradicted by a reproduction")
