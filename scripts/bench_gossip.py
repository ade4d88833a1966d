"""Gossip benchmark: how fast N real peerd processes agree on the capability ledger.

For each N (default 8, 16, 32) it starts a cold testnet on 127.0.0.1 and measures
- cold convergence: from launching the processes until every peer's ledger holds
  every peer (the latest `received_at` any peer stamped on any entry);
- change propagation: a peer changes its skills (`POST /capabilities`); the time
  until all N peers hold the new entry, from their own `received_at` stamps (one
  clock: every process runs on this machine), over several changes at random peers;
- per-peer RSS and CPU while idle (a quiet window after the changes).

Prints a table and writes bench/results/gossip.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerd.machine import describe  # noqa: E402
from testnet import launcher  # noqa: E402

console = Console()


def ledgers(peers: list[launcher.PeerInfo]) -> list[list[dict[str, Any]]]:
    return launcher.map_peers(peers, lambda p: launcher.api_get(p, "/ledger", timeout_s=30))


def poll(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def run_one(n: int, changes: int, base_port: int, run_dir: Path, rng: random.Random
            ) -> dict[str, Any]:
    t_launch = time.time()
    peers = launcher.up(n, run_dir, base_port, settle_s=0.0, start_timeout_s=180.0)
    t_healthy = time.time() - t_launch
    try:
        ids = {p.peer_id for p in peers}
        snap: list[list[dict[str, Any]]] = []

        def converged() -> bool:
            nonlocal snap
            snap = ledgers(peers)
            return all({e["peer_id"] for e in led} >= ids for led in snap)

        poll(converged, 120, f"{n} ledgers to converge")
        cold = max(e["received_at"] or t_launch for led in snap for e in led) - t_launch

        propagation_ms = []
        for _ in range(changes):
            time.sleep(0.5)
            target = rng.choice(peers)
            t0 = time.time()
            seq = launcher.api_request(target, "POST", "/capabilities",
                                       json={"skills": [f"skill-{rng.randrange(10**6)}"]})["seq"]

            def holds(led: list[dict[str, Any]], target: launcher.PeerInfo = target,
                      seq: int = seq) -> dict[str, Any] | None:
                return next((e for e in led if e["peer_id"] == target.peer_id
                             and e["seq"] >= seq), None)

            def everywhere() -> bool:
                nonlocal snap
                snap = ledgers(peers)
                return all(holds(led) for led in snap)

            poll(everywhere, 60, "a change to reach every peer")
            arrivals = [got["received_at"] for p, led in zip(peers, snap, strict=True)
                        if p is not target and (got := holds(led)) is not None]
            propagation_ms.append((max(arrivals) - t0) * 1e3)

        procs = [psutil.Process(p.pid) for p in peers]
        for pr in procs:
            pr.cpu_percent(None)
        time.sleep(5.0)
        cpu = [pr.cpu_percent(None) for pr in procs]
        rss = [pr.memory_info().rss / 2**20 for pr in procs]
    finally:
        launcher.down(run_dir)
    return {
        "peers": n,
        "healthy_s": round(t_healthy, 3),
        "cold_converge_s": round(cold, 3),
        "change_median_ms": round(statistics.median(propagation_ms), 2),
        "change_max_ms": round(max(propagation_ms), 2),
        "change_samples_ms": [round(x, 2) for x in propagation_ms],
        "rss_mib_median": round(statistics.median(rss), 1),
        "rss_mib_max": round(max(rss), 1),
        "idle_cpu_pct_median": round(statistics.median(cpu), 2),
        "idle_cpu_pct_max": round(max(cpu), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--base-port", type=int, default=24100)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "bench_gossip")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gossip.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    rows = []
    for n in args.peers:
        with console.status(f"{n} peers: starting, converging, {args.changes} changes"):
            rows.append(run_one(n, args.changes, args.base_port, args.run_dir, rng))
        console.print(f"{n} peers done: change median {rows[-1]['change_median_ms']} ms")

    table = Table(title="gossip: capability ledger on 127.0.0.1 "
                  f"({psutil.cpu_count()} cores, heartbeat 10 s)")
    cols = [("peers", "peers"), ("all healthy s", "healthy_s"),
            ("cold converge s", "cold_converge_s"), ("change median ms", "change_median_ms"),
            ("change max ms", "change_max_ms"), ("RSS MiB/peer", "rss_mib_median"),
            ("idle CPU %/peer", "idle_cpu_pct_median")]
    for title, _ in cols:
        table.add_column(title, justify="right")
    for r in rows:
        table.add_row(*(str(r[k]) for _, k in cols))
    console.print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "gossip",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": describe(),
        "changes_per_size": args.changes,
        "results": rows,
    }, indent=2))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
