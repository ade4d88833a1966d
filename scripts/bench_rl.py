#!/usr/bin/env python3
"""Echo benchmark: sync against async RL on a real testnet, one wall-clock budget each.

A testnet of --samplers sampler peers (`python -m testnet up --peers 2 --model M
--rollout`, 1 torch thread each) at --latency-ms per link, or with --stages S, that many
pipelines of S shard peers each (peer i serves stage i mod S; a stage-0 peer is a
pipeline sampler, the others its rollout shards), and a trainer: a third daemon started
without a model, bootstrapped to them (its links to the samplers go through their
latency proxies). For each mode the trainer runs `POST /v1/rl/runs` (GRPO on --task,
--update) for --budget-s seconds of training from the run's first step, then stops it
after the step in hand (`/stop`, which checkpoints). Figures per mode: samples/s
(completions trained on per second of the budget), steps, trainer idle % (waiting for
rollouts), sampler idle % (not generating), the staleness of every rollout trained on,
the trainer's weight-sync seconds a step (export + publish) and the samplers' pull
seconds, the reward a step (PNG against step and wall time), and the held-out accuracy
of the final policy (greedy, the task's held-out questions, never trained on) against
the base model's, with a paired 95% interval. Then weight sync alone on loopback (2
samplers pulling one version from the trainer, all in one process): the full model and
a LoRA update.

Prints a table and writes bench/results/rl.json (+ rl_reward.png; with --out X.json,
X_reward.png). Not a test: no thresholds. Targets (the issue): async >= 1.6x the
samples/s of sync; reward a step in async within noise of sync; held-out accuracy after
>= before + 10 points; weight sync of a LoRA update < 0.2 s and of the full 135M model
< 5 s on loopback.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peerd.machine import describe  # noqa: E402
from testnet import launcher  # noqa: E402
from testnet.state import free_base_port  # noqa: E402

console = Console()
TRAINER_THREADS = 1  # and 1 a sampler: three processes on the machine's cores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="add")
    ap.add_argument("--modes", nargs="+", default=["sync", "async"])
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--samplers", type=int, default=2, help="samplers (pipelines with "
                    "--stages)")
    ap.add_argument("--stages", type=int, default=1,
                    help="shard peers a sampler: 1 serves the whole model, 2 or more "
                         "make each sampler a pipeline of that many peers")
    ap.add_argument("--update", default="lora", choices=["full", "lora"])
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--staleness", type=int, default=1)
    ap.add_argument("--heldout", type=int, default=100, help="held-out questions (0: skip)")
    ap.add_argument("--no-sync-timing", action="store_true")
    ap.add_argument("--sync-only", action="store_true",
                    help="only the weight sync on loopback: writes rl_weight_sync.json")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/rl.json")
    args = ap.parse_args()
    if args.sync_only:
        sync_only(args)
        return

    result: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out)},
                              "machine": describe(), "modes": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    if args.heldout:
        result["heldout_before"] = heldout(args, None)
    n = args.samplers * args.stages
    base = free_base_port(n + 1)
    peers = launcher.up(n, work / "testnet", base, args.latency_ms, model=args.model,
                        stages=args.stages, torch_threads=1, peer_args=["--rollout"],
                        settle_s=5.0, model_timeout_s=600.0)
    trainer = None
    try:
        trainer = start_trainer(work / "trainer", base + 50, peers[0])
        wait_samplers(trainer, args.samplers)
        for i, mode in enumerate(args.modes):
            if i:  # a sampler takes up a new run once the last has been quiet 30 s
                time.sleep(32)
            result["modes"][mode] = run_mode(args, mode, trainer, peers)
    finally:
        if trainer is not None:
            trainer.terminate()
            trainer.wait(10)
        launcher.down(work / "testnet")
    if args.heldout:
        from peerd.rl.evaluate import compare

        before = result.pop("heldout_before")
        for figures in result["modes"].values():
            after, after_json = heldout(args, Path(figures["dir"]))
            figures["heldout_after"] = after_json
            figures["heldout_gain"] = compare(before[0], after).to_json()
        result["heldout_before"] = before[1]
    if not args.no_sync_timing:
        result["weight_sync_loopback"] = sync_timing(args, work)
    from peerd.rl.plot import plot_runs

    png = args.out.with_name(f"{args.out.stem}_reward.png")  # rl.json: rl_reward.png
    plot_runs({m: Path(f["dir"]) / "metrics.jsonl" for m, f in result["modes"].items()},
              png, title=f"GRPO on {args.task}, {args.update}, {args.latency_ms:g} ms a link")
    result["plot"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    report(result)


def start_trainer(data_dir: Path, port: int, peer0: launcher.PeerInfo) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True)
    log = (data_dir / "trainer.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "peerd.cli", "start", "--data-dir", str(data_dir),
         "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--api", f"127.0.0.1:{port + 1}",
         "--name", "trainer", "--bootstrap", dial_addr(peer0),
         "--torch-threads", str(TRAINER_THREADS)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.api = f"http://127.0.0.1:{port + 1}"  # type: ignore[attr-defined]
    proc.token = None  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        token = data_dir / "api_token"
        if token.exists():
            proc.token = token.read_text().strip()  # type: ignore[attr-defined]
            try:
                if httpx.get(proc.api + "/health", timeout=2).status_code == 200:  # type: ignore[attr-defined]
                    return proc
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    raise SystemExit(f"the trainer did not start; see {data_dir / 'trainer.log'}")


def dial_addr(peer: launcher.PeerInfo) -> str:
    addr = peer.announce
    return addr if "/p2p/" in addr else f"{addr}/p2p/{peer.peer_id}"


def api(proc: Any, method: str, path: str, body: Any = None) -> Any:
    r = httpx.request(method, proc.api + path, json=body, timeout=30,
                      headers={"Authorization": f"Bearer {proc.token}"})
    r.raise_for_status()
    return r.json()


def wait_samplers(trainer: Any, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = api(trainer, "GET", "/ledger")
        if sum("rl.rollout" in (r.get("features") or ()) for r in rows) >= n:
            return
        time.sleep(0.5)
    raise SystemExit("the trainer does not see the samplers in its ledger")


def sampler_status(peers: list[launcher.PeerInfo]) -> list[dict[str, Any]]:
    out = []
    for p in peers:
        status = launcher.api_request(p, "GET", "/status")
        out.append({"rollout": status.get("rollout", {}),
                    "weights": status.get("weights", {})})
    return out


def run_mode(args: argparse.Namespace, mode: str, trainer: Any,
             peers: list[launcher.PeerInfo]) -> dict[str, Any]:
    run_id = f"bench-{mode}"
    body = {"model": args.model, "task": args.task, "mode": mode, "samplers": args.samplers,
            "group": args.group, "batch": args.batch, "steps": 1_000_000,
            "staleness": args.staleness, "update": args.update, "lora_rank": args.lora_rank,
            "lr": args.lr, "max_tokens": args.max_tokens, "seed": args.seed,
            "run_id": run_id, "checkpoint_every": 1_000_000}
    console.print(f"[bold]{mode}[/]: {args.budget_s:.0f} s of training")
    api(trainer, "POST", "/v1/rl/runs", body)
    path = f"/v1/rl/runs/{run_id}"
    while (run := api(trainer, "GET", path))["state"] == "starting":
        time.sleep(0.5)
    before = sampler_status(peers)
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.budget_s:
        time.sleep(1.0)
        run = api(trainer, "GET", path)
        if run["state"] in ("failed", "done", "stopped"):
            break
        console.print(f"  {time.monotonic() - t0:5.0f} s: step {run['step']}, reward "
                      f"{run['last'].get('reward', 0):.3f}", end="\r")
    wall = time.monotonic() - t0
    after = sampler_status(peers)
    api(trainer, "POST", f"{path}/stop")
    while (run := api(trainer, "GET", path))["state"] not in ("failed", "done", "stopped"):
        time.sleep(0.5)
    console.print()
    if run["state"] == "failed":
        raise SystemExit(f"{mode} run failed: {run['error']}")
    lines = [json.loads(x) for x in Path(run["dir"], "metrics.jsonl").read_text().splitlines()]
    in_budget = [x for x in lines if x["elapsed_s"] <= run["elapsed_s"]]
    samples = len(in_budget) * args.batch * args.group
    sampler_idle = [(a["rollout"]["idle_s"] - b["rollout"]["idle_s"]) / wall  # a
                    for a, b in zip(after, before, strict=True)  # pipeline's shards: none
                    if "idle_s" in a["rollout"]]
    pulls = [a["weights"]["pulled"].get("seconds", 0.0)
             - b["weights"]["pulled"].get("seconds", 0.0)
             for a, b in zip(after, before, strict=True)]
    return {"run": run, "dir": run["dir"], "wall_s": wall, "steps": len(lines),
            "samples_per_s": samples / wall,
            "trainer_idle_pct": 100 * run["trainer_idle_s"] / max(run["elapsed_s"], 1e-9),
            "sampler_idle_pct": [100 * x for x in sampler_idle],
            "staleness": run["staleness"],
            "sync_s_per_step": run["sync_s"] / max(1, len(lines)),
            "sampler_pull_s": pulls,
            "rewards": [x["reward"] for x in lines],
            "reward_first_half": mean([x["reward"] for x in lines[:len(lines) // 2]]),
            "reward_second_half": mean([x["reward"] for x in lines[len(lines) // 2:]])}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def heldout(args: argparse.Namespace, run_dir: Path | None) -> Any:
    import torch

    from peerd.rl.checkpoint import latest_checkpoint
    from peerd.rl.evaluate import evaluate, load_policy
    from peerd.rl.tasks import load_task

    torch.set_num_threads(os.cpu_count() or 1)
    checkpoint = latest_checkpoint(run_dir) if run_dir is not None else None
    policy = load_policy(args.model, checkpoint)
    task = load_task(args.task, seed=args.seed)
    with console.status(f"held-out: {args.heldout} questions, "
                        f"{'base' if checkpoint is None else checkpoint.name}"):
        got = evaluate(policy.model, policy.tokenizer, task, args.heldout, args.max_tokens)
    console.print(f"held-out accuracy ({'base' if checkpoint is None else checkpoint}): "
                  f"{got.accuracy:.3f}")
    return (got, got.to_json())


def sync_only(args: argparse.Namespace) -> None:
    out = args.out if args.out != ROOT / "bench/results/rl.json" else \
        ROOT / "bench/results/rl_weight_sync.json"
    result = {"settings": vars(args) | {"out": str(out)},
              "machine": describe() | {"loadavg_before": os.getloadavg()},
              "weight_sync_loopback": sync_timing(args, Path(tempfile.mkdtemp(
                  prefix="bench-rl-sync-")))}
    result["machine"]["loadavg_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for kind, t in result["weight_sync_loopback"].items():
        console.print(f"weight sync {kind}: {t['mb']:.1f} MB, publish {t['publish_s']:.2f} s, "
                      f"pull {max(t['pull_s']):.2f} s (slowest of 2), "
                      f"{t['over_http_mb']:.0f} MB over HTTP")


def sync_timing(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import trio

    from peerd.rl.learner import Learner
    from peerd.rl.sync_timing import time_weight_sync

    out: dict[str, Any] = {}
    for kind in ("full", "lora"):
        learner = Learner.load(args.model, update=kind, lora_rank=args.lora_rank)
        tensors, scale = learner.export()
        got = trio.run(functools.partial(time_weight_sync, tensors, work / f"sync-{kind}",
                                         samplers=2, kind=kind, lora_scale=scale))
        out[kind] = {"mb": got.nbytes / 2**20, "chunks": got.chunks,
                     "publish_s": got.publish_s, "pull_s": list(got.pull_s),
                     "trainer_uploaded_mb": got.trainer_uploaded / 2**20,
                     "samplers_uploaded_mb": got.samplers_uploaded / 2**20,
                     "over_http_mb": got.http_bytes / 2**20}
        console.print(f"weight sync ({kind}, loopback): {out[kind]['mb']:.1f} MB, publish "
                      f"{got.publish_s:.2f} s, pulls {', '.join(f'{s:.2f}' for s in got.pull_s)} s"
                      f", {out[kind]['over_http_mb']:.1f} MB over HTTP")
    return out


def report(result: dict[str, Any]) -> None:
    table = Table(title="Echo: sync against async, one budget each")
    for col in ("mode", "steps", "samples/s", "trainer idle %", "sampler idle %",
                "staleness (rollouts)", "sync s/step", "reward 1st / 2nd half",
                "held-out after"):
        table.add_column(col)
    for mode, f in result["modes"].items():
        held = f.get("heldout_after", {})
        table.add_row(mode, str(f["steps"]), f"{f['samples_per_s']:.2f}",
                      f"{f['trainer_idle_pct']:.0f}",
                      " / ".join(f"{x:.0f}" for x in f["sampler_idle_pct"]),
                      ", ".join(f"{k}: {v}" for k, v in f["staleness"].items()),
                      f"{f['sync_s_per_step']:.2f}",
                      f"{f['reward_first_half']:.3f} / {f['reward_second_half']:.3f}",
                      f"{held.get('accuracy', float('nan')):.3f}" if held else "-")
    console.print(table)
    modes = result["modes"]
    if "sync" in modes and "async" in modes:
        console.print(f"async / sync samples/s: "
                      f"{modes['async']['samples_per_s'] / modes['sync']['samples_per_s']:.2f}x")
    if "heldout_before" in result:
        console.print(f"held-out before: {result['heldout_before']['accuracy']:.3f}")
        for mode, f in modes.items():
            g = f.get("heldout_gain", {})
            if g:
                console.print(f"  {mode}: {json.dumps(g)}")
    for kind, t in result.get("weight_sync_loopback", {}).items():
        console.print(f"weight sync {kind}: {t['mb']:.1f} MB, publish {t['publish_s']:.2f} s, "
                      f"pull {max(t['pull_s']):.2f} s (slowest of 2)")


if __name__ == "__main__":
    main()
