"""scripts/bench_memory.py transfer: do items proven in one domain, abstracted by the model
into general insights and re-validated in another, help there (docs/sedm.md, issue 26)?

One peer in-process (bench_memory_peer.py): a node, a ModelSlot with SmolLM2-135M-Instruct
(float32, 2 torch threads) and the Memory service (MiniLM embeddings, the controller's
default settings; no diffusion: there is no other peer).

1. Source learning: the service's own learning loop (learning.learn, as the accuracy
   section runs it) over the --source task's first --n-train training questions; what
   the source domain holds at its end are the items its replays admitted and its uses
   kept (the controller prunes items whose uses measure them below the no-memory
   baseline).
2. Target runs: the --target task's first --n-target-train training questions answered
   without memory through Memory.solve(memory=False): each kept as an SCEC of the target
   domain (what an insight's admission replays there) and counted in the domain's
   no-memory baseline.
3. Abstraction: each item the source domain holds (or its top --abstract by effective
   weight), best first, goes through Memory.abstract: the model rewrites it as one
   general tip (distill.py's prompt, greedy), offered to the target domain, admitted
   only by its own A/B replay on the target's SCECs nearest its text. Each insight's
   text, verdict, reason and measured utility are kept; none is dropped.
4. Evaluation: the target's first --n-eval held-out questions (never in a training
   stream), greedy, through replay.run_task (nothing recorded, no weight moves), three
   ways on the same questions: no memory; the memory's recall in the target domain (the
   admitted insights, similarity x weight, the controller's rules); and a control, the
   source items that were abstracted, given raw: the k nearest the question by cosine
   similarity alone (no weight, no minimum similarity), so the control always has notes
   to give and says whether the source's items help as they are, unabstracted. An arm
   with nothing to give (no insight admitted; no source item held) gives every question
   nothing, so its prompts are the no-memory arm's and greedy decoding repeats its
   answers: it is not run again, and the table and JSON say so.

Defaults were chosen before any result was seen: the accuracy section's training and
held-out sizes and answer lengths for each task (bench_memory_accuracy.py N_TRAIN, N_EVAL;
bench_memory_peer.py MAX_TOKENS), N_TARGET_TRAIN target runs (enough for an insight's 4
replay tasks to be near it), every held source item abstracted, k = the controller's top_k.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from bench_memory_accuracy import N_EVAL, N_TRAIN
from bench_memory_peer import (
    MAX_TOKENS,
    Answered,
    Answers,
    accuracy_cell,
    answer,
    difference_cell,
    learn_reporting,
    load_model,
    open_peer,
    paired,
    progress,
)
from rich.console import Console
from rich.table import Table

from peerd.inference.options import SamplingParams
from peerd.memory.admissions import MIN_TASK_SIMILARITY, Candidate
from peerd.memory.controller import ControllerSettings, effective_weight
from peerd.memory.item import Record
from peerd.memory.learning import LearnSpec, domain_of
from peerd.memory.scec import Task
from peerd.memory.service import Memory
from peerd.rl.tasks import load_task

console = Console(width=160)
TASKS = ("add", "gsm8k")
N_TARGET_TRAIN = {"add": 100, "gsm8k": 40}
NONE, INSIGHTS, RAW = "none", "insights", "raw source items"
PHASES = "phases.json"  # under --keep: each finished phase's record


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options the phases depend on (a resume must match them)."""
    return {k: getattr(args, k) for k in (
        "source", "target", "n_train", "n_target_train", "abstract", "k",
        "source_max_tokens", "target_max_tokens", "control_every", "task_similarity",
        "seed")}


@dataclass
class Phases:
    """Under --keep: the record of each finished phase (the memory itself is the
    peer's, in the same directory), written atomically as each phase ends."""

    path: Path
    settings: dict[str, Any]
    done: dict[str, Any]

    @classmethod
    def open(cls, path: Path, settings: dict[str, Any]) -> Phases:
        """The record at `path` (empty when there is none); SystemExit when it was
        made with other options."""
        if not path.exists():
            return cls(path, settings, {})
        raw = json.loads(path.read_text())
        if raw["settings"] != settings:
            raise SystemExit(f"{path} was made with {raw['settings']}, not {settings}: use "
                             "another --keep directory")
        return cls(path, settings, raw["done"])

    def finish(self, phase: str, record: Any) -> None:
        self.done[phase] = record
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "done": self.done}))
        tmp.replace(self.path)


