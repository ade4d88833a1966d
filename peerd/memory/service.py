"""`Memory`: SEDM as a service of the peer (docs/sedm.md).

It owns the store (SQLite + the hnswlib index in `<data dir>/memory/`), the admission
desk (admissions.py: every candidate, ours or a peer's, is judged by a replay on this
peer's model, or on other peers' when farmed: farm.py), consolidation (controller.py's
plan, applied on a period and on demand), and diffusion (diffusion.py: admitted items
announced on gossip, fetched by others, who judge them by their own replay).

What the rest of the peer calls:
- `recall(text, k, domain)`: the items to give a task, best first (similarity x weight);
  the OpenAI API's `memory` option and the learner use it;
- `solve(task)` / `observe(...)`: a scored run recorded as an SCEC; its items' weights move
  by its score against the domain's no-memory baseline (a run without memory moves the
  baseline); Symphony's scored tasks and RL runs hand theirs to `observe` (api/recall.py's
  `ScoredRuns`), an RL rollout without moving anything;
- `propose(text, domain, kind)`: a candidate for admission;
- `consolidate()`: merge, prune and evict now;
- `abstract(item, domain)` / `abstract_due()`: an item rewritten as a general insight,
  on request or by the service's own round (abstraction.py's rule).
Every decision is a line in the store's log, an event (`memory.*`) and a counter.

One module, past the usual size: it is the wiring of the parts above to one store, one
desk, one model and one nursery, and each rule it applies lives in a pure module of its
own (controller.py, abstraction.py, admission.py, learning.py). The next piece to move
out, if it grows, is the learning job's and the abstraction round's scheduling.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import Counter, Gauge
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd.api.recall import Note
from peerd.durable import replace_text
from peerd.embedding import Embedder, make_embedder
from peerd.inference.face import LanguageModel, ModelUnavailable
from peerd.inference.options import SamplingParams
from peerd.ledger.gossip import LedgerGossip
from peerd.memory import abstraction, consolidation
from peerd.memory.abstraction import AbstractionRules
from peerd.memory.admission import Weights
from peerd.memory.admissions import (
    ADMISSION_TASKS,
    MIN_TASK_SIMILARITY,
    Admissions,
    Candidate,
)
from peerd.memory.controller import (
    Baseline,
    ControllerSettings,
    Ranked,
    after_uses,
    effective_weight,
    rank,
)
from peerd.memory.diffusion import Diffusion
from peerd.memory.distill import abstraction_prompt, parse_insight
from peerd.memory.farm import REPLAY_REPUTATION_FILE, Farm
from peerd.memory.item import MemoryItem, Record, sign_item
from peerd.memory.learning import LearnJob, LearnSpec, SpecError, domain_of, learn
from peerd.memory.replay import GREEDY, Outcome, record
from peerd.memory.scec import Task, encode_scec, scec_hash
from peerd.memory.store import MemoryStore
from peerd.service import EntryFields, Service
from protocols.ledger import LedgerEntry
from protocols.memory import ScecMsg, SignedItem
from protocols.memory_replay import FEATURE_REPLAY

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from peerd.inference.slot import ModelSlot
    from peerd.node import Node

log = logging.getLogger(__name__)

FEATURE_MEMORY = "memory"
CONSOLIDATE_EVERY_S = 600.0
BASELINE_FILE = "baseline.json"
ABSTRACT_TOKENS = 64  # an insight is one short line
ABSTRACT_EVERY_S = 1800.0  # a round of the memory's own abstraction (abstraction.py)
SEARCH_WIDTH = 4  # index hits fetched per item retrieved: ranking reorders by weight


class Memory(Service):
    name = "memory"

    def __init__(self, node: Node, model: ModelSlot | None, data_dir: Path, *,
                 embedder: str = "auto", settings: ControllerSettings | None = None,
                 weights: Weights | None = None, min_gain: float = 0.0,
                 admission_tasks: int = ADMISSION_TASKS,
                 task_similarity: float = MIN_TASK_SIMILARITY, diffuse: bool = True,
                 replay: str = "auto", abstract_every_s: float = ABSTRACT_EVERY_S,
                 abstraction_rules: AbstractionRules | None = None) -> None:
        if not 0 <= abstract_every_s < math.inf:
            raise ValueError(f"abstract_every_s {abstract_every_s}: at least 0 (0: off)")
        self.node = node
        self.model = model
        self.data_dir = data_dir
        self.dir = data_dir / "memory"  # the store's (store.py) and the baselines
        self.embedder_mode = embedder
        self.settings = settings or ControllerSettings()
        self.weights = weights or Weights()
        self.min_gain = min_gain
        self.admission_tasks = admission_tasks
        self.task_similarity = task_similarity
        self.diffuse = diffuse
        self.replay = replay  # admissions.REPLAY_MODES: where candidates are replayed
        self.abstract_every_s = abstract_every_s  # rounds of abstraction.due; 0: none
        self.abstraction_rules = abstraction_rules or AbstractionRules()
        self.farm = Farm(node, self._face, self._ledger_entries,
                         book_path=self.dir / REPLAY_REPUTATION_FILE)
        self.store: MemoryStore | None = None
        self.baseline = Baseline()
        self.admissions: Admissions | None = None
        self.diffusion: Diffusion | None = None
        self.ready = trio.Event()
        self.learning: LearnJob | None = None
        self._learn_starting = False  # a learn() between its check and its job
        self._nursery: trio.Nursery | None = None
        r = node.metrics.registry
        self.decisions = Counter("peerd_memory_decisions", "Memory decisions by action and "
                                 "reason", ["action", "reason"], registry=r)
        self.items = Gauge("peerd_memory_items", "Items in the memory", registry=r)
        self.uses = Counter("peerd_memory_uses", "Items given to runs", registry=r)

    # ---- the service ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        embedder: Embedder = make_embedder(self.embedder_mode)
        self.store = await MemoryStore.open(self.data_dir, embedder)
        self.baseline = await trio.to_thread.run_sync(self._load_baseline)
        self.admissions = Admissions(self.store, self._face, self._sign, self._memory_for,
                                     settings=self.settings, weights=self.weights,
                                     min_gain=self.min_gain, on_decided=self._decided,
                                     tasks=self.admission_tasks,
                                     task_similarity=self.task_similarity,
                                     farm=self.farm, replay=self.replay)
        if self.model is not None:
            self.farm.register()  # we replay for others
        try:
            async with trio.open_nursery() as nursery:
                if self.diffuse:
                    self.diffusion = Diffusion(self.node, _Local(self), self._heard)
                    await self.diffusion.start(nursery)
                await nursery.start(self.admissions.run)
                self.items.set(await self.store.count())
                self._nursery = nursery
                self.ready.set()
                task_status.started()
                nursery.start_soon(self._consolidate_periodically)
                if self.abstract_every_s > 0:
                    nursery.start_soon(self._abstract_periodically)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._save_baseline)
                await self.store.aclose()

    def entry_fields(self) -> EntryFields:
        return {"features": (FEATURE_MEMORY,) + ((FEATURE_REPLAY,) if self.model else ())}

    def routes(self) -> Sequence[BaseRoute]:
        from peerd.api.memory import routes

        return routes(self)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ready": self.ready.is_set()}
        if self.admissions is not None:
            out["waiting"] = self.admissions.waiting
        if self.diffusion is not None:
            out["diffusion"] = self.diffusion.status()
        out["replays"] = {"mode": self.replay, **self.farm.status()}
        return {"memory": out}

    # ---- what the peer calls -------------------------------------------------------------

    def live_store(self) -> MemoryStore:
        if self.store is None:
            raise ModelUnavailable("starting", "the memory is still opening")
        return self.store

    async def recall(self, text: str, k: int | None = None, domain: str | None = None
                     ) -> list[Ranked]:
        """The items to give a task on `text`, best first (at most k)."""
        store = self.live_store()
        k = self.settings.top_k if k is None else k
        if k <= 0:
            return []
        vector = (await store.embed([text]))[0]
        hits = await store.search(vector, k * SEARCH_WIDTH, domain)
        return rank(hits, time.time(), self.settings, k)

    async def notes(self, text: str, k: int | None, domain: str | None) -> list[Note]:
        """recall, as the OpenAI API's `memory` option takes it (api/recall.py)."""
        return [Note(r.record.item.id, r.record.item.text, r.record.item.domain,
                     r.similarity, r.weight, r.score) for r in await self.recall(text, k, domain)]

    async def solve(self, task: Task, *, k: int | None = None, memory: bool = True,
                    params: SamplingParams = GREEDY) -> tuple[Outcome, ScecMsg, list[Ranked]]:
        """Run a scored task on this peer's model with what the memory gives it (none when
        `memory` is False), and record it (observe)."""
        given = await self.recall(task.prompt, k, task.domain) if memory else []
        outcome, scec = await record(self._face(), task, [r.record.item.text for r in given],
                                     params, memory_ids=[r.record.item.id for r in given])
        await self.observe(scec, [r.record.item.id for r in given])
        return outcome, scec, given

    async def observe(self, scec: ScecMsg, used: Sequence[str], *, served: bool = True
                      ) -> str:
        """Keep a scored run's SCEC; move its items' weights (or, with none, the
        baseline). Its hash. `served` False: a run that is not the served model's own (an
        RL policy sampling at temperature 1 as it trains): its score says nothing of this
        model's greedy baseline nor of its items, so it is kept as an admission task and
        nothing moves. WireError for an SCEC out of bounds (a peer's, a service's)."""
        scec.check()
        store = self.live_store()
        digest = scec_hash(scec)
        vector = (await store.embed([scec.prompt]))[0]
        await store.put_scec(digest, scec.domain, encode_scec(scec), scec.prompt, vector)
        if not served:
            return digest
        if not used:
            self.baseline.observe(scec.domain, scec.score)
            return digest
        records = [r for r in [await store.get(i) for i in used] if r is not None]
        now = time.time()
        base = self.baseline.mean(scec.domain)
        updated = after_uses([r.stats for r in records], scec.score, base, now, self.settings)
        await store.update_stats_many({r.item.id: s for r, s in
                                       zip(records, updated, strict=True)})
        self.uses.inc(len(records))
        return digest

    async def propose(self, text: str, domain: str, kind: str, *, origin: str = ""
                      ) -> Candidate:
        """A candidate of ours, for admission. WireError for a field out of bounds."""
        sign_item(self.node.key_pair.private_key, self.node.peer_id, text, domain, kind,
                  origin=origin)  # checks every field now, before it waits in the queue
        return await self.desk().submit(text, domain, kind, origin=origin)

    async def abstract(self, item_id: str, domain: str) -> Candidate:
        """Ask this peer's model to rewrite a proven item as a general insight, and offer
        the insight to `domain` (another, or its own), where it is admitted only by its
        own replay on that domain's runs. KeyError for an unknown item, ValueError when
        the model writes nothing usable, ModelUnavailable without a model."""
        record = await self.live_store().get(item_id)
        if record is None:
            raise KeyError(item_id)
        return await self.desk().submit(await self._insight(record), domain, "insight",
                                        parent=item_id)

    async def abstract_due(self) -> list[Candidate]:
        """One round of the memory's own abstraction (abstraction.py): each proven item
        due is rewritten once and its insight offered to every domain due for it; the
        insights offered (their verdicts follow). ModelUnavailable without a model."""
        store = self.live_store()
        self._face()
        due = abstraction.due(await store.records(), await store.runs_by_domain(),
                              await store.abstracted(), time.time(), self.settings,
                              self.abstraction_rules)
        offered: list[Candidate] = []
        for a in due:
            record = await store.get(a.item_id)
            if record is None:  # pruned since
                continue
            try:
                insight: str | None = await self._insight(record)
            except ValueError as exc:
                insight, why = None, str(exc)
            await store.mark_abstracted(a.item_id, a.domains)  # tried, whatever the verdict
            if insight is None:
                self.node.events.publish("memory.abstraction", item_id=a.item_id,
                                         domains=list(a.domains), insight=None, error=why)
                continue
            self.node.events.publish("memory.abstraction", item_id=a.item_id,
                                     domains=list(a.domains), insight=insight)
            for domain in a.domains:
                offered.append(await self.desk().submit(insight, domain, "insight",
                                                        parent=a.item_id))
        return offered

    async def learn(self, spec: LearnSpec) -> LearnJob:
        """Start a learning job (learning.py) in the background; RuntimeError while one
        runs, ModelUnavailable without a model, ValueError for a task that does not
        load."""
        from peerd.rl.tasks import load_task

        if self._learn_starting or (self.learning is not None
                                    and self.learning.state == "running"):
            raise RuntimeError("a learning job is running here; wait for it "
                               "(GET /v1/memory/learn)")
        self._face()
        # taken before the first await: a second request arriving while this one loads
        # its task is refused, and the job stop_learning sees is the one that runs
        self._learn_starting = True
        try:
            try:
                task = await trio.to_thread.run_sync(
                    lambda: load_task(spec.task, seed=spec.seed))
            except (ValueError, OSError) as exc:  # OSError: e.g. a file name too long
                raise SpecError("task", str(exc)) from None
            job = LearnJob(spec, spec.domain or domain_of(task.name))
            self.learning = job
            assert self._nursery is not None
            self._nursery.start_soon(self._learn, job)
        finally:
            self._learn_starting = False
        return job

    async def _learn(self, job: LearnJob) -> None:
        try:
            await learn(self, job)
            job.state = "stopped" if job.stopping and job.runs < job.spec.n else "done"
        except Exception as exc:  # a model that went away, our bug: the job fails, we serve
            log.exception("memory: learning failed")
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.ended = time.time()
            self.node.events.publish("memory.learn", **job.to_json())

    async def stats(self) -> dict[str, Any]:
        store = self.live_store()
        by_domain: dict[str, dict[str, Any]] = {}
        now = time.time()
        for rec in await store.records():
            d = by_domain.setdefault(rec.item.domain, {"items": 0, "uses": 0, "weight": 0.0})
            d["items"] += 1
            d["uses"] += rec.stats.uses
            d["weight"] += effective_weight(rec.stats, now, self.settings)
        for d in by_domain.values():
            d["mean_weight"] = d.pop("weight") / d["items"]
        decisions: dict[str, int] = {}
        for row in await store.decisions(100_000):
            key = row.action if row.action != "refused" else \
                f"refused:{row.detail.get('reason', '?')}"
            decisions[key] = decisions.get(key, 0) + 1
        return {"items": sum(d["items"] for d in by_domain.values()), "domains": by_domain,
                "waiting": self.desk().waiting, "decisions": decisions,
                "baseline": {dom: {"mean": m, "runs": n}
                             for dom, (m, n) in self.baseline.snapshot().items()},
                "settings": asdict(self.settings)}

    async def consolidate(self, *, merges: bool = True) -> list[consolidation.Applied]:
        """Merge near-duplicates, prune what faded, evict over the cap; without `merges`,
        only the last two."""
        applied = await consolidation.run(self.live_store(), time.time(), self.settings,
                                          merges=merges)
        for done in applied:
            self.decisions.labels(done.action, done.action).inc()
            self.node.events.publish(f"memory.{done.action}", **done.to_json())
        self.items.set(await self.live_store().count())
        return applied

    # ---- inside -------------------------------------------------------------------------

    async def _insight(self, record: Record) -> str:
        prompt = abstraction_prompt(record.item.text, record.item.domain)
        completion = await self._face().chat([{"role": "user", "content": prompt}],
                                             SamplingParams(max_tokens=ABSTRACT_TOKENS))
        insight = parse_insight(completion.text)
        if insight is None:
            raise ValueError(f"the model wrote no usable insight ({completion.text[:80]!r})")
        return insight

    def desk(self) -> Admissions:
        if self.admissions is None:
            raise ModelUnavailable("starting", "the memory is still opening")
        return self.admissions

    def _face(self) -> LanguageModel:
        if self.model is None:
            raise ModelUnavailable("none", "this peer serves no model (peerd start --model)")
        return self.model.face()

    def _sign(self, text: str, domain: str, kind: str, origin: str, parent: str
              ) -> tuple[MemoryItem, SignedItem]:
        return sign_item(self.node.key_pair.private_key, self.node.peer_id, text, domain,
                         kind, origin=origin, parent=parent)

    def _ledger_entries(self) -> list[LedgerEntry]:
        try:
            return self.node.service(LedgerGossip).book.entries()
        except LookupError:  # a node without the ledger: nobody to farm to
            return []

    async def _memory_for(self, scec: ScecMsg) -> list[str]:
        return [r.record.item.text for r in await self.recall(scec.prompt, None, scec.domain)]

    async def _heard(self, item: MemoryItem, signed: SignedItem, source: str) -> None:
        await self.desk().submit(item.text, item.domain, item.kind, origin=item.origin,
                                 parent=item.parent, source=source, item=item,
                                 signed=signed)

    async def _decided(self, c: Candidate) -> None:
        self.decisions.labels(c.state, c.reason).inc()
        self.node.events.publish(f"memory.{c.state}", **{
            k: v for k, v in c.to_json().items() if k != "text"})
        if c.source != "local" and c.item is not None and self.diffusion is not None \
                and c.reason not in ("known", "queue_full", "refused_before", "no_model",
                                     "no_tasks", "error", "no_replayers", "unverified",
                                     "invalid"):
            self.diffusion.report(c.item.author, c.state == "admitted")
        if c.state == "admitted":
            count = await self.live_store().count()
            self.items.set(count)
            if count > self.settings.size_cap:  # the cap holds after every admission
                await self.consolidate(merges=False)
            if self.diffusion is not None:
                stored = await self.live_store().get(c.item_id)
                if stored is not None:
                    self.diffusion.announce(stored)

    async def _consolidate_periodically(self) -> None:
        while True:
            await trio.sleep(CONSOLIDATE_EVERY_S)
            try:
                await self.consolidate()
            except Exception:  # our bug: log it, keep the memory serving
                log.exception("memory: consolidation failed")

    async def _abstract_periodically(self) -> None:
        """A round every abstract_every_s, when the desk is idle: users' candidates
        first, and no round while a learning job drives the model."""
        while True:
            await trio.sleep(self.abstract_every_s)
            learning = self.learning is not None and self.learning.state == "running"
            if self.model is None or learning or self.desk().waiting > 0:
                continue
            try:
                await self.abstract_due()
            except ModelUnavailable:  # the model is loading or went away: next round
                pass
            except Exception:  # our bug: log it, keep the memory serving
                log.exception("memory: abstraction failed")

    def _load_baseline(self) -> Baseline:
        try:
            raw = json.loads((self.dir / BASELINE_FILE).read_text())
            kept = {d: (float(m), int(n)) for d, (m, n) in raw.items()}
            if not all(math.isfinite(m) and n >= 0 for m, n in kept.values()):
                raise ValueError("a mean that is not a number, or a negative count")
            return Baseline.restore(kept)
        except FileNotFoundError:
            return Baseline()
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            log.warning("memory: %s unreadable (%s); the no-memory baseline starts afresh",
                        BASELINE_FILE, exc)
            return Baseline()

    def _save_baseline(self) -> None:
        try:
            replace_text(self.dir / BASELINE_FILE, json.dumps(self.baseline.snapshot()))
        except OSError as exc:
            log.error("memory: could not save the no-memory baseline: %s", exc)


class _Local:
    """This peer's memory as diffusion sees it."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory

    async def signed(self, ids: Sequence[str]) -> list[SignedItem]:
        store = self.memory.live_store()
        return [r.signed for r in [await store.get(i) for i in ids] if r is not None]

    async def search(self, query: str, k: int, domain: str | None
                     ) -> list[tuple[SignedItem, float]]:
        store = self.memory.live_store()
        vector = (await store.embed([query]))[0]
        return [(r.signed, s) for r, s in await store.search(vector, k, domain)]

    async def has(self, item_id: str) -> bool:
        return await self.memory.live_store().get(item_id) is not None

