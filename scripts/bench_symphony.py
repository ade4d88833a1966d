"""Symphony benchmark: single worker vs 3- and 5-worker weighted votes with SmolLM2.

A testnet of --peers (default 5) real peerd processes on loopback, each serving the
whole of SmolLM2-135M-Instruct (stages = 1, --torch-threads 1), all advertising the
skills "arithmetic word problems" and "grade school math". peer0 is the requester:
every question is one `POST /v1/tasks` to it with workers = --workers (default: all
peers; the requester itself takes the last seat, as a reserve), answer_format
"number", --max-tokens per chain. Two question sets:

- GSM8K: the first --questions problems of the test set (bench/data/gsm8k/
  test.jsonl; OpenAI's grade-school-math, MIT licence), gold = the number after "####";
- two-step arithmetic: --questions word problems from fixed templates with small
  numbers, drawn with random.Random(--seed).

Accuracy per set, from each task's own votes (no extra generation):
- single worker: the chain in seat 0, the first elected (the top-ranked bidder; it
  decodes greedily with the original four worked examples; seats 1-4 decode greedily
  with the other example sets, and number tasks use the calculator in every seat);
- 3-worker vote: the weighted vote over the chains in seats 0-2 only, with the weights
  the requester gave them (the same argmax and tie-break as the daemon's vote);
- 5-worker vote: the task's answer, over all seats.
Latency: the requester's beacon round (beacon out -> workers elected) and task total,
median and p95, and client wall time per task; the share of tasks where some seat
needed a fallback worker. A first, unmeasured task warms every peer up.

Prints tables and writes bench/results/symphony.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerd.agents.answers import normalise_number  # noqa: E402
from peerd.machine import describe  # noqa: E402
from testnet import launcher  # noqa: E402
from testnet.state import free_base_port  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=170)

MODEL = "smollm2"
SKILLS = ("arithmetic word problems", "grade school math")
GSM8K = ROOT / "bench" / "data" / "gsm8k" / "test.jsonl"
TIE_EPSILON = 1e-9  # as peerd.agents.voting

TEMPLATES: list[tuple[str, Callable[[int, int, int], int]]] = [  # (question, answer)
    # with a, b, c drawn small
    ("Tom has {a} apples. He buys {b} more apples and then gives {c} apples to a friend. "
     "How many apples does Tom have now?", lambda a, b, c: a + b - c),
    ("A box holds {a} pencils. Sara buys {b} boxes and loses {c} pencils. How many "
     "pencils does she have left?", lambda a, b, c: a * b - c),
    ("There are {a} birds on a tree. {b} more birds land, then the number of birds "
     "doubles. How many birds are on the tree?", lambda a, b, c: (a + b) * 2),
    ("Mia reads {a} pages a day for {b} days, then reads {c} more pages. How many pages "
     "did she read in total?", lambda a, b, c: a * b + c),
    ("A farmer has {a} cows and {b} times as many sheep. He sells {c} sheep. How many "
     "sheep does he have now?", lambda a, b, c: a * b - c),
]


@dataclass
class Item:
    set: str
    question: str
    gold: str


@dataclass
class Outcome:
    item: Item
    result: dict[str, Any] = field(default_factory=dict)
    client_s: float = 0.0
    error: str = ""

    def votes(self, seats: int | None = None) -> list[dict[str, Any]]:
        votes: list[dict[str, Any]] = self.result.get("votes", [])
        return votes if seats is None else votes[:seats]


def gsm8k(n: int) -> list[Item]:
    items: list[Item] = []
    with GSM8K.open() as f:
        for line in f:
            if len(items) >= n:
                break
            row = json.loads(line)
            gold = normalise_number(row["answer"].rsplit("####", 1)[-1])
            items.append(Item("gsm8k", row["question"], gold or ""))
    return items


def arithmetic(n: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    items: list[Item] = []
    while len(items) < n:
        template, answer = TEMPLATES[len(items) % len(TEMPLATES)]
        a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 10)
        value = answer(a, b, c)
        if value < 0:
            continue
        items.append(Item("arithmetic", template.format(a=a, b=b, c=c), str(value)))
    return items


def vote(votes: list[dict[str, Any]]) -> str | None:
    """Weighted argmax with the daemon's tie-break (more chains, then smaller string)."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for v in votes:
        if v["answer"] is None:
            continue
        totals[v["answer"]] = totals.get(v["answer"], 0.0) + v["weight"]
        counts[v["answer"]] = counts.get(v["answer"], 0) + 1
    best = None
    for answer in sorted(totals):
        if best is None or totals[answer] > totals[best] + TIE_EPSILON or (
                abs(totals[answer] - totals[best]) <= TIE_EPSILON
                and counts[answer] > counts[best]):
            best = answer
    return best