def add_transfer(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("transfer", help="items proven on one task, abstracted and "
                       "re-validated on another: the held-out gain there")
    p.add_argument("--source", choices=TASKS, default="add", help="where items are proven")
    p.add_argument("--target", choices=TASKS, default="gsm8k",
                   help="where their insights are judged and evaluated")
    p.add_argument("--n-train", type=int, help="source training questions learnt from "
                   "(default: " + ", ".join(f"{t} {n}" for t, n in N_TRAIN.items()) + ")")
    p.add_argument("--n-target-train", type=int, help="target training questions run "
                   "without memory, the insights' replay tasks (default: "
                   + ", ".join(f"{t} {n}" for t, n in N_TARGET_TRAIN.items()) + ")")
    p.add_argument("--n-eval", type=int, help="target held-out questions (default: "
                   + ", ".join(f"{t} {n}" for t, n in N_EVAL.items()) + ")")
    p.add_argument("--abstract", type=int, default=0,
                   help="abstract the top N source items by weight (0: all it holds)")
    p.add_argument("--k", type=int, default=ControllerSettings().top_k,
                   help="items a question is given (both memory arms)")
    p.add_argument("--source-max-tokens", type=int, help="new tokens a source answer gets "
                   "(default: " + ", ".join(f"{t} {n}" for t, n in MAX_TOKENS.items()) + ")")
    p.add_argument("--target-max-tokens", type=int, help="new tokens a target answer gets "
                   "(default: as --source-max-tokens)")
    p.add_argument("--control-every", type=int, default=LearnSpec().control_every,
                   help="every this many source training runs, one without memory")
    p.add_argument("--task-similarity", type=float, default=MIN_TASK_SIMILARITY,
                   help="how close a target run must be to an insight to replay it on")
    p.add_argument("--seed", type=int, default=26, help="which training questions")
    p.add_argument("--device", default="auto", help="the model's device (auto: cpu here)")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep the peer, its memory, each finished phase and every answer "
                        "in DIR (default: a temporary directory); run again with the same "
                        "DIR and options to resume: a finished phase is not run again, "
                        "nor an answered question (a kill during the target runs or the "
                        "abstraction runs that phase again, beside the part it kept)")
    p.add_argument("--answers", type=Path, metavar="FILE",
                   help="take held-out answers from (and add this run's to) this JSONL "
                        "journal: an accuracy run's (its --keep DIR/answers.jsonl) holds "
                        "the no-memory answers to the same GSM8K questions")


def run_transfer(args: argparse.Namespace) -> dict[str, Any]:
    if args.source == args.target:
        raise SystemExit("transfer: --source and --target must differ")
    args.n_train = args.n_train or N_TRAIN[args.source]
    args.n_target_train = args.n_target_train or N_TARGET_TRAIN[args.target]
    args.n_eval = args.n_eval or N_EVAL[args.target]
    args.source_max_tokens = args.source_max_tokens or MAX_TOKENS[args.source]
    args.target_max_tokens = args.target_max_tokens or MAX_TOKENS[args.target]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return trio.run(_transfer, args, args.keep)
    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(_transfer, args, Path(tmp))


async def _target_runs(memory: Memory, args: argparse.Namespace, domain: str
                       ) -> dict[str, Any]:
    """The target's training questions answered without memory, each kept as an SCEC."""
    task = load_task(args.target, seed=args.seed)
    params = SamplingParams(max_tokens=args.target_max_tokens)
    runs, passed = 0, 0
    began = time.perf_counter()
    async with progress(lambda: f"target runs: {runs}/{args.n_target_train}, "
                                f"{passed} right"):
        for i in range(args.n_target_train):
            p = task.problem(i)
            outcome, _, _ = await memory.solve(Task(p.prompt, p.answer, "number", domain),
                                               memory=False, params=params)
            runs += 1
            passed += outcome.score >= 1.0
    return {"runs": runs, "passed": passed, "seconds": time.perf_counter() - began}


async def _abstract(memory: Memory, parents: list[tuple[Record, float]], domain: str
                    ) -> list[dict[str, Any]]:
    """Each parent (with its effective weight) abstracted into `domain` and judged there;
    every verdict kept."""
    out: list[dict[str, Any]] = []
    for n, (parent, weight) in enumerate(parents, 1):
        began = time.perf_counter()
        row: dict[str, Any] = {"parent": parent.item.id, "parent_text": parent.item.text,
                               "parent_kind": parent.item.kind, "parent_weight": weight,
                               "parent_uses": parent.stats.uses}
        try:
            c: Candidate = await memory.abstract(parent.item.id, domain)
        except ValueError as exc:  # the model wrote no usable tip: nothing to judge
            row.update(state="refused", reason="unusable", insight=None, utility=None,
                       tasks=0, message=str(exc))
        except KeyError:  # consolidation merged or pruned it since it was listed
            row.update(state="gone", reason="consolidated", insight=None, utility=None,
                       tasks=0)
        else:
            await c.done.wait()
            j = c.to_json()
            row.update(state=c.state, reason=c.reason, insight=c.text, item_id=j["item_id"],
                       utility=j["utility"], tasks=c.tasks)
        row["seconds"] = time.perf_counter() - began
        out.append(row)
        u = row["utility"]
        console.print(f"abstraction {n}/{len(parents)}: {row['state']} ({row['reason']}"
                      + (f", utility {u['total']:+.3f}" if u else "") + f") "
                      f"{(row['insight'] or '')[:100]!r} ({row['seconds']:.0f} s)")
    return out


