"""Time to first token, cold and warm, on a 3-peer SmolLM2 testnet (one stage a peer,
1 torch thread each, float32), against the physical limit of one pass.

A request of one token is its first token's time. The entry is peer0, which serves
stage 0 itself, so a pass crosses 3 links (entry -> peer1 -> peer2 -> entry), each
T ms one way through the testnet's latency proxy. "Cold": the request opens a new
pipeline session; "warm": it takes the session the last request pooled. A cold
request is made by asking for a session longer than any pooled one (max_tokens
257, 513, ... instead of 1), stopped after its first token by a stop string that
is that token's text (learnt from the first request), so it too computes one pass.

Reported per latency, median over the requests (client side: the HTTP request's
wall; server side: the generation's wall_ms from the response's `peerd` object,
which leaves out HTTP and tokenisation): the physical limit = 3 x T + the shards'
compute + the entry's head (embedding, lm_head) of that request, and each figure's
ratio to it. Prints a table, writes bench/results/ttft.json (`--out`). Not a test:
no thresholds. Other work sharing the machine's cores moves the compute; the load
average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from peerd.machine import describe as machine  # noqa: E402
from testnet import launcher  # noqa: E402
from testnet.state import TestnetError  # noqa: E402

MODEL = "smollm2"
PEERS = 3
LINKS = 3  # entry -> peer1 -> peer2 -> entry; the entry's own stage is local
PROMPT = "Name three colours of the rainbow."
SESSION_STEP = 256  # pipeline.LENGTH_STEP: a request this much longer needs a new session


def ask(peer: launcher.PeerInfo, max_tokens: int, stop: str | None = None
        ) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                            "messages": [{"role": "user", "content": PROMPT}]}
    if stop:
        body["stop"] = [stop]
    t0 = time.perf_counter()
    reply = launcher.api_request(peer, "POST", "/v1/chat/completions", json=body,
                                 timeout_s=120.0)
    client_ms = (time.perf_counter() - t0) * 1e3
    peerd = reply["peerd"]
    return {"client_ms": round(client_ms, 1), "wall_ms": peerd["wall_ms"],
            "pipeline_ms": peerd["pipeline_ms"], "compute_ms": peerd["compute_ms"],
            "head_ms": peerd["head_ms"], "steps": peerd["steps"],
            "tokens": reply["usage"]["completion_tokens"],
            "text": reply["choices"][0]["message"]["content"]}


def run_latency(latency: float, cold: int, warm: int, base_port: int, run_dir: Path
                ) -> dict[str, Any]:
    t0 = time.monotonic()
    up = launcher.up(PEERS, run_dir, base_port, latency, model=MODEL, stages=PEERS,
                     torch_threads=1, settle_s=0.0)
    print(f"{PEERS} peers, {latency:g} ms/link: up in {time.monotonic() - t0:.0f} s")
    try:
        entry = up[0]
        first = ask(entry, 1)  # the first request on the route: cold
        colds, warms = [first], []
        stop = first["text"]
        for i in range(warm):
            warms.append(ask(entry, 1))
            if i < cold - 1:  # longer than any pooled session: a new one
                colds.append(ask(entry, SESSION_STEP * (i + 1) + 1, stop))
    finally:
        launcher.down(run_dir)
    return {"latency_ms": latency, "cold": colds, "warm": warms,
            "summary": {name: summary(runs, latency)
                        for name, runs in (("cold", colds), ("warm", warms))}}


def summary(runs: list[dict[str, Any]], latency: float) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(float(statistics.median(r[key] for r in runs)), 1)

    limit = round(statistics.median(LINKS * latency + r["compute_ms"] + r["head_ms"]
                                    for r in runs), 1)
    return {"requests": len(runs), "client_ms": med("client_ms"), "wall_ms": med("wall_ms"),
            "pipeline_ms": med("pipeline_ms"), "compute_ms": med("compute_ms"),
            "head_ms": med("head_ms"), "limit_ms": limit,
            "wall_over_limit": round(med("wall_ms") / limit, 3),
            "client_over_limit": round(med("client_ms") / limit, 3),
            "steps": sorted({r["steps"] for r in runs}),
            "tokens": sorted({r["tokens"] for r in runs})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latencies", type=float, nargs="*", default=[0.0, 20.0, 50.0])
    ap.add_argument("--cold", type=int, default=4, help="cold requests per latency")
    ap.add_argument("--warm", type=int, default=6, help="warm requests per latency")
    ap.add_argument("--label", default="", help="what this run measures (e.g. the commit)")
    ap.add_argument("--base-port", type=int, default=18400)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "bench_ttft")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ttft.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    rows = []
    try:
        for latency in args.latencies:
            rows.append(run_latency(latency, args.cold, max(args.warm, args.cold - 1),
                                    args.base_port, args.run_dir))
    except TestnetError as exc:
        print(exc)
        return 1
    print(f"{'ms/link':>8} {'':5} {'client ms':>10} {'wall ms':>8} {'pipeline':>9} "
          f"{'compute':>8} {'head':>6} {'limit':>7} {'wall/limit':>10} {'client/limit':>12}")
    for row in rows:
        for name in ("cold", "warm"):
            s = row["summary"][name]
            print(f"{row['latency_ms']:8g} {name:5} {s['client_ms']:10.1f} {s['wall_ms']:8.1f} "
                  f"{s['pipeline_ms']:9.1f} {s['compute_ms']:8.1f} {s['head_ms']:6.1f} "
                  f"{s['limit_ms']:7.1f} {s['wall_over_limit']:10.2f} "
                  f"{s['client_over_limit']:12.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "ttft", "label": args.label, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(), "model": MODEL, "peers": PEERS, "links": LINKS,
        "torch_threads_per_peer": 1, "prompt": PROMPT,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "latencies": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
