"""The admission desk: candidates wait here for the replay that decides them.

A candidate (a text with its domain and kind, written here or fetched from a peer) is
first put through the controller's precheck (a near-duplicate or a full queue is
refused at once, with its reason), then queued. One worker judges the queue in order:
it picks the tasks to replay (the SCEC the candidate came from, then the SCECs nearest
its text in its domain), replays each without and with it (admission.judge) on this
peer's model, and admits it when the utility is a gain. Every candidate ends admitted
or refused with a reason, logged in the store's decision log (in the peer's log when the
store takes no writes) and published as an event; none is dropped silently. A store
that fails every write (a full disk) refuses each candidate (reason "error") and the
desk goes on. A peer's item is admitted only by this replay, never on the author's
word: its outcome goes back to the diffusion's record of its author.

One worker, so replays never compete with each other for the model; the model serves
other requests between them. With a farm (farm.py) the replays may run on other peers
instead: when this peer serves no model (`replay` "auto", the default) or always
(`replay` "farm"); their results are accepted only when reproduced (farming.py), and
the log names the peers that replayed.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd.config import MEMORY_REPLAYS
from peerd.inference.face import LanguageModel, ModelUnavailable, Refused, SwarmUnavailable
from peerd.memory.admission import BaselineCache, Utility, Verdict, Weights, judge
from peerd.memory.controller import (
    ControllerSettings,
    EarlierRefusal,
    admission_stats,
    precheck,
)
from peerd.memory.farming import job_model, verdict_of
from peerd.memory.item import MemoryItem, Record
from peerd.memory.scec import decode_scec
from protocols.errors import WireError
from protocols.memory import ScecMsg, SignedItem

if TYPE_CHECKING:
    from peerd.memory.farm import Farm, LocalJudge
    from peerd.memory.store import MemoryStore

log = logging.getLogger(__name__)

KEPT_CANDIDATES = 1_000  # decided candidates remembered for GET (the log keeps them all)
ADMISSION_TASKS = 4  # tasks a candidate is replayed on: the SCEC it came from + nearest
MIN_TASK_SIMILARITY = 0.3  # a task further from the candidate says nothing about it
# Kinds distilled from a run that hold its answer (distill.py): never judged on that run.
# A worked example's run passed, but a replay without notes need not (the notes it had
# then are not those recalled now): its gain there would be the copied answer.
HOLDS_ORIGIN_ANSWER = frozenset({"example", "correction"})
# Runs fetched beyond the tasks wanted, so that skipping the runs a candidate quotes (a
# question asked many times) still leaves enough to judge it on.
TASK_SLACK = 16
QUOTED_MIN_CHARS = 8  # a shorter prompt ("Hi") inside a note is no sign of its answer


def quotes(text: str, prompt: str) -> bool:
    """Whether `text` quotes the question `prompt` (whitespace aside): a note that holds
    a question may hold its answer too, so it is not judged on that question's runs."""
    question = " ".join(prompt.split())
    return len(question) >= QUOTED_MIN_CHARS and question in " ".join(text.split())

Sign = Callable[[str, str, str, str, str], tuple[MemoryItem, SignedItem]]  # text, domain,
# kind, origin, parent -> a new item of ours
MemoryFor = Callable[[ScecMsg], Awaitable[Sequence[str]]]


