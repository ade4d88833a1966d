"""scripts/bench_memory.py accuracy: held-out questions answered by SmolLM2-135M with no
memory, with an add-everything memory, and with SEDM (docs/sedm.md, issue 26).

One peer in-process (bench_memory_peer.py): a node, a ModelSlot with SmolLM2-135M-Instruct
(float32, 2 torch threads) and the Memory service (MiniLM embeddings; no diffusion: there
is no other peer).

1. Learning (SEDM): the service's own learning loop (learning.learn, what `peerd memory
   learn` runs) over the task's first --n-train training questions (task.problem(i)):
   each run answered with what the memory recalls (every 5th without, for the
   no-memory baseline), kept as an SCEC, its distilled candidate (a worked example when
   right, a correction when wrong) put through the admission desk (A/B replay), the
   verdict awaited before the next run. The service's own consolidation runs on its
   own period.
2. Add-everything (the Mem0-style baseline): the same stream of candidates, every one
   stored without admission, in a store of its own, at weight 1 (so retrieval is
   similarity top-k under the controller's minimum similarity).
3. Evaluation: the task's first --n-eval held-out questions (never in a training
   stream), each answered greedily three times (no memory; the top-k of the
   add-everything store; Memory.recall's top-k), through replay.run_task: nothing is
   recorded or observed. Right: the number scorer.

Defaults were chosen before any result was seen and are not tuned on held-out questions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
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
    quantile,
    recall_texts,
)
from rich.console import Console
from rich.table import Table

from peerd.embedding import make_embedder
from peerd.memory.admissions import Candidate
from peerd.memory.controller import ControllerSettings, admission_stats, effective_weight
from peerd.memory.item import Record, sign_item
from peerd.memory.learning import LearnSpec, domain_of
from peerd.memory.service import Memory
from peerd.memory.store import MemoryStore
from peerd.rl.tasks import load_task

console = Console(width=160)
N_TRAIN = {"add": 200, "gsm8k": 60}
N_EVAL = {"add": 300, "gsm8k": 100}
PRECHECKED = ("duplicate", "refused_before", "queue_full")  # refused before any replay


LEARNED = "learned.json"  # under --keep: the finished learning phase


@dataclass(frozen=True)
class Proposal:
    """What the benchmark keeps of a candidate the learning stream proposed."""

    text: str
    domain: str
    kind: str
    origin: str
    reason: str
    created: float
    decided: float

    @classmethod
    def of(cls, c: Candidate) -> Proposal:
        return cls(c.text, c.domain, c.kind, c.origin, c.reason, c.created, c.decided)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options a kept learning phase was run with (a resume must match them)."""
    return {"task": args.task, "n_train": args.n_train, "k": args.k,
            "max_tokens": args.max_tokens, "control_every": args.control_every,
            "seed": args.seed}


@dataclass
class Learned:
    """The learning phase's record under --keep: the job's counts, its seconds and every
    candidate proposed (the memory itself is the peer's, in the same directory)."""

    job: dict[str, Any]
    seconds: float
    proposals: list[Proposal]
    settings: dict[str, Any]

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"job": self.job, "seconds": self.seconds,
                                   "settings": self.settings,
                                   "proposals": [asdict(p) for p in self.proposals]}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, args: argparse.Namespace) -> Learned | None:
        """The kept learning phase; None when there is none; SystemExit when it was run
        with other options."""
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        if raw["settings"] != settings_of(args):
            raise SystemExit(f"{path} was learnt with {raw['settings']}, not "
                             f"{settings_of(args)}: use another --keep directory")
        return cls(raw["job"], raw["seconds"], [Proposal(**p) for p in raw["proposals"]],
                   raw["settings"])


