"""The peerd demo: a local testnet of real peers serving SmolLM2 as a 3-stage pipeline.

The peers find each other and their ledgers converge, a capability change reaches
every peer, then a question goes through the swarm (streaming chat completion on one
peer, its layers spread over all three), once decoded plainly and once with
speculative decoding (DSD: the entry peer drafts with the shipped EAGLE head and the
pipeline verifies every draft in one pass), over links with injected latency. Then a
task goes to workers elected by beacon, each answering with a chain of thought, and
the answer is settled by a reputation-weighted vote (Symphony). Then a goal is reached
with a plan over the swarm's typed tools, each step written by the model under the
tools' grammar and each call run by a peer that offers the tool (Gradientsys). Then the
memory learns from a few scored runs, every candidate admitted or refused by replay
(SEDM). Then the
testnet shuts down cleanly, and a small one of its own shows RL post-training with the swarm
as samplers (Echo): a few GRPO steps in async mode, with each step's policy version
and the staleness of its rollouts. Run through `scripts/demo`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo_memory import demo_memory  # noqa: E402
from demo_plan import demo_plan  # noqa: E402
from demo_rl import demo_rl  # noqa: E402
from demo_task import demo_task  # noqa: E402

from testnet import launcher  # noqa: E402
from testnet.state import RunState, TestnetError  # noqa: E402

console = Console()
MODEL = "smollm2"
# A word problem: the shipped EAGLE head was trained on such answers (GSM8K *train*
# questions and peerd's own prompts), so its drafts are accepted more often than on prose.
QUESTION = ("A baker makes 12 loaves of bread a day and sells each for $3. How much money "
            "does she make in a week? Think step by step.")


def wait_until(what: str, check: Callable[[], bool], timeout_s: float) -> float:
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


def start(n: int, stages: int, base_port: int, run_dir: Path,
          latency_ms: float) -> list[launcher.PeerInfo]:
    """`launcher.up` with a spinner that shows each peer's model state while it loads.

    `up` runs in a daemon thread so that Ctrl-C reaches this one at once; `main` then
    stops the peers, and `up` (seeing them gone) gives up too."""
    result: list[list[launcher.PeerInfo]] = []
    failure: list[BaseException] = []

    def run_up() -> None:
        try:
            result.append(launcher.up(n, run_dir, base_port, latency_ms, model=MODEL,
                                      stages=stages, settle_s=5.0))  # fmt: skip
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=run_up, name="testnet-up", daemon=True)
    thread.start()
    with console.status(f"starting {n} peerd processes serving {MODEL}") as spinner:
        while thread.is_alive():
            thread.join(1.0)
            try:
                now = launcher.status(run_dir)
            except TestnetError:  # the state file is not written yet
                continue
            if now and all(p.alive for p in now):  # else the previous run's file
                states = ", ".join(f"{p.name} {p.model_state or 'starting'}" for p in now)
                spinner.update(f"loading {MODEL} ({time.monotonic() - t0:.0f} s): {states}")
    if failure:
        raise failure[0]
    console.print(f"{n} peers up, each has loaded its stage and every ledger lists every "
                  f"stage, {time.monotonic() - t0:.1f} s after launch")
    return result[0]


def show_swarm(peers: list[launcher.PeerInfo]) -> None:
    table = Table(title="who found whom")
    for col in ("peer", "peer id", "layers", "connected to", "rtt ms (min..max)", "ledger"):
        table.add_column(col)
    for p, led in zip(peers, ledgers(peers), strict=True):
        rtts = sorted(p.rtt_ms.values())
        rtt = f"{rtts[0]:.1f}..{rtts[-1]:.1f}" if rtts else "-"
        layers = f"[{p.layers[0]}, {p.layers[1]})" if p.layers else "-"
        table.add_row(p.name, p.peer_id[-10:], layers, ", ".join(sorted(p.connected)), rtt,
                      f"{len(led)}/{len(peers)} entries")
    console.print(table)


def capability_change(peers: list[launcher.PeerInfo]) -> None:
    target = peers[min(2, len(peers) - 1)]
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


def ask(entry: launcher.PeerInfo, peers: list[launcher.PeerInfo], question: str,
        max_tokens: int, speculative: dict[str, Any] | None = None,
        title: str = "") -> tuple[str, dict[str, Any]]:
    """Stream a chat completion from `entry`, printing the answer as it comes; the text
    and the final chunk."""
    console.rule(f"[bold]asking {entry.name} {title or '(the swarm serves the layers)'}")
    console.print(f"[bold]Q:[/] {question}")
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if speculative is not None:
        body["speculative"] = speculative
    text: list[str] = []
    final: dict[str, Any] | None = None
    spinner = console.status("waiting for the first token")
    spinner.start()
    answering = False
    try:
        with httpx.stream("POST", entry.api + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {entry.token}"},
                          timeout=120.0) as reply:  # fmt: skip
            if reply.status_code != 200:
                reply.read()
                raise SystemExit(f"the swarm refused the question: {reply.status_code} "
                                 f"{reply.text}")
            for line in reply.iter_lines():
                data = line.removeprefix("data: ")
                if not line.startswith("data: ") or data == "[DONE]":
                    continue
                event = json.loads(data)
                if "error" in event:
                    raise SystemExit(f"generation failed: {event['error']['message']}")
                delta = event["choices"][0].get("delta", {}).get("content")
                if delta:
                    text.append(delta)
                    if not answering:
                        spinner.stop()
                        console.print("[bold]A:[/] ", end="")
                        answering = True
                    console.print(delta, end="", markup=False, highlight=False)
                if "peerd" in event:
                    final = event
    finally:
        spinner.stop()
    console.print()
    if final is None:
        raise SystemExit("the answer ended without its final chunk (route and timing)")
    names = {p.peer_id: p.name for p in peers}
    stats = final["peerd"]
    table = Table(title="the answer's route", caption=f"then back to {entry.name}")
    for col in ("hop", "peer", "layers"):
        table.add_column(col)
    for i, hop in enumerate(stats["route"], 1):
        a, b = hop["layers"]
        table.add_row(str(i), names.get(hop["peer_id"], hop["peer_id"][-10:]), f"[{a}, {b})")
    console.print(table)
    tokens = final.get("usage", {}).get("completion_tokens", "?")
    console.print(f"{tokens} tokens at {stats['tokens_per_s']:.1f} tokens/s "
                  f"({stats['steps']} pipeline steps, {stats['compute_ms']:.0f} ms of "
                  f"{stats['wall_ms']:.0f} ms computing in shards, {stats['reroutes']} "
                  "re-routes)")
    return "".join(text), final


def compare(plain: tuple[str, dict[str, Any]], dsd: tuple[str, dict[str, Any]],
            latency_ms: float) -> None:
    table = Table(title=f"plain vs speculative decoding, {latency_ms:g} ms per link")
    for col in ("decoding", "tokens", "tok/s", "passes", "tok/pass", "sent/pass",
                "draft ms", "same"):
        table.add_column(col, justify="right")
    for name, (text, final) in (("plain", plain), ("DSD eagle", dsd)):
        stats, spec = final["peerd"], final["peerd"]["speculative"]
        table.add_row(name, str(final.get("usage", {}).get("completion_tokens", "?")),
                      f"{stats['tokens_per_s']:.1f}", str(spec["rounds"]),
                      f"{spec['tokens_per_round']:.2f}",
                      f"{spec.get('mean_nodes', 0.0):.1f}" + (" tree" if spec.get("tree") else ""),
                      f"{spec['draft_ms']:.0f}",
                      "-" if name == "plain" else ("yes" if text == plain[0] else "no"))
    console.print(table)
    speedup = dsd[1]["peerd"]["tokens_per_s"] / max(plain[1]["peerd"]["tokens_per_s"], 1e-9)
    console.print(f"speculative decoding: {speedup:.2f}x the plain speed, "
                  f"{dsd[1]['peerd']['speculative']['tokens_per_round']:.2f} tokens accepted "
                  "per pass through the pipeline (greedy verification: the same answer)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=20.0,
                    help="latency injected on every peer-to-peer link")
    ap.add_argument("--base-port", type=int, default=launcher.DEFAULT_BASE_PORT)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "demo")
    ap.add_argument("--plan-steps", type=int, default=2,
                    help="steps of the plan step's budget (0: skip the plan step)")
    ap.add_argument("--memory-runs", type=int, default=3,
                    help="scored runs the memory learns from (0: skip the memory step)")
    ap.add_argument("--rl-steps", type=int, default=10,
                    help="GRPO steps of the RL step, on a testnet of its own (0: skip it)")
    args = ap.parse_args()
    n = args.peers

    console.rule(f"[bold]peerd demo: {n} peers on 127.0.0.1 serving {MODEL} in "
                 f"{args.stages} stages, {args.latency_ms:g} ms per link")
    stopped = 0
    try:
        peers = start(n, args.stages, args.base_port, args.run_dir, args.latency_ms)
        show_swarm(launcher.status(args.run_dir))
        capability_change(peers)
        plain = ask(peers[0], peers, args.question, args.max_tokens)
        dsd = ask(peers[0], peers, args.question, args.max_tokens,
                  {"draft": "eagle", "verify": "greedy"},
                  "again, decoding speculatively (EAGLE drafts, the pipeline verifies)")
        compare(plain, dsd, args.latency_ms)
        console.rule("[bold]Symphony: a task for workers elected by beacon, settled by vote")
        if not demo_task(peers, console, max_tokens=64):
            return 1
        if args.plan_steps > 0:
            console.rule("[bold]Gradientsys: a plan over the swarm's typed tools")
            if not demo_plan(console, peers[0], args.plan_steps):
                return 1
        if args.memory_runs > 0:
            console.rule("[bold]SEDM: a memory that keeps only what a replay shows helps")
            if not demo_memory(console, peers[0], args.memory_runs):
                return 1
    except TestnetError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 1
    finally:
        if RunState.load(args.run_dir.resolve()) is not None:  # else nothing was started
            with console.status("stopping the testnet"):
                stopped = launcher.down(args.run_dir)
    left = [p for p in launcher.status(args.run_dir) if p.alive]
    if left:
        console.print(f"[red]still running after down: {', '.join(p.name for p in left)}[/]")
        return 1
    console.print(f"stopped {stopped} peers cleanly; no process left behind")
    if args.rl_steps > 0:
        console.rule("[bold]Echo: RL post-training, the swarm's peers sampling the rollouts")
        try:
            if not demo_rl(console, args.run_dir.parent / "demo-rl", args.base_port + 10,
                           args.rl_steps):
                return 1
        except TestnetError as exc:
            console.print(f"[red]error:[/] {exc}", highlight=False)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