def post_task(peer: launcher.PeerInfo, question: str, workers: int, max_tokens: int,
              deadline_s: float, bid_window_s: float) -> tuple[dict[str, Any], float]:
    body = {"question": question, "workers": workers, "answer_format": "number",
            "max_tokens": max_tokens, "deadline_s": deadline_s, "bid_window_s": bid_window_s}
    t0 = time.perf_counter()
    r = httpx.post(peer.api + "/v1/tasks", json=body, timeout=4 * deadline_s + 60,
                   headers={"Authorization": f"Bearer {peer.token}"})
    took = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/tasks answered {r.status_code}: {r.text[:300]}")
    return r.json(), took


def advertise(peers: list[launcher.PeerInfo]) -> None:
    """Skills on every peer (also passed as PEERD_SKILLS at start), then wait until the
    requester's ledger lists everyone's skills and model."""
    for p in peers:
        httpx.post(p.api + "/capabilities", json={"skills": list(SKILLS)}, timeout=10,
                   headers={"Authorization": f"Bearer {p.token}"}).raise_for_status()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = launcher.api_get(peers[0], "/ledger")
        ready = [r for r in rows if r.get("skills") and r.get("models")]
        if len(ready) >= len(peers):
            return
        time.sleep(0.5)
    raise RuntimeError("the requester's ledger never listed every peer's skills")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def accuracy(outcomes: list[Outcome], pick: Any) -> float:
    if not outcomes:
        return float("nan")
    return 100.0 * sum(1 for o in outcomes if not o.error and pick(o) == o.item.gold) \
        / len(outcomes)


def gain_ci95(rows: list[Outcome], resamples: int = 2000) -> tuple[float, float]:
    """95% interval of (vote - single worker) accuracy in points, by a paired bootstrap
    over the questions: how far one draw of questions can move the gain."""
    pairs = [(int(not o.error and o.result.get("answer") == o.item.gold),
              int(not o.error and (o.votes(1) or [{}])[0].get("answer") == o.item.gold))
             for o in rows]
    rng = random.Random(0)
    gains = sorted(100.0 * sum(v - s for v, s in rng.choices(pairs, k=len(pairs))) / len(pairs)
                   for _ in range(resamples))
    return gains[int(0.025 * resamples)], gains[int(0.975 * resamples) - 1]


