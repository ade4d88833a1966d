"""scripts/bench_memory.py growth: the memory's mechanics under a long stream of candidate
writes (docs/sedm.md, issue 26): store size, the share admitted and refused by reason,
the time of each decision (the precheck, the replay), the store held under its cap by
consolidation, and SmolLM2's held-out accuracy at a few points of the stream.

The stream. Each element is a training run made up, not run (--stream of them; running
a model 10,000 times is what the bench cannot afford): a question drawn uniformly from
the first --questions of the task's training stream, an output in one of a few forms,
right with probability --pass-rate ("72", "The answer is 72.", ...; a wrong number, or a
sentence with none, otherwise), scored by the number scorer and kept in the store as an
SCEC (SmolLM2's model id, greedy, --max-tokens), and its candidate distilled from it
(distill.py: a worked example when right, a correction when wrong), proposed with that
SCEC as its origin and its verdict awaited before the next, as learning.learn does. A
question recurs about stream/questions times, each time as one of its variants (these
embed above the merge threshold to each other; two questions that differ in their
numbers, well below it): most of the stream is near-duplicates or variants.

The judge. Everything else is the service's own: the precheck, the desk's A/B replay on
the origin and the SCECs nearest it, consolidation. Replays run on two models: every
--judge-every-th candidate of the stream on SmolLM2-135M float32 (the judge of record:
what the store holds comes from its verdicts), the others on the tiny random Llama of
tests/models.py, which never answers a number right, so it refuses every candidate it
judges (no_gain: the candidate's prompt tokens, nothing gained); it carries the stream
through the desk at a fraction of SmolLM2's cost, so the precheck, queue, log and store
see all of it. The output and JSON say which candidates each judged.

Consolidation runs as the service runs it (its own timer) and, so that the result does
not hang on the machine's speed, also after every --consolidate-every decisions
(Memory.consolidate, what the timer calls). Admission does not look at the cap: between
consolidations the store can pass it, and the output says by how much.

Checkpoints: at --points evenly spaced points of the stream and before it, SmolLM2 answers
the task's first --eval-n held-out questions greedily with Memory.recall's top --k
(never observed: nothing is recorded).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from bench_memory_peer import (
    MAX_TOKENS,
    Answered,
    accuracy_cell,
    answer,
    difference_cell,
    load_model,
    open_peer,
    paired,
    quantile,
)
from rich.console import Console
from rich.table import Table

from peerd.inference.options import SamplingParams
from peerd.memory.controller import ControllerSettings
from peerd.memory.distill import distill
from peerd.memory.learning import domain_of
from peerd.memory.scec import Task, build, encode_scec, scec_hash
from peerd.memory.scoring import number
from peerd.memory.service import CONSOLIDATE_EVERY_S, Memory
from peerd.rl.tasks import Problem, load_task, parse_number
from tests.models import tiny_llama_dir

console = Console(width=160)
RIGHT = ("{c}", "The answer is {c}.", "So the answer is {c}.")
WRONG = ("{w}", "The answer is {w}.", "To solve this, we need to combine the numbers.")
SMOLLM2, TINY = "smollm2", "tiny"


def made_up_run(problem: Problem, rng: random.Random, pass_rate: float) -> tuple[str, float]:
    """An output of a run on `problem` and its score: right with probability pass_rate."""
    value = parse_number(problem.answer)
    if value is None:  # the tasks check their answers are numbers
        raise ValueError(f"answer {problem.answer!r} is not a number")
    if rng.random() < pass_rate:
        output = rng.choice(RIGHT).format(c=f"{value.normalize():f}")
    else:
        wrong = value + rng.choice((-10, -1, 1, 10))
        output = rng.choice(WRONG).format(w=f"{wrong.normalize():f}")
    return output, number(output, problem.answer)


def add_growth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("growth", help="store size, admissions and accuracy over a long "
                                      "stream of candidates")
    p.add_argument("--task", choices=("add", "gsm8k"), default="add")
    p.add_argument("--stream", type=int, default=10_000, help="candidate writes")
    p.add_argument("--questions", type=int, default=2_000,
                   help="distinct training questions the stream's runs ask")
    p.add_argument("--pass-rate", type=float, default=0.3,
                   help="share of the made-up runs that answered right")
    p.add_argument("--cap", type=int, default=64, help="the store's size cap")
    p.add_argument("--judge-every", type=int, default=40,
                   help="every this-many-th candidate judged by SmolLM2, the rest by the "
                        "tiny random Llama")
    p.add_argument("--consolidate-every", type=int, default=500,
                   help="decisions between consolidations (besides the service's timer)")
    p.add_argument("--points", type=int, default=3, help="accuracy checkpoints in the "
                                                         "stream (and one before it)")
    p.add_argument("--eval-n", type=int, default=50, help="held-out questions a checkpoint")
    p.add_argument("--k", type=int, default=ControllerSettings().top_k)
    p.add_argument("--max-tokens", type=int, help="the SCECs' max_tokens, so every replay's "
                   "and the checkpoints' (default: "
                   + ", ".join(f"{t} {n}" for t, n in MAX_TOKENS.items()) + ")")
    p.add_argument("--seed", type=int, default=26)
    p.add_argument("--device", default="auto", help="SmolLM2's device (auto: cpu here)")


def run_growth(args: argparse.Namespace) -> dict[str, Any]:
    args.max_tokens = args.max_tokens or MAX_TOKENS[args.task]
    if args.judge_every < 1 or args.consolidate_every < 1 or args.points < 1:
        raise SystemExit("--judge-every, --consolidate-every and --points: at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(_growth, args, Path(tmp))


async def _growth(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    settings = ControllerSettings(size_cap=args.cap, top_k=args.k)
    task = load_task(args.task, seed=args.seed)
    domain = domain_of(task.name)
    heldout = task.heldout(args.eval_n)
    pool = [task.problem(i) for i in range(args.questions)]
    rng = random.Random(f"growth:{args.seed}")
    params = SamplingParams(max_tokens=args.max_tokens)
    points = sorted({round(args.stream * j / args.points) for j in range(args.points + 1)})
    tiny_dir = tiny_llama_dir(tmp)

    async with open_peer(tmp / "peer") as (node, ledger), \
            open_peer(tmp / "judge") as (judge_node, judge_ledger):
        smol = await load_model(node, ledger, "smollm2", dtype="float32", device=args.device)
        tiny = await load_model(judge_node, judge_ledger, str(tiny_dir))
        memory = Memory(node, smol, tmp / "peer", embedder="minilm", settings=settings,
                        diffuse=False)
        await node.start(memory)
        store = memory.live_store()
        face = smol.face()

        async def recall(text: str) -> list[str]:
            return [r.record.item.text for r in await memory.recall(text, args.k, domain)]

        checkpoints: list[tuple[int, int, Answered]] = []
        sizes: list[int] = []
        consolidations: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []  # one per candidate
        texts: set[str] = set()
        asked: set[str] = set()
        began = time.perf_counter()
        for i in range(args.stream + 1):
            if i in points:
                a = await answer(face, f"after {i:,}", heldout, domain, recall,
                                 args.max_tokens)
                checkpoints.append((i, await store.count(), a))
                console.print(f"checkpoint at {i:,}: {await store.count()} items, "
                              f"{accuracy_cell(a)}")
            if i == args.stream:
                break
            problem = rng.choice(pool)
            output, score = made_up_run(problem, rng, args.pass_rate)
            scec = build(Task(problem.prompt, problem.answer, "number", domain),
                         model=face.model_id, version="", params=params, memory=(),
                         output=output, score=score, prompt_tokens=0, latency_s=0.0)
            origin = scec_hash(scec)
            await store.put_scec(origin, domain, encode_scec(scec), scec.prompt,
                                 (await store.embed([scec.prompt]))[0])
            (candidate,) = distill(problem.prompt, output, problem.answer, score)
            judge = SMOLLM2 if i % args.judge_every == 0 else TINY
            memory.model = smol if judge == SMOLLM2 else tiny
            t0 = time.perf_counter()
            c = await memory.propose(candidate.text, domain, candidate.kind, origin=origin)
            t1 = time.perf_counter()
            await c.done.wait()
            t2 = time.perf_counter()
            asked.add(problem.prompt)
            texts.add(candidate.text)
            rows.append({"judge": judge, "state": c.state, "reason": c.reason,
                         "replayed": c.tasks > 0, "precheck_s": t1 - t0,
                         "replay_s": t2 - t1 if c.tasks > 0 else None,
                         "utility": None if c.utility is None else c.utility.total})
            sizes.append(await store.count())
            if (i + 1) % args.consolidate_every == 0:
                before = sizes[-1]
                applied = await memory.consolidate()
                done = Counter(a.action for a in applied)
                consolidations.append({"after": i + 1, "before": before,
                                       "items": await store.count(), **done})
                console.print(f"{i + 1:,} candidates in {time.perf_counter() - began:.0f} "
                              f"s: {before} items, consolidated to "
                              f"{consolidations[-1]['items']} "
                              f"({dict(done) or 'nothing to do'})")
        stream_s = time.perf_counter() - began
        memory.model = smol
        final = await store.count()
        logged = {action: len(await store.decisions(10 * args.stream + 100, action))
                  for action in ("merged", "pruned", "evicted")}
        model_id, tiny_id = face.model_id, tiny.face().model_id

    result = summarise(args, rows, sizes, consolidations, checkpoints, logged)
    result.update(final_items=final, model=model_id, tiny_model=tiny_id,
                  stream_seconds=stream_s, distinct_questions=len(asked),
                  distinct_candidate_texts=len(texts), consolidate_every_s=CONSOLIDATE_EVERY_S)
    print_growth(args, result, checkpoints)
    return result


def summarise(args: argparse.Namespace, rows: list[dict[str, Any]], sizes: list[int],
              consolidations: list[dict[str, Any]],
              checkpoints: list[tuple[int, int, Answered]],
              logged: dict[str, int]) -> dict[str, Any]:
    judges: dict[str, Any] = {}
    for judge in (SMOLLM2, TINY):
        mine = [r for r in rows if r["judge"] == judge]
        replays = [r["replay_s"] for r in mine if r["replayed"]]
        admitted = sum(r["state"] == "admitted" for r in mine)
        judges[judge] = {
            "candidates": len(mine), "replayed": len(replays), "admitted": admitted,
            "admitted_of_replayed": admitted / len(replays) if replays else None,
            "refused": dict(Counter(r["reason"] for r in mine if r["state"] == "refused")),
            "replay_s_mean": statistics.fmean(replays) if replays else None,
            "replay_s_p50": quantile(replays, 0.5), "replay_s_p95": quantile(replays, 0.95)}
    prechecks = [r["precheck_s"] for r in rows]
    n = max(len(rows), 1)
    after = [c["items"] for c in consolidations]
    first, last = checkpoints[0][2], checkpoints[-1][2]
    return {
        "section": "growth", "task": args.task,
        "settings": {k: getattr(args, k) for k in (
            "stream", "questions", "pass_rate", "cap", "judge_every", "consolidate_every",
            "points", "eval_n", "k", "max_tokens", "seed")},
        "replayed_with": (f"every {args.judge_every}th candidate of the stream replayed "
                          "on SmolLM2-135M-Instruct float32 (2 threads); the others on the "
                          "tiny random Llama of tests/models.py, which gains nothing on a "
                          "number question, so refuses what it judges"),
        "stream_made": ("made-up runs: a question drawn uniformly from the first "
                        f"{args.questions} training questions, an output right with "
                        f"probability {args.pass_rate} in one of {len(RIGHT)} forms (a "
                        f"wrong one in one of {len(WRONG)}), kept as an SCEC; its "
                        "distilled candidate proposed with it as origin"),
        "admitted_share": sum(r["state"] == "admitted" for r in rows) / n,
        "refused": dict(Counter(r["reason"] for r in rows if r["state"] == "refused")),
        "judges": judges,
        "precheck_s_mean": statistics.fmean(prechecks) if prechecks else None,
        "precheck_s_p50": quantile(prechecks, 0.5),
        "precheck_s_p95": quantile(prechecks, 0.95),
        "max_items": max(sizes, default=0),
        "max_items_after_consolidation": max(after, default=None),
        "over_cap_after_consolidation": sum(a > args.cap for a in after),
        "consolidations": consolidations, "logged": logged,
        "items_over_stream": [[i + 1, s] for i, s in enumerate(sizes)
                              if (i + 1) % max(1, len(sizes) // 200) == 0],
        "checkpoints": [{"after": i, "items": items, **a.to_json()}
                        for i, items, a in checkpoints],
        "last_minus_first": paired(last, first)}


def print_growth(args: argparse.Namespace, r: dict[str, Any],
                 checkpoints: list[tuple[int, int, Answered]]) -> None:
    console.print(f"replayed with: {r['replayed_with']}")
    table = Table(title=f"memory growth: {args.stream:,} candidates ({args.task}, "
                        f"{r['distinct_questions']:,} questions, "
                        f"{r['distinct_candidate_texts']:,} distinct texts), cap {args.cap}")
    for col in ("judge", "candidates", "replayed", "admitted", "refused by reason",
                "replay s (mean | p50 | p95)"):
        table.add_column(col, justify="right")
    for judge, j in r["judges"].items():
        times = (" | ".join(f"{j[f'replay_s_{q}']:.2f}" for q in ("mean", "p50", "p95"))
                 if j["replayed"] else "-")
        table.add_row(judge, f"{j['candidates']:,}", f"{j['replayed']:,}",
                      f"{j['admitted']:,}", ", ".join(f"{k} {v:,}" for k, v in
                                                      sorted(j["refused"].items())) or "-",
                      times)
    console.print(table)
    console.print(f"precheck: {1000 * (r['precheck_s_mean'] or 0):.1f} ms mean, "
                  f"{1000 * (r['precheck_s_p95'] or 0):.1f} ms p95; admitted "
                  f"{100 * r['admitted_share']:.1f}% of the stream; items: at most "
                  f"{r['max_items']} (cap {args.cap}), at most "
                  f"{r['max_items_after_consolidation']} after a consolidation, "
                  f"{r['final_items']} at the end; removed: {r['logged']}")
    points = Table(title=f"SmolLM2 held-out accuracy along the stream ({args.eval_n} "
                         f"questions, k={args.k}, {args.max_tokens} tokens)")
    for col in ("after candidates", "items", "accuracy [95%]", "prompt tokens",
                "items given"):
        points.add_column(col, justify="right")
    for i, items, a in checkpoints:
        s = a.summary()
        points.add_row(f"{i:,}", f"{items:,}", accuracy_cell(a),
                       f"{s['mean_prompt_tokens']:.0f}", f"{s['mean_items_given']:.2f}")
    console.print(points)
    console.print(f"last - first checkpoint: {difference_cell(r['last_minus_first'])}")
