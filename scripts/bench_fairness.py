"""Fairness benchmark: an honest request against greedy peers on a SmolLM2 testnet.

A 3-peer testnet serves SmolLM2 as a 3-stage pipeline (torch threads: 1 per peer).
Greedy peers (`python -m testnet.greedy`, real processes speaking peerd's protocol)
join it one configuration at a time, each doing what the fair-shares issue found
denied a whole swarm: it holds as many idle pipeline sessions as the peers grant
(largest max_length first, topped up every 2 s forever) and pushes --flood-positions
positions through another session back to back (keep=0 each time).

For 0, 1 and 3 greedy peers the entry peer (peer0) answers the same chat prompts
(greedy, --tokens each, streamed): honest tokens/s (completion tokens over wall time,
prefill included), time to first token, and whether the text is the undisturbed one.
From the peers: the greedy peers' sessions held at the end, sessions taken back
(evictions), share refusals and the compute the greedy peers got. Target (the issue):
honest throughput within 20% of the undisturbed figure with one greedy peer.

Prints a table and writes bench/results/fairness.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerd.machine import describe  # noqa: E402
from testnet import launcher, procs  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=170)

MODEL = "smollm2"
PROMPTS = [  # chat prompts that invite long answers
    "Explain in detail how a bicycle works.",
    "Write a short story about a lighthouse keeper and a storm.",
    "Describe how bread is made, step by step.",
    "List the planets of the solar system and say something about each.",
]
GREEDY = [0, 1, 3]
SETTLE_S = 8.0  # after greedy peers join: time to take what they can
REQUEST_TIMEOUT_S = 900.0


@dataclass
class Row:
    greedy: int
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    greedy_held: int = 0  # sessions the greedy peers held at the end (all peers)
    greedy_forwards: int = 0  # flood forwards that went through, by the end
    evictions: float = 0.0  # sessions taken back, all peers, by the end
    share_refusals: float = 0.0
    compute: dict[str, dict[str, float]] = field(default_factory=dict)  # peer0: by holder
    # the honest entry's turns at every peer's compute: turns and seconds waited for them
    honest_turns: int = 0
    honest_waited_s: float = 0.0
    load: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.seconds) if self.seconds else 0.0


def stream_chat(peer: launcher.PeerInfo, prompt: str, max_tokens: int
                ) -> tuple[int, float, float, str]:
    """(completion tokens, seconds, time to first token, text) of one streamed request."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {peer.token}"}
    t0 = time.perf_counter()
    first = 0.0
    text: list[str] = []
    tokens = 0
    with httpx.stream("POST", f"{peer.api}/v1/chat/completions", json=body, headers=headers,
                      timeout=REQUEST_TIMEOUT_S) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                if piece and not first:
                    first = time.perf_counter() - t0
                text.append(piece)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - t0, first, "".join(text)


def metric(peer: launcher.PeerInfo, name: str) -> float:
    text = httpx.get(f"{peer.api}/metrics", headers={"Authorization": f"Bearer {peer.token}"},
                     timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def start_greedy(i: int, run_dir: Path, bootstrap: str, model_id: str, hidden: int,
                 flood: int) -> procs.Proc:
    data_dir = run_dir / f"greedy{i}"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "testnet.greedy", "--data-dir", str(data_dir),
            "--bootstrap", bootstrap, "--model-id", model_id, "--hidden-size", str(hidden),
            "--idle", "--flood", str(flood)]
    return procs.spawn(argv, data_dir / "greedy.log")