def summarise(outcomes: list[Outcome], seats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("arithmetic", "gsm8k"):
        rows = [o for o in outcomes if o.item.set == name]
        if not rows:
            continue
        out[name] = {
            "questions": len(rows),
            "failed_tasks": sum(1 for o in rows if o.error),
            "single_worker_pct": accuracy(rows, lambda o: (o.votes(1) or [{}])[0].get("answer")),
            "vote_3_pct": accuracy(rows, lambda o: vote(o.votes(3))),
            f"vote_{seats}_pct": accuracy(rows, lambda o: o.result.get("answer")),
            # the ceiling of any vote: a task where no chain is right cannot be won
            "any_chain_right_pct": accuracy(rows, lambda o: o.item.gold if any(
                v.get("answer") == o.item.gold for v in o.votes()) else None),
            "chains_right_pct": 100.0 * sum(v.get("answer") == o.item.gold for o in rows
                                            for v in o.votes())
            / max(sum(len(o.votes()) for o in rows), 1),
            # right chains by seat (seat i: example set i while there are sets)
            "right_by_seat": [sum(len(o.votes()) > i and o.votes()[i].get("answer")
                                  == o.item.gold for o in rows) for i in range(seats)],
        }
        out[name]["gain_ci95_points"] = list(gain_ci95(rows))
    done = [o for o in outcomes if not o.error]
    beacon = [o.result["timings"]["beacon_ms"] for o in done]
    total = [o.result["timings"]["total_ms"] for o in done]
    client = [o.client_s * 1e3 for o in done]
    out["latency_ms"] = {
        "beacon_median": statistics.median(beacon) if beacon else None,
        "beacon_p95": pct(beacon, 0.95),
        "task_median": statistics.median(total) if total else None,
        "task_p95": pct(total, 0.95),
        "client_median": statistics.median(client) if client else None,
    }
    out["fallback_share_pct"] = (100.0 * sum(1 for o in done if o.result["fallbacks"])
                                 / len(done)) if done else None
    out["votes_per_task_mean"] = (statistics.mean(len(o.votes()) for o in done)
                                  if done else None)
    return out


def print_tables(summary: dict[str, Any], seats: int) -> None:
    t = Table(title="Symphony accuracy (SmolLM2-135M, answer = number)")
    for col in ("set", "questions", "single worker (seat 0)", "3-worker vote (seats 0-2)",
                f"{seats}-worker vote (task answer)", "vote - single (95% CI)",
                "any chain right", "chains right", "right by seat", "failed tasks"):
        t.add_column(col)
    for name in ("arithmetic", "gsm8k"):
        s = summary.get(name)
        if s:
            lo, hi = s["gain_ci95_points"]
            gain = s[f"vote_{seats}_pct"] - s["single_worker_pct"]
            t.add_row(name, str(s["questions"]), f"{s['single_worker_pct']:.1f}%",
                      f"{s['vote_3_pct']:.1f}%", f"{s[f'vote_{seats}_pct']:.1f}%",
                      f"{gain:+.1f} ({lo:+.0f}..{hi:+.0f})",
                      f"{s['any_chain_right_pct']:.1f}%", f"{s['chains_right_pct']:.1f}%",
                      " ".join(map(str, s["right_by_seat"])), str(s["failed_tasks"]))
    console.print(t)
    lat = summary["latency_ms"]
    t = Table(title="Symphony latency (requester peer0, loopback)")
    for col in ("beacon round median", "beacon p95", "task median", "task p95",
                "client median", "tasks with a fallback", "votes per task"):
        t.add_column(col)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"

    share = summary["fallback_share_pct"]
    mean_votes = summary["votes_per_task_mean"]
    t.add_row(ms(lat["beacon_median"]), ms(lat["beacon_p95"]), ms(lat["task_median"]),
              ms(lat["task_p95"]), ms(lat["client_median"]),
              "-" if share is None else f"{share:.1f}%",
              "-" if mean_votes is None else f"{mean_votes:.2f}")
    console.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=50, help="per set [50]")
    ap.add_argument("--max-tokens", type=int, default=160, help="per chain of thought [160]")
    ap.add_argument("--peers", type=int, default=5, help="testnet size [5]")
    ap.add_argument("--workers", type=int, default=None, help="seats per task [--peers]")
    ap.add_argument("--deadline-s", type=float, default=300.0, help="per worker [300]")
    ap.add_argument("--bid-window-s", type=float, default=2.0, help="[2]")
    ap.add_argument("--seed", type=int, default=1234, help="arithmetic questions [1234]")
    ap.add_argument("--sets", default="arithmetic,gsm8k", help="[arithmetic,gsm8k]")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "bench_symphony")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "symphony.json")
    args = ap.parse_args()
    workers = args.workers or args.peers
    sets = set(args.sets.split(","))
    items = ((arithmetic(args.questions, args.seed) if "arithmetic" in sets else [])
             + (gsm8k(args.questions) if "gsm8k" in sets else []))

    os.environ["PEERD_SKILLS"] = ",".join(SKILLS)  # the daemons inherit it
    console.print(f"starting {args.peers} peers serving {MODEL} (whole model each); "
                  "loading takes a while", highlight=False)
    t0 = time.monotonic()
    peers = launcher.up(args.peers, args.run_dir, free_base_port(args.peers), model=MODEL,
                        stages=1, torch_threads=1, settle_s=5.0)
    up_s = time.monotonic() - t0
    outcomes: list[Outcome] = []
    load: list[float] = []
    try:
        advertise(peers)
        requester = peers[0]
        post_task(requester, "What is 2 + 3?", workers, 16, args.deadline_s,
                  args.bid_window_s)  # warm-up, not counted
        load.append(os.getloadavg()[0])
        for i, item in enumerate(items):
            outcome = Outcome(item)
            try:
                outcome.result, outcome.client_s = post_task(
                    requester, item.question, workers, args.max_tokens, args.deadline_s,
                    args.bid_window_s)
            except Exception as exc:  # recorded, not fatal: the share of failures is data
                outcome.error = f"{type(exc).__name__}: {exc}"
            outcomes.append(outcome)
            got = outcome.result.get("answer")
            console.print(f"[{i + 1}/{len(items)}] {item.set}: gold {item.gold} answer {got} "
                          f"seat0 {(outcome.votes(1) or [{}])[0].get('answer')} "
                          f"{outcome.client_s:.1f}s {outcome.error}", highlight=False)
        load.append(os.getloadavg()[0])
    finally:
        launcher.down(args.run_dir)

    summary = summarise(outcomes, workers)
    print_tables(summary, workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "symphony",
        "model": MODEL,
        "peers": args.peers,
        "workers": workers,
        "max_tokens": args.max_tokens,
        "deadline_s": args.deadline_s,
        "bid_window_s": args.bid_window_s,
        "seed": args.seed,
        "torch_threads_per_peer": 1,
        "requester": "peer0 (also serves the model; takes the last seat as a reserve)",
        "single_worker": "seat 0 of each task (first elected, greedy, example set 0)",
        "vote_3": "weighted vote over seats 0-2 of each task, with the task's weights",
        "machine": describe() | {"load_1min": load},
        "testnet_up_s": round(up_s, 1),
        "summary": summary,
        "tasks": [{"set": o.item.set, "question": o.item.question, "gold": o.item.gold,
                   "answer": o.result.get("answer"), "error": o.error,
                   "client_s": round(o.client_s, 3),
                   "elected": o.result.get("elected"), "fallbacks": o.result.get("fallbacks"),
                   "timings": o.result.get("timings"),
                   "votes": [{k: v.get(k) for k in ("peer_id", "answer", "confidence",
                                                    "measured", "weight", "cot")}
                             for v in o.votes()]}
                  for o in outcomes],
    }, indent=1))
    console.print(f"wrote {args.out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