@dataclass
class Candidate:
    id: str
    text: str
    domain: str
    kind: str
    origin: str  # SCEC hash or ""
    source: str  # "local" or the peer it came from
    parent: str = ""  # the item an insight was abstracted from
    item: MemoryItem | None = None  # a peer's signed item; ours is signed on admission
    signed: SignedItem | None = None
    state: str = "queued"  # queued, judging, admitted, refused
    reason: str = ""  # why it is where it is
    utility: Utility | None = None
    tasks: int = 0
    item_id: str = ""  # once admitted (a peer's: from the start)
    created: float = field(default_factory=time.time)
    decided: float = 0.0
    replayed_by: tuple[str, ...] = ()  # farmed: the peers whose replays were accepted
    farmed_to: tuple[str, ...] = ()  # farmed: every peer asked
    done: trio.Event = field(default_factory=trio.Event)

    def to_json(self) -> dict[str, Any]:
        u = self.utility
        return {"id": self.id, "state": self.state, "reason": self.reason,
                "domain": self.domain, "kind": self.kind, "source": self.source,
                "item_id": self.item_id or None, "origin": self.origin or None,
                "parent": self.parent or None,
                "utility": None if u is None else {
                    "total": u.total, "score": u.d_score, "latency_s": u.d_latency,
                    "prompt_tokens": u.d_tokens},
                "tasks": self.tasks, "created": self.created,
                "replayed_by": list(self.replayed_by) or None,
                "decided": self.decided or None, "text": self.text}


def refusal_key(domain: str, text: str, model: str) -> str:
    """What names a candidate for the refusal memory: its exact text in its domain, as
    judged by `model` (the model replayed here; "" where none is and replays are
    farmed). A refusal measures one model: another would answer otherwise, so its
    earlier refusal does not stand for it."""
    return hashlib.sha256(f"{domain}\0{model}\0{text}".encode()).hexdigest()