def greedy_reports(run_dir: Path, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        path = run_dir / f"greedy{i}" / "greedy.json"
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            out.append({})
    return out


def honest_compute(entry: launcher.PeerInfo, peers: list[launcher.PeerInfo]
                   ) -> tuple[int, float]:
    """The entry's turns at every peer's compute so far, and the seconds it waited."""
    turns, waited = 0, 0.0
    for peer in peers:
        mine = launcher.api_request(peer, "GET", "/status").get("lent", {}).get(
            "compute", {}).get("peers", {}).get(entry.peer_id, {})
        turns += int(mine.get("turns", 0))
        waited += float(mine.get("waited_s", 0.0))
    return turns, waited


def measure(row: Row, entry: launcher.PeerInfo, peers: list[launcher.PeerInfo],
            max_tokens: int, run_dir: Path, greedy_ids: set[str]) -> Row:
    turns0, waited0 = honest_compute(entry, peers)
    row.load.append(os.getloadavg()[0])
    for prompt in PROMPTS:
        tokens, seconds, ttft, text = stream_chat(entry, prompt, max_tokens)
        row.tokens.append(tokens)
        row.seconds.append(seconds)
        row.ttft_s.append(ttft)
        row.texts.append(text)
    row.load.append(os.getloadavg()[0])
    turns1, waited1 = honest_compute(entry, peers)
    row.honest_turns, row.honest_waited_s = turns1 - turns0, round(waited1 - waited0, 3)
    reports = greedy_reports(run_dir, row.greedy)
    row.greedy_held = sum(r.get("held", 0) for r in reports)
    row.greedy_forwards = sum(r.get("forwards", 0) for r in reports)
    row.evictions = sum(metric(p, "peerd_evictions_total") for p in peers)
    row.share_refusals = sum(metric(p, "peerd_share_refusals_total") for p in peers)
    status = launcher.api_request(entry, "GET", "/status")
    turns = status.get("lent", {}).get("compute", {}).get("peers", {})
    row.compute = {("greedy" if p in greedy_ids else "honest" if p == entry.peer_id
                    else p[-8:]): c for p, c in turns.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per prompt [48]")
    ap.add_argument("--flood-positions", type=int, default=1024)
    ap.add_argument("--greedy", type=int, nargs="*", default=GREEDY)
    ap.add_argument("--base-port", type=int, default=19100)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "bench_fairness")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fairness.json")
    args = ap.parse_args()

    from peerd.inference.model.source import load_config, resolve

    hidden = int(load_config(resolve(MODEL)).hidden_size)
    rows: list[Row] = []
    greedy: list[procs.Proc] = []
    t_start = time.monotonic()
    peers = launcher.up(3, args.run_dir, args.base_port, model=MODEL, stages=3,
                        torch_threads=1, settle_s=5.0)
    try:
        entry = peers[0]
        model_id = launcher.api_request(entry, "GET", "/status")["model"]["model_id"]
        bootstrap = f"{entry.listen}/p2p/{entry.peer_id}"
        stream_chat(entry, PROMPTS[0], 4)  # warm-up
        for n in sorted(args.greedy):
            while len(greedy) < n:
                greedy.append(start_greedy(len(greedy), args.run_dir, bootstrap, model_id,
                                           hidden, args.flood_positions))
            if n:
                console.print(f"{n} greedy peer(s) joined; letting them take what they can")
                time.sleep(SETTLE_S)
            ids = {str(r["peer_id"]) for r in greedy_reports(args.run_dir, n)
                   if r.get("peer_id")}
            with console.status(f"honest requests with {n} greedy peer(s)"):
                rows.append(measure(Row(n), entry, peers, args.tokens, args.run_dir, ids))
            console.print(f"{n} greedy: {rows[-1].tokens_per_s:.2f} tokens/s")
    finally:
        procs.stop(greedy, grace_s=3.0)
        launcher.down(args.run_dir)
    report(rows, args, time.monotonic() - t_start)


def report(rows: list[Row], args: argparse.Namespace, wall_s: float) -> None:
    base = next((r for r in rows if r.greedy == 0), rows[0])
    table = Table(title=f"an honest request against greedy peers: SmolLM2, 3 peers x 1 torch "
                        f"thread, {len(PROMPTS)} prompts x {args.tokens} tokens, flood "
                        f"{args.flood_positions} positions", show_lines=False)
    for col in ("greedy peers", "honest tok/s", "vs undisturbed", "TTFT median s",
                "same text", "honest wait/turn ms", "greedy sessions held",
                "greedy flood fwds", "evictions", "share refusals",
                "peer0 compute so far: honest / greedy cost", "load 1m"):
        table.add_column(col, justify="right")
    out = []
    for r in rows:
        same = sum(a == b for a, b in zip(r.texts, base.texts, strict=True))
        honest = r.compute.get("honest", {}).get("cost", 0)
        taken = r.compute.get("greedy", {}).get("cost", 0)
        ratio = r.tokens_per_s / base.tokens_per_s if base.tokens_per_s else 0.0
        wait_ms = 1e3 * r.honest_waited_s / r.honest_turns if r.honest_turns else 0.0
        table.add_row(str(r.greedy), f"{r.tokens_per_s:.2f}", f"{100 * ratio:.0f}%",
                      f"{statistics.median(r.ttft_s):.2f}", f"{same}/{len(r.texts)}",
                      f"{wait_ms:.1f}",
                      str(r.greedy_held), str(r.greedy_forwards), f"{r.evictions:.0f}",
                      f"{r.share_refusals:.0f}", f"{honest} / {taken}",
                      " -> ".join(f"{x:.1f}" for x in r.load))
        out.append({**asdict(r), "tokens_per_s": round(r.tokens_per_s, 3),
                    "vs_undisturbed": round(ratio, 3), "same_text": same})
    console.print(table)
    result = {"benchmark": "fairness", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": describe(),
              "tokens": args.tokens, "flood_positions": args.flood_positions,
              "prompts": PROMPTS, "wall_s": round(wall_s, 1), "rows": out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
