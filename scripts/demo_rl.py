"""The demo's RL step (Echo): a tiny random Llama learns to answer "7" by GRPO in
async mode, the swarm's peers sampling its rollouts.

A testnet of its own (`python -m testnet up --peers 2 --model TINY --rollout`: both
peers serve the whole model and sample), peer0 also the trainer: `peerd rl train
--mode async --staleness 1` runs there with its live table (step, policy version,
reward, staleness, samples/s, sync time). Then each step from the run's
metrics.jsonl, the staleness of every rollout trained on, and the version each
sampler followed to. The model is random and built on the spot (tests/models.py), so
nothing is downloaded and it trains in seconds on a CPU.

    from demo_rl import demo_rl
    demo_rl(console, run_dir, base_port)     # True if the run finished
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testnet import launcher
from tests.models import tiny_llama_dir
from tests.rl_swarm import seven_task

RUN_ID = "demo"
TRAIN = ["--mode", "async", "--staleness", "1", "--group", "8", "--batch", "4",
         "--max-tokens", "3", "--lr", "0.02", "--seed", "1"]  # tests/test_rl_testnet.py's


def demo_rl(console: Console, run_dir: Path, base_port: int, steps: int = 10) -> bool:
    run_dir.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # "Writing model shards" is noise here
    with console.status("building a tiny random Llama (4 layers, 384 tokens)"):
        tiny = tiny_llama_dir(run_dir)
    task = seven_task(run_dir)
    console.print('the task: every prompt\'s answer is "7" (exact match, plus a small '
                  "format reward); a random model says it now and then, GRPO makes it say "
                  "it more")
    testnet = run_dir / "testnet"
    try:
        t0 = time.monotonic()
        with console.status("starting 2 sampler peers (peerd start --rollout)"):
            peers = launcher.up(2, testnet, base_port, model=str(tiny), settle_s=5.0,
                                peer_args=["--rollout"])
            _wait_samplers(peers)
        console.print(f"2 sampler peers up, {time.monotonic() - t0:.1f} s after launch; "
                      f"{peers[0].name} trains")
        result = subprocess.run(
            [sys.executable, "-m", "peerd.cli", "rl", "train", "--model", str(tiny),
             "--task", str(task), "--steps", str(steps), "--run-id", RUN_ID, *TRAIN,
             "--data-dir", peers[0].data_dir], stdin=subprocess.DEVNULL, check=False)
        run = launcher.api_request(peers[0], "GET", f"/v1/rl/runs/{RUN_ID}")
        _show(console, run, peers)
        return result.returncode == 0
    finally:
        with console.status("stopping the RL testnet"):
            launcher.down(testnet)


def _wait_samplers(peers: list[launcher.PeerInfo], timeout_s: float = 60.0) -> None:
    """Until every peer's sampler is up (its model loaded, the rollout feature on)."""
    deadline = time.monotonic() + timeout_s
    while not all("version" in _rollout(p) for p in peers):
        if time.monotonic() > deadline:
            raise SystemExit(f"the samplers did not start within {timeout_s:.0f} s: "
                             f"{[_rollout(p) for p in peers]}")
        time.sleep(0.2)


def _rollout(peer: launcher.PeerInfo) -> dict[str, Any]:
    got: dict[str, Any] = launcher.api_request(peer, "GET", "/status").get("rollout", {})
    return got


def _show(console: Console, run: dict[str, Any], peers: list[launcher.PeerInfo]) -> None:
    lines = [json.loads(line) for line in Path(run["metrics"]).read_text().splitlines()]
    table = Table(title="each step: the policy version it made, and how stale its "
                  "rollouts were (versions behind)")
    for col in ("step", "version", "reward", "staleness", "train s", "sync s"):
        table.add_column(col, justify="right")
    for m in lines:
        table.add_row(str(m["step"]), str(m["version"]), f"{m['reward']:.3f}",
                      f"{m['staleness']:.2f}", f"{m['train_s']:.2f}", f"{m['sync_s']:.3f}")
    console.print(table)
    if lines:
        half = max(1, len(lines) // 2)
        first = sum(m["reward"] for m in lines[:half]) / half
        last = sum(m["reward"] for m in lines[half:]) / max(1, len(lines) - half)
        console.print(f"mean reward: {first:.3f} in the first {half} steps, {last:.3f} in "
                      "the rest")
    stale = ", ".join(f"{k} behind: {v}" for k, v in sorted(run["staleness"].items()))
    console.print(f"rollouts trained on, by staleness: {stale} (the bound: 1)")
    versions = ", ".join(f"{p.name} at version {_rollout(p).get('version')} after "
                         f"{_rollout(p).get('requests_served')} requests" for p in peers)
    console.print(f"samplers: {versions}; refused: {run['refused'] or 'none'}")
    console.print(f"run dir {run['dir']} (metrics.jsonl, checkpoints, reward.png)")
