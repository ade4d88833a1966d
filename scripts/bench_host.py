"""What keeping writes whole costs (`whole_writes`, peerd/host.py): two real in-process
peerd nodes on loopback (TCP + Noise + yamux), with the guard and without it.

For each arm, interleaved over `--repeats` rounds: bulk throughput (64 MiB written as
64 KiB stream writes, until the far end has read it all) and the median round trip of
a 32-byte echo on a stream (500 of them). Each round runs in a fresh process, so both
arms load the same code. Prints a table and writes bench/results/host_whole_writes.json.
Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SINK, ECHO = "/peerd-bench/sink/1.0.0", "/peerd-bench/echo/1.0.0"
TOTAL = 64 << 20
CHUNK = 1 << 16
ECHOES = 500


async def measure() -> dict[str, float]:
    """One round in this process: bulk MB/s and the echo's median round trip."""
    import trio

    from tests.harness import swarm

    with tempfile.TemporaryDirectory() as d:
        async with swarm(2, Path(d), target_peers=1) as (a, b):
            got = 0
            done = trio.Event()

            async def sink(stream: Any) -> None:
                nonlocal got
                while chunk := await stream.read(CHUNK):
                    got += len(chunk)
                    if got >= TOTAL:
                        done.set()

            async def echo(stream: Any) -> None:
                while data := await stream.read(64):
                    await stream.write(data)

            b.set_stream_handler(SINK, sink)
            b.set_stream_handler(ECHO, echo)
            stream = await a.new_stream(b.peer_id, SINK)
            blob = b"x" * CHUNK
            t0 = time.perf_counter()
            for _ in range(TOTAL // CHUNK):
                await stream.write(blob)
            await done.wait()
            mb_s = TOTAL / (time.perf_counter() - t0) / 1e6
            pinger = await a.new_stream(b.peer_id, ECHO)
            rtts = []
            for _ in range(ECHOES):
                t = time.perf_counter()
                await pinger.write(b"p" * 32)
                await pinger.read(64)
                rtts.append((time.perf_counter() - t) * 1e3)
    return {"mb_s": mb_s, "echo_ms": statistics.median(rtts)}


def one_round(arm: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--round", arm], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--round", choices=["guard", "none"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path,
                    default=ROOT / "bench" / "results" / "host_whole_writes.json")
    args = ap.parse_args()
    if args.round:
        import trio

        import peerd.host as host
        if args.round == "none":
            host.whole_writes = lambda noise: None  # type: ignore[assignment]
        print(json.dumps(trio.run(measure)))
        return
    console = Console()
    runs: dict[str, list[dict[str, float]]] = {"guard": [], "none": []}
    with console.status("measuring") as status:
        for r in range(args.repeats):
            for arm in ("none", "guard"):
                status.update(f"round {r + 1}/{args.repeats}: {arm}")
                runs[arm].append(one_round(arm))
    table = Table(title="Whole writes on loopback (two in-process nodes)")
    for col in ("arm", "bulk MB/s (median)", "32 B echo ms (median)", "rounds"):
        table.add_column(col)
    summary = {}
    for arm, rows in runs.items():
        mb = statistics.median(r["mb_s"] for r in rows)
        ms = statistics.median(r["echo_ms"] for r in rows)
        summary[arm] = {"mb_s": round(mb, 1), "echo_ms": round(ms, 3), "runs": rows}
        table.add_row("whole writes" if arm == "guard" else "py-libp2p as it is",
                      f"{mb:.1f}", f"{ms:.3f}", str(len(rows)))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"total_bytes": TOTAL, "chunk_bytes": CHUNK,
                                    "echoes": ECHOES, "arms": summary}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