async def _transfer(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    settings = ControllerSettings()
    source = domain_of(load_task(args.source, seed=args.seed).name)
    target_task = load_task(args.target, seed=args.seed)
    target = domain_of(target_task.name)
    heldout = target_task.heldout(args.n_eval)
    if "source_learning" not in Phases.open(tmp / PHASES, settings_of(args)).done:
        shutil.rmtree(tmp / "peer", ignore_errors=True)  # learning cut short: afresh
    async with open_peer(tmp / "peer") as (node, ledger):
        slot = await load_model(node, ledger, "smollm2", dtype="float32", device=args.device)
        face = slot.face()
        memory = Memory(node, slot, tmp / "peer", embedder="minilm", settings=settings,
                        task_similarity=args.task_similarity, diffuse=False)
        await node.start(memory)
        store = memory.live_store()

        phases = Phases.open(tmp / PHASES, settings_of(args))

        # 1. The source domain learns, through the service's own loop and desk.
        if "source_learning" not in phases.done:
            spec = LearnSpec(task=args.source, n=args.n_train, seed=args.seed, k=args.k,
                             max_tokens=args.source_max_tokens,
                             control_every=args.control_every)
            job, learn_s = await learn_reporting(memory, spec, source)
            phases.finish("source_learning", {
                "runs": job.runs, "passed": job.passed, "with_memory": job.with_memory,
                "proposed": job.proposed, "admitted": job.admitted,
                "refused": job.refused, "held_at_end": len(await store.records(source)),
                "seconds": learn_s})
        # What the controller's next consolidation drops (an item its uses made harmful, a
        # twin) goes now, not while the items below are abstracted one by one.
        await memory.consolidate()
        held = await store.records(source)
        source_learning = {**phases.done["source_learning"],
                           "held_after_consolidation": len(held)}
        console.print(f"source {source}: {source_learning['runs']} runs in "
                      f"{source_learning['seconds']:.0f} s, {source_learning['admitted']} "
                      f"admitted, refused {source_learning['refused'] or 'none'}; "
                      f"{len(held)} held")

        # 2. Target runs without memory: the SCECs an insight is replayed on.
        if "target_runs" not in phases.done:
            phases.finish("target_runs", await _target_runs(memory, args, target))
        target_runs = phases.done["target_runs"]
        console.print(f"target {target}: {target_runs['runs']} runs without memory, "
                      f"{target_runs['passed']} right ({target_runs['seconds']:.0f} s)")

        # 3. Abstraction of the best held items, each judged in the target domain.
        if "insights" not in phases.done:
            now = time.time()
            weighed = sorted(((r, effective_weight(r.stats, now, settings)) for r in held),
                             key=lambda rw: (-rw[1], rw[0].item.id))
            parents = weighed[:args.abstract] if args.abstract > 0 else weighed
            phases.finish("insights", {
                "parents": [r.item.id for r, _ in parents],
                "rows": await _abstract(memory, parents, target)})
        insights = phases.done["insights"]["rows"]
        admitted = sum(r["state"] == "admitted" for r in insights)
        in_target = await store.count(target)

        # 4. Held-out target questions, three ways; nothing recorded.
        parent_ids = set(phases.done["insights"]["parents"])
        others = {r.item.id for r in held} - parent_ids
        asked = 0

        async def none(text: str) -> list[str]:
            nonlocal asked
            asked += 1
            return []

        async def with_insights(text: str) -> list[str]:
            nonlocal asked
            asked += 1
            return [r.record.item.text for r in await memory.recall(text, args.k, target)]

        async def raw(text: str) -> list[str]:
            nonlocal asked
            asked += 1
            if not parent_ids:
                return []
            vector = (await store.embed([text]))[0]
            return [r.item.text for r, _ in await store.search(vector, args.k, source,
                                                                exclude=others)]

        items = {NONE: 0, INSIGHTS: in_target, RAW: len(parent_ids)}
        answers = Answers(args.answers or tmp / "answers.jsonl")
        current = NONE

        def status() -> str:
            return f"{current}: {asked}/{len(heldout)} questions"

        arms: list[Answered] = []
        for arm, recall in ((NONE, none), (INSIGHTS, with_insights), (RAW, raw)):
            if arm != NONE and items[arm] == 0:
                arms.append(dataclasses.replace(arms[0], arm=arm))
                console.print(f"{arm}: no item to give, so every prompt is the {NONE} "
                              f"arm's and greedy decoding repeats its answers: not run")
                continue
            current, asked = arm, 0
            async with progress(status):
                arms.append(await answer(face, arm, heldout, target, recall,
                                         args.target_max_tokens, answers))
            console.print(f"{arm}: {accuracy_cell(arms[-1])}")
        stats = await memory.stats()
        model_id = face.model_id

    none_arm, insight_arm, raw_arm = arms
    differences = [paired(insight_arm, none_arm), paired(raw_arm, none_arm),
                   paired(insight_arm, raw_arm)]
    print_transfer(args, source, target, arms, items, insights, differences,
                   source_learning)
    return {"section": "transfer", "source": args.source, "target": args.target,
            "source_domain": source, "target_domain": target, "model": model_id,
            "dtype": "float32", "torch_threads": 2, "embedder": "all-MiniLM-L6-v2",
            "settings": {"n_train": args.n_train, "n_target_train": args.n_target_train,
                         "n_eval": args.n_eval, "abstract": args.abstract, "k": args.k,
                         "source_max_tokens": args.source_max_tokens,
                         "target_max_tokens": args.target_max_tokens,
                         "control_every": args.control_every,
                         "task_similarity": args.task_similarity, "seed": args.seed,
                         "controller": stats["settings"]},
            "how": ("the source learns through learning.learn over source.problem(i), "
                    "i < n_train; target.problem(i), i < n_target_train, run through "
                    "Memory.solve(memory=False) (SCECs and the baseline); each held source "
                    "item (top `abstract` by effective weight) through Memory.abstract "
                    "into the target domain, admitted only by its replay there; each arm "
                    "answers target.heldout(n_eval) greedily through replay.run_task: none, "
                    "insights (Memory.recall in the target domain), raw source items (the "
                    "abstracted items nearest by cosine alone); right = number scorer; "
                    "intervals: Wilson, differences: Newcombe paired"),
            "source_learning": source_learning, "target_runs": target_runs,
            "insights": insights, "insights_admitted": admitted,
            "arms": [{**a.to_json(), "items": items[a.arm],
                      "answered": a.arm == NONE or items[a.arm] > 0} for a in arms],
            "differences": differences, "decisions": stats["decisions"],
            "baseline": stats["baseline"]}


def print_transfer(args: argparse.Namespace, source: str, target: str,
                   arms: list[Answered], items: dict[str, int],
                   insights: list[dict[str, Any]], differences: list[dict[str, Any]],
                   learning: dict[str, Any]) -> None:
    table = Table(title=f"memory transfer: {args.source} -> {args.target}, SmolLM2-135M "
                        f"float32 greedy, {args.n_train} source training questions, "
                        f"{args.n_target_train} target runs, {args.n_eval} held-out, "
                        f"k={args.k}, {args.target_max_tokens} tokens")
    for col in ("arm", "accuracy [95%]", "prompt tokens / question", "items given",
                "items available", "s / question"):
        table.add_column(col, justify="right")
    for a in arms:
        s = a.summary()
        seconds = f"{s['seconds_per_question']:.2f}" if a.arm == NONE or items[a.arm] \
            else f"(= {NONE})"
        table.add_row(a.arm, accuracy_cell(a), f"{s['mean_prompt_tokens']:.0f}",
                      f"{s['mean_items_given']:.2f}", f"{items[a.arm]:,}", seconds)
    console.print(table)
    for d in differences:
        console.print(f"{d['first']} - {d['second']}: {difference_cell(d)}")
    console.print(f"source {source}: {learning['runs']} runs ({learning['passed']} right), "
                  f"{learning['proposed']} candidates, {learning['admitted']} admitted, "
                  f"{learning['held_at_end']} held at the end, "
                  f"{learning['held_after_consolidation']} after consolidation")
    found = Table(title=f"insights abstracted from {source} items, judged on {target} runs")
    for col in ("parent weight", "insight", "verdict", "Δscore", "Δprompt tokens",
                "utility", "tasks"):
        found.add_column(col, justify="left" if col == "insight" else "right")
    for r in insights:
        u = r["utility"]
        verdict = r["state"] if r["state"] == "admitted" else f"refused: {r['reason']}"
        found.add_row(f"{r['parent_weight']:.3f}", (r["insight"] or "(none)")[:90], verdict,
                      f"{u['score']:+.3f}" if u else "-",
                      f"{u['prompt_tokens']:+.1f}" if u else "-",
                      f"{u['total']:+.3f}" if u else "-", str(r["tasks"]))
    console.print(found if insights else f"no item held in {source}: nothing to abstract")
