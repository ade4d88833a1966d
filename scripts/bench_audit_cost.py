#!/usr/bin/env python3
"""What audits cost a swarm: the same requests with no request audited and with every
one drawn (peerd/inference/swarm/audit.py), on a real testnet.

5 `peerd start` processes on loopback (`testnet.launcher.up`), SmolLM2-135M float32 in
3 stages, 1 torch thread each: peer0 and peer3 serve stage 0, peer1 and peer4 stage 1,
peer2 stage 2; requests enter at peer0. An audit of a route through them replays the
request's history (prompt and answer) through the route twice and through the route
with the middle hop's layers computed by its replica: three prefills of the whole
history, in the background, one audit at a time (a request that ends while one runs
is not audited).

For each `--audit-rate` (0, then 1), the first N prompts of the mixed DSD set (chat
messages; bench/data/mixed) are sent one after another, greedy, `--tokens` new tokens,
plain decoding; after the last, the run waits for the audit in flight. Derived:
- cost of an audit = (wall time at rate 1 - wall time at rate 0) / audits run, in
  seconds and in requests' worth (over the mean request at rate 0); its passes ran on
  the same 2 cores as the requests, so this is what an audit takes from them;
- the slowdown at the default rate (0.05): 0.05 x the audit's cost in requests.

Prints a table and writes bench/results/audit_cost.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from peerd.machine import describe  # noqa: E402
from testnet import launcher  # noqa: E402

console = Console()
MODEL = "smollm2"
MIXED = ROOT / "bench" / "data" / "mixed" / "prompts.jsonl"
DEFAULT_RATE = 0.05
OUTCOMES = ("agreed", "blamed", "disputed", "inconclusive", "failed", "unauditable")
REQUEST_TIMEOUT_S = 300.0


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in MIXED.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows[:n]]


def chat(peer: launcher.PeerInfo, text: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0}
    reply: dict[str, Any] = launcher.api_request(peer, "POST", "/v1/chat/completions",
                                                 json=body, timeout_s=REQUEST_TIMEOUT_S)
    return reply


def audits(peer: launcher.PeerInfo) -> dict[str, Any]:
    status: dict[str, Any] = launcher.api_request(peer, "GET", "/status")
    return dict(status.get("audits") or {})


def run(rate: float, texts: list[str], tokens: int, base_port: int, run_dir: Path,
        progress: Progress) -> dict[str, Any]:
    peers = launcher.up(5, run_dir, base_port, model=MODEL, stages=3, torch_threads=1,
                        settle_s=0.0, peer_args=["--audit-rate", str(rate)])
    try:
        entry = peers[0]
        chat(entry, "Hello!", 4)  # warm-up: connections, the first request's allocations
        while audits(entry)["running"]:  # (and its audit, not counted)
            time.sleep(0.1)
        before = audits(entry)
        seconds, completion = [], []
        task = progress.add_task(f"audit rate {rate:g}", total=len(texts))
        t0 = time.perf_counter()
        for text in texts:
            start = time.perf_counter()
            reply = chat(entry, text, tokens)
            seconds.append(time.perf_counter() - start)
            completion.append(reply["usage"]["completion_tokens"])
            progress.advance(task)
        requests_s = time.perf_counter() - t0
        while audits(entry)["running"]:  # the last request's audit counts in the run's time
            time.sleep(0.1)
        wall_s = time.perf_counter() - t0
        after = audits(entry)
        return {"rate": rate, "requests": len(texts), "tokens": sum(completion),
                "requests_s": round(requests_s, 2), "wall_s": round(wall_s, 2),
                "request_s_mean": round(statistics.mean(seconds), 3),
                "audits": {o: after.get(o, 0) - before.get(o, 0) for o in OUTCOMES}}
    finally:
        launcher.down(run_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=20, help="the first N mixed prompts")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens a request")
    ap.add_argument("--base-port", type=int, default=18700)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "bench_audit_cost")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/audit_cost.json")
    args = ap.parse_args()
    texts = prompts(args.prompts)
    with Progress(console=console) as progress:
        runs = [run(rate, texts, args.tokens, args.base_port, args.run_dir, progress)
                for rate in (0.0, 1.0)]
    plain, audited = runs
    count = sum(audited["audits"].values())
    per_audit_s = (audited["wall_s"] - plain["wall_s"]) / count if count else float("nan")
    request_s = plain["wall_s"] / plain["requests"]
    derived = {"audits_run": count, "audit_cost_s": round(per_audit_s, 3),
               "audit_cost_requests": round(per_audit_s / request_s, 3),
               "slowdown_at_default_rate": round(DEFAULT_RATE * per_audit_s / request_s, 4)}

    table = Table(title=f"audits' cost: {args.prompts} mixed prompts x {args.tokens} tokens, "
                        "5 peers, 3 stages")
    for col in ("audit rate", "requests", "tokens", "wall s", "mean request s", "audits run"):
        table.add_column(col)
    for r in runs:
        table.add_row(f"{r['rate']:g}", str(r["requests"]), str(r["tokens"]), f"{r['wall_s']:.1f}",
                      f"{r['request_s_mean']:.2f}",
                      ", ".join(f"{v} {k}" for k, v in r["audits"].items() if v) or "-")
    console.print(table)
    console.print(f"an audit costs {per_audit_s:.2f} s: {per_audit_s / request_s:.2f} requests' "
                  f"worth; at the default rate ({DEFAULT_RATE:g}) the swarm slows by "
                  f"{100 * derived['slowdown_at_default_rate']:.1f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {"model": MODEL, "prompts": args.prompts, "tokens": args.tokens,
                     "peers": 5, "stages": 3, "torch_threads": 1, "dtype": "float32"},
        "machine": describe(), "runs": runs, "derived": derived}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
