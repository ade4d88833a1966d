"""The foundation demo: a local 5-peer testnet, gossip convergence, a capability
change seen by every peer, a clean shutdown. Run through `scripts/demo`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testnet import launcher

console = Console()
ROOT = Path(__file__).resolve().parent.parent


def wait_until(what: str, check: Any, timeout_s: float) -> float:
    """Poll `check()` until true; the seconds it took. Exits the demo on timeout."""
    t0 = time.monotonic()
    with console.status(what):
        while not check():
            if time.monotonic() - t0 > timeout_s:
                console.print(f"[red]timed out after {timeout_s:.0f} s: {what}[/]")
                raise SystemExit(1)
            time.sleep(0.05)
    return time.monotonic() - t0


def ledgers(peers: list[launcher.PeerInfo]) -> list[list[dict[str, Any]]]:
    return launcher.map_peers(peers, lambda p: launcher.api_get(p, "/ledger"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peers", type=int, default=5)
    ap.add_argument("--base-port", type=int, default=launcher.DEFAULT_BASE_PORT)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "demo")
    args = ap.parse_args()
    n = args.peers

    console.rule(f"[bold]peerd demo: {n} peers on 127.0.0.1")
    t_up = time.monotonic()
    with console.status(f"starting {n} peerd processes"):
        peers = launcher.up(n, args.run_dir, args.base_port, settle_s=5.0)
    console.print(f"{n} peers answer /health after {time.monotonic() - t_up:.1f} s")
    try:
        ids = {p.peer_id for p in peers}
        took = wait_until(
            "waiting for every ledger to hold every peer",
            lambda: all({e["peer_id"] for e in led} >= ids for led in ledgers(peers)), 60,
        )
        console.print(f"ledgers converged {took:.2f} s later")
        peers = launcher.status(args.run_dir)
        table = Table(title="who found whom")
        for col in ("peer", "peer id", "connected to", "rtt ms (min..max)", "ledger"):
            table.add_column(col)
        for p, led in zip(peers, ledgers(peers), strict=True):
            rtts = sorted(p.rtt_ms.values())
            rtt = f"{rtts[0]:.1f}..{rtts[-1]:.1f}" if rtts else "-"
            table.add_row(p.name, p.peer_id[-10:], ", ".join(sorted(p.connected)), rtt,
                          f"{len(led)}/{n} entries")
        console.print(table)

        target = peers[min(2, n - 1)]
        skills = ["arithmetic word problems", "python code"]
        console.rule(f"[bold]{target.name} advertises new skills: {', '.join(skills)}")
        t0 = time.time()
        reply = launcher.api_request(target, "POST", "/capabilities", json={"skills": skills})
        seq = reply["seq"]

        def seen_everywhere() -> bool:
            return all(any(e["peer_id"] == target.peer_id and e["seq"] >= seq for e in led)
                       for led in ledgers(peers))

        wait_until("waiting for every peer to see the change", seen_everywhere, 30)
        table = Table(title=f"{target.name}'s entry as each peer holds it")
        for col in ("peer", "seq", "skills", "heard after"):
            table.add_column(col)
        for p, led in zip(peers, ledgers(peers), strict=True):
            e = next(e for e in led if e["peer_id"] == target.peer_id)
            heard = "(its own change)" if p is target else f"{(e['received_at'] - t0) * 1e3:.1f} ms"
            table.add_row(p.name, str(e["seq"]), ", ".join(e["skills"]), heard)
        console.print(table)
    finally:
        with console.status("stopping the testnet"):
            stopped = launcher.down(args.run_dir)
    left = [p for p in launcher.status(args.run_dir) if p.alive]
    if left:
        console.print(f"[red]still running after down: {', '.join(p.name for p in left)}[/]")
        return 1
    console.print(f"stopped {stopped} peers cleanly; no process left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
