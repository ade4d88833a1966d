"""The demo's memory step (SEDM): peer0 learns from a few scored `add` runs on the
swarm's model, and every candidate those runs offer is admitted or refused by replay.

`peerd memory learn --task add -n N` on peer0 (its live line: runs, admitted, refused
by reason), then the decision log: each candidate with the utility its replay measured
(mean score with it less without, less its prompt tokens' cost), and what the memory
holds. On SmolLM2-135M most notes do not help an `add` question, so most are refused:
that is the point of measuring before keeping (bench/README.md, "Memory (SEDM)").

    from demo_memory import demo_memory
    demo_memory(console, peer, runs)     # True if learning finished
"""

from __future__ import annotations

import json
import subprocess
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from testnet import launcher


def demo_memory(console: Console, peer: launcher.PeerInfo, runs: int) -> bool:
    at = ["--data-dir", peer.data_dir]
    result = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "memory", "learn", "--task", "add", "-n",
         str(runs), "--max-tokens", "12", *at], stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        return False
    log = json.loads(subprocess.run(
        [sys.executable, "-m", "peerd.cli", "memory", "log", "--json", *at],
        capture_output=True, text=True, check=True).stdout)
    table = Table(title="each candidate, judged by replaying runs without and with it")
    for col in ("decision", "reason", "utility", "candidate"):
        table.add_column(col)
    for row in reversed(log):
        utility = row.get("utility")
        table.add_row(row["action"], escape(str(row.get("reason", ""))),
                      "-" if utility is None else f"{utility:+.3f}",
                      escape(str(row.get("text", "")).replace("\n", " / ")[:70]))
    console.print(table)
    stats = launcher.api_request(peer, "GET", "/v1/memory/stats")
    base = stats["baseline"].get("arithmetic", {})
    console.print(f"the memory holds {stats['items']} items; the no-memory score on "
                  f"arithmetic so far: {base.get('mean', 0):.2f} over {base.get('runs', 0)} "
                  "runs (`peerd memory stats`, `peerd memory search`)")
    return True