class Admissions:
    def __init__(self, store: MemoryStore, model: Callable[[], LanguageModel],
                 sign: Sign, memory_for: MemoryFor, *,
                 settings: ControllerSettings, weights: Weights, min_gain: float,
                 on_decided: Callable[[Candidate], Awaitable[None]],
                 tasks: int = ADMISSION_TASKS,
                 task_similarity: float = MIN_TASK_SIMILARITY,
                 farm: Farm | None = None, replay: str = "auto") -> None:
        if replay not in MEMORY_REPLAYS:  # auto: local with a model here, else farmed
            raise ValueError(f"replay {replay!r}: one of {', '.join(MEMORY_REPLAYS)}")
        self.store = store
        self.model = model  # the face of this peer's model; ModelUnavailable when none
        self.sign = sign
        self.memory_for = memory_for
        self.settings = settings
        self.weights = weights
        self.min_gain = min_gain
        self.tasks = tasks  # replayed per candidate
        self.baselines = BaselineCache()  # A arms already replayed
        self.task_similarity = task_similarity
        self.farm = farm  # other peers' replays, accepted when reproduced (farm.py)
        self.replay = replay
        self.on_decided = on_decided  # events, metrics, diffusion (announce, author record)
        self.candidates: OrderedDict[str, Candidate] = OrderedDict()
        self._send, self._queue = trio.open_memory_channel[Candidate](settings.queue_cap)
        self.waiting = 0

    def get(self, candidate_id: str) -> Candidate | None:
        return self.candidates.get(candidate_id)

    async def submit(self, text: str, domain: str, kind: str, *, origin: str = "",
                     parent: str = "", source: str = "local", item: MemoryItem | None = None,
                     signed: SignedItem | None = None) -> Candidate:
        """Queue a candidate, or refuse it at once (near-duplicate, full queue). A peer's
        item comes with `item` and `signed`, already verified."""
        c = Candidate(id="cand-" + secrets.token_hex(8), text=text, domain=domain, kind=kind,
                      origin=origin, parent=parent, source=source, item=item,
                      signed=signed,
                      item_id=item.id if item is not None else "")
        self.candidates[c.id] = c
        while len(self.candidates) > KEPT_CANDIDATES:
            oldest = next(iter(self.candidates.values()))
            if oldest.state in ("queued", "judging"):
                break
            self.candidates.popitem(last=False)
        if item is not None and await self.store.get(item.id) is not None:
            await self._refuse(c, "known", "this item is already in the memory")
            return c
        vector = (await self.store.embed([text]))[0]
        near = await self.store.search(vector, 1, domain)
        refused = await self.store.refusal(refusal_key(domain, text, self._judge()))
        earlier = (None if refused is None else
                   EarlierRefusal(time.time() - refused[0], refused[1], refused[2]))
        check = precheck([(r.item.id, s) for r, s in near], self.waiting, self.settings,
                         earlier)
        if not check.replay:
            await self._refuse(c, check.reason, check.message)
            return c
        self.waiting += 1
        self._send.send_nowait(c)  # the precheck kept the queue under its cap
        return c

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        async for c in self._queue:
            self.waiting -= 1
            c.state = "judging"
            try:
                await self._decide(c)
            except Exception as exc:  # our bug, or the store: this one fails, the desk goes on
                log.exception("memory: judging candidate %s failed", c.id)
                if c.state == "judging":
                    try:  # the store that failed may fail again (on_decided reads it)
                        await self._refuse(c, "error", f"{type(exc).__name__}: {exc}")
                    except Exception:
                        log.exception("memory: refusing candidate %s failed", c.id)

    async def _decide(self, c: Candidate) -> None:
        tasks, unsuitable = await self._tasks(c)
        c.tasks = len(tasks)
        if not tasks:
            await self._refuse(c, "no_tasks", unsuitable)
            return
        face: LanguageModel | None = None
        unavailable: ModelUnavailable | None = None
        try:
            face = self.model()
        except ModelUnavailable as exc:
            unavailable = exc
        try:
            if self.farm is not None and (self.replay == "farm" or (
                    self.replay == "auto" and face is None)):
                got = await self._farmed(c, tasks, face)
                if got is None:
                    return
                verdict = got
            elif face is None:
                await self._refuse(c, "no_model", f"no model here to replay with: "
                                   f"{unavailable}")
                return
            else:
                verdict = await judge(face, c.text, tasks, self.memory_for, self.weights,
                                      self.min_gain, self.baselines)
        except (Refused, SwarmUnavailable, ValueError) as exc:
            await self._refuse(c, "replay_failed", str(exc))
            return
        c.utility = verdict.utility
        if not verdict.admitted:
            judged_by = "" if face is None else face.model_id
            await self.store.remember_refusal(refusal_key(c.domain, c.text, judged_by),
                                              verdict.utility.total, len(tasks))
            await self._refuse(c, "no_gain", f"utility {verdict.utility.total:.3g} <= "
                               f"{self.min_gain:g} over {len(tasks)} tasks")
            return
        if c.item is None or c.signed is None:
            try:
                c.item, c.signed = self.sign(c.text, c.domain, c.kind, c.origin,
                                             c.parent)
            except WireError as exc:
                await self._refuse(c, "invalid", str(exc))
                return
        now = time.time()
        record = Record(c.item, c.signed, admission_stats(verdict.utility.total, now,
                                                          self.settings, source=c.source))
        await self.store.put(record, (await self.store.embed([c.text]))[0])
        c.item_id = c.item.id
        await self._decided(c, "admitted", f"utility {verdict.utility.total:.3g} over "
                            f"{len(tasks)} tasks")

    async def _farmed(self, c: Candidate, tasks: Sequence[ScecMsg],
                      face: LanguageModel | None) -> Verdict | None:
        """The verdict of farmed replays (or of our own model, where farming settled
        nothing and we have one); None when c was refused."""
        assert self.farm is not None
        local: LocalJudge | None = None
        if face is not None:
            here = face

            async def judge_here(ts: Sequence[ScecMsg]) -> Verdict:
                return await judge(here, c.text, ts, self.memory_for, self.weights,
                                   self.min_gain, self.baselines)

            local = judge_here
        model = face.model_id if face is not None else job_model([t.model for t in tasks])
        try:
            farmed = await self.farm.replay(c.text, tasks, self.memory_for, model, local)
        except WireError as exc:  # a job we could not send (a field out of bounds)
            await self._refuse(c, "invalid", f"cannot farm the replay: {exc}")
            return None
        c.replayed_by, c.farmed_to = farmed.by, farmed.asked
        if farmed.local is not None:
            return farmed.local
        if not farmed.tasks:
            await self._refuse(c, farmed.reason, farmed.message)
            return None
        return verdict_of(farmed.tasks, self.weights, self.min_gain)

    def _judge(self) -> str:
        """The id of the model that would replay a candidate here; "" when none does."""
        try:
            return self.model().model_id
        except ModelUnavailable:
            return ""

    async def _tasks(self, c: Candidate) -> tuple[list[ScecMsg], str]:
        """The SCECs to replay c on: the run it came from first, then the runs nearest
        that run's prompt (nearest its own text when it came from none we hold) in its
        domain, each at least `task_similarity` close. Never a run whose answer c may
        hold, where a model that copies it "gains" by the leak, not by what the note
        teaches: the run a worked example or a correction was distilled from, and any
        run whose question c quotes (another run of the same question, the origin of an
        item fetched from a peer). With none, what the user should know: why not."""
        out: dict[str, ScecMsg] = {}
        anchor = c.text
        skip = ""
        if c.origin:
            stored = await self.store.get_scec(c.origin)
            if stored is not None:
                anchor = stored.prompt
                if c.kind in HOLDS_ORIGIN_ANSWER or quotes(c.text, stored.prompt):
                    skip = stored.hash
                else:
                    out[stored.hash] = decode_scec(stored.body)
        vector = (await self.store.embed([anchor]))[0]
        near = await self.store.similar_scecs(vector, self.tasks + TASK_SLACK, c.domain)
        undecodable = 0
        for stored, sim in near:
            if len(out) >= self.tasks:
                break
            if sim >= self.task_similarity and stored.hash not in out \
                    and stored.hash != skip and not quotes(c.text, stored.prompt):
                try:
                    out[stored.hash] = decode_scec(stored.body)
                except WireError:
                    undecodable += 1
                    log.warning("memory: SCEC %s in the store does not decode", stored.hash)
        if out:
            return list(out.values()), ""
        if not near:
            return [], (f"no scored run in domain {c.domain!r} to replay it on: run tasks "
                        "there first (peerd memory learn)")
        if undecodable:
            return [], (f"the {undecodable} scored run(s) in domain {c.domain!r} similar "
                        "enough to judge it on do not decode (a damaged store: see the "
                        "peer's log); run similar tasks there again")
        unlike = [sim for stored, sim in near if stored.hash != skip
                  and not quotes(c.text, stored.prompt)]
        if not unlike:
            return [], (f"every scored run in domain {c.domain!r} near it holds the answer "
                        "it states, so a replay would measure the leak: run other tasks "
                        "like it there first")
        return [], (f"no scored run in domain {c.domain!r} is at least "
                    f"{self.task_similarity:.2f} similar to it (the nearest: "
                    f"{max(unlike):.2f}), and it would be judged on tasks unlike its own: "
                    "run similar tasks there first")

    async def _refuse(self, c: Candidate, reason: str, message: str) -> None:
        await self._decided(c, "refused", message, reason=reason)

    async def _decided(self, c: Candidate, state: str, message: str, *,
                       reason: str = "") -> None:
        c.state, c.reason, c.decided = state, reason or state, time.time()
        u = c.utility
        try:  # done: the decision and all that follows from it (eviction, announcing)
            try:
                await self.store.log(state, c.item_id or c.id, None if u is None else u.total,
                                     {"reason": c.reason, "message": message,
                                      "domain": c.domain, "kind": c.kind, "source": c.source,
                                      "tasks": c.tasks, "text": c.text[:200],
                                      **({"replayed_by": list(c.replayed_by),
                                          "farmed_to": list(c.farmed_to)}
                                         if c.farmed_to else {})})
            except Exception:  # a store that takes no writes (disk full, read-only): the
                # decision stands and is published; only its line in the store is lost
                log.exception("memory: the decision on %s (%s, %s) is not in the store's "
                              "log", c.id, state, c.reason)
            await self.on_decided(c)
        finally:
            c.done.set()