class RecordingMemory(Memory):
    """The Memory service, keeping every candidate proposed to it (the add-everything
    arm stores the same stream). Admission itself is the service's, unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proposals: list[Candidate] = []

    async def propose(self, text: str, domain: str, kind: str, *, origin: str = ""
                      ) -> Candidate:
        c = await super().propose(text, domain, kind, origin=origin)
        self.proposals.append(c)
        return c


def add_accuracy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("accuracy", help="held-out accuracy: no memory, add-everything, SEDM")
    p.add_argument("--task", choices=("add", "gsm8k"), default="add")
    p.add_argument("--n-train", type=int, help="training questions learnt from (default: "
                   + ", ".join(f"{t} {n}" for t, n in N_TRAIN.items()) + ")")
    p.add_argument("--n-eval", type=int, help="held-out questions (default: "
                   + ", ".join(f"{t} {n}" for t, n in N_EVAL.items()) + ")")
    p.add_argument("--k", type=int, default=ControllerSettings().top_k,
                   help="items a question is given (both memories)")
    p.add_argument("--max-tokens", type=int, help="new tokens an answer gets (default: "
                   + ", ".join(f"{t} {n}" for t, n in MAX_TOKENS.items()) + ")")
    p.add_argument("--control-every", type=int, default=LearnSpec().control_every,
                   help="every this many training runs, one without memory")
    p.add_argument("--seed", type=int, default=26, help="which training questions")
    p.add_argument("--device", default="auto", help="the model's device (auto: cpu here)")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep the peer, its memory and every answer in DIR (default: a "
                        "temporary directory); run again with the same DIR and options "
                        "to resume: a finished learning phase is not run again, nor an "
                        "answered question")


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    args.n_train = args.n_train or N_TRAIN[args.task]
    args.n_eval = args.n_eval or N_EVAL[args.task]
    args.max_tokens = args.max_tokens or MAX_TOKENS[args.task]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return trio.run(_accuracy, args, args.keep)
    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(_accuracy, args, Path(tmp))


async def _accuracy(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    settings = ControllerSettings()
    task = load_task(args.task, seed=args.seed)
    domain = domain_of(task.name)
    heldout = task.heldout(args.n_eval)
    if not (tmp / LEARNED).exists():  # a learning phase cut short starts again, afresh
        shutil.rmtree(tmp / "peer", ignore_errors=True)
    async with open_peer(tmp / "peer") as (node, ledger):
        slot = await load_model(node, ledger, "smollm2", dtype="float32", device=args.device)
        face = slot.face()
        memory = RecordingMemory(node, slot, tmp / "peer", embedder="minilm",
                                 settings=settings, diffuse=False)
        await node.start(memory)
        sedm = memory.live_store()

        # 1. SEDM learns, through the service's own loop and admission desk (once: a
        # resumed run takes the learning it finished from its record).
        learned = Learned.load(tmp / LEARNED, args)
        if learned is None:
            spec = LearnSpec(task=args.task, n=args.n_train, seed=args.seed, k=args.k,
                             max_tokens=args.max_tokens, control_every=args.control_every)
            job, learn_s = await learn_reporting(memory, spec, domain)
            learned = Learned(job.to_json(), learn_s,
                              [Proposal.of(c) for c in memory.proposals], settings_of(args))
            learned.save(tmp / LEARNED)
        else:
            console.print(f"learning taken from {tmp / LEARNED}")
        summary = learned.job
        console.print(f"learnt from {summary['runs']} runs in {learned.seconds:.0f} s: "
                      f"{summary['proposed']} candidates, {summary['admitted']} admitted, "
                      f"refused {summary['refused']}")

        # 2. Add-everything: the same candidates, each stored at weight 1.
        shutil.rmtree(tmp / "add_everything", ignore_errors=True)  # built again: it is quick
        everything = await MemoryStore.open(tmp / "add_everything", make_embedder("minilm"))
        try:
            for c in learned.proposals:
                item, signed = sign_item(node.key_pair.private_key, node.peer_id, c.text,
                                         c.domain, c.kind, origin=c.origin)
                weight_one = admission_stats(1.0, time.time(), settings)
                await everything.put(Record(item, signed, weight_one),
                                     (await everything.embed([c.text]))[0])

            # 3. The same held-out questions, three ways; nothing recorded.
            async def none(text: str) -> list[str]:
                return []

            async def add_all(text: str) -> list[str]:
                return await recall_texts(everything, text, args.k, domain, settings)

            async def with_sedm(text: str) -> list[str]:
                return [r.record.item.text for r in await memory.recall(text, args.k,
                                                                        domain)]

            arms: list[Answered] = []
            answers = Answers(tmp / "answers.jsonl")
            for arm, recall in (("none", none), ("add-everything", add_all),
                                ("SEDM", with_sedm)):
                arms.append(await answer(face, arm, heldout, domain, recall,
                                         args.max_tokens, answers))
                console.print(f"{arm}: {accuracy_cell(arms[-1])}")
            items = {"none": 0, "add-everything": await everything.count(),
                     "SEDM": await sedm.count()}
        finally:
            await everything.aclose()
        stats = await memory.stats()
        model_id = face.model_id
        now = time.time()
        held = [{"id": r.item.id, "kind": r.item.kind, "text": r.item.text,
                 "uses": r.stats.uses,
                 "weight": round(effective_weight(r.stats, now, settings), 4)}
                for r in await sedm.records()]
        admitted = [{"item_id": d.item_id, "utility": d.utility,
                     "text": d.detail.get("text", "")}
                    for d in await sedm.decisions(10_000, "admitted")]

    judged = [c for c in learned.proposals if c.reason not in PRECHECKED and c.decided]
    decide_s = [c.decided - c.created for c in judged]
    admission = {
        "runs": summary["runs"], "passed": summary["passed"],
        "with_memory": summary["with_memory"], "proposed": summary["proposed"],
        "admitted": summary["admitted"], "refused": summary["refused"],
        "replayed": len(judged),
        "seconds_per_admission_decision": statistics.fmean(decide_s) if decide_s else None,
        "seconds_per_admission_decision_p95": quantile(decide_s, 0.95),
        "learn_seconds": learned.seconds, "decisions": stats["decisions"],
        "baseline": stats["baseline"]}
    none_arm, everything_arm, sedm_arm = arms
    differences = [paired(sedm_arm, none_arm), paired(sedm_arm, everything_arm),
                   paired(everything_arm, none_arm)]
    print_accuracy(args, arms, items, admission, differences)
    return {"section": "accuracy", "task": args.task, "model": model_id,
            "dtype": "float32", "torch_threads": 2, "embedder": "all-MiniLM-L6-v2",
            "settings": {"n_train": args.n_train, "n_eval": args.n_eval, "k": args.k,
                         "max_tokens": args.max_tokens, "control_every": args.control_every,
                         "seed": args.seed, "controller": stats["settings"]},
            "how": ("SEDM learns through learning.learn (the service's learning loop and "
                    "admission desk) over task.problem(i), i < n_train; add-everything "
                    "stores every candidate that stream proposed, at weight 1, without "
                    "admission; each arm answers task.heldout(n_eval) greedily through "
                    "replay.run_task with its recall's top-k (nothing observed); right = "
                    "number scorer; intervals: Wilson, differences: Newcombe paired"),
            "arms": [{**a.to_json(), "items": items[a.arm]} for a in arms],
            "differences": differences, "sedm_admission": admission,
            "sedm_items": {"held": held, "admitted": admitted}}


def print_accuracy(args: argparse.Namespace, arms: list[Answered], items: dict[str, int],
                   admission: dict[str, Any], differences: list[dict[str, Any]]) -> None:
    table = Table(title=f"memory accuracy: {args.task}, SmolLM2-135M float32 greedy, "
                        f"{args.n_train} training questions, {args.n_eval} held-out, "
                        f"k={args.k}, {args.max_tokens} tokens")
    for col in ("arm", "accuracy [95%]", "prompt tokens / question", "items given",
                "items in memory", "s / question"):
        table.add_column(col, justify="right")
    for a in arms:
        s = a.summary()
        table.add_row(a.arm, accuracy_cell(a), f"{s['mean_prompt_tokens']:.0f}",
                      f"{s['mean_items_given']:.2f}", f"{items[a.arm]:,}",
                      f"{s['seconds_per_question']:.2f}")
    console.print(table)
    for d in differences:
        console.print(f"{d['first']} - {d['second']}: {difference_cell(d)}")
    per = admission["seconds_per_admission_decision"]
    console.print(f"SEDM learning: {admission['runs']} runs ({admission['passed']} right, "
                  f"{admission['with_memory']} given memory), {admission['proposed']} "
                  f"candidates: {admission['admitted']} admitted, refused "
                  f"{admission['refused'] or 'none'}; {admission['replayed']} replayed, "
                  + (f"{per:.1f} s a decision" if per is not None else "no replays"))
