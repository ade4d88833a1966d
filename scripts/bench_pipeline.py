"""Pipeline benchmark: SmolLM2 greedy decoding, one process vs a pipeline of peers.

Measures tokens/s for 5 fixed chat prompts x 64 new tokens (greedy) on
- the reference: single-process transformers `generate` in this process (float32);
- pipelines of 1, 2 and 3 real peerd processes on loopback (stages = peers; the
  request enters at peer0, which serves the first stage);
- the 3-peer pipeline with 10 and 20 ms added to every peer-to-peer link.

Every row uses the same torch threads (--torch-threads, default 1), the reference
included, so rows differ only in where the layers run. Tokens/s is completion tokens
over client-side wall time per request (prefill included, as in `generate`); model
loading and one short warm-up request per testnet are not counted. Derived:
- per-hop overhead = (pipeline ms/token - reference ms/token) / hops, hops = stages + 1
  (the chain returns to the entry);
- with T ms per link, measured ms/token vs reference ms/token + hops x T. The entry
  serves stage 0 itself, so its first hop is loopback inside the entry and only
  hops - 1 links cross the latency proxy: `links_with_latency` in the JSON.
- peak RSS per peer: sampled every 0.2 s with psutil from launch to shutdown;
- setup ms/request: the entry's wall time per request outside decoding steps (mostly
  opening the pipeline session), from the "peerd" object of each response.

Prints a table and writes bench/results/pipeline.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerd.machine import cores as machine_cores  # noqa: E402
from peerd.machine import describe as machine  # noqa: E402
from testnet import launcher  # noqa: E402
from testnet.state import RunState, TestnetError  # noqa: E402

# Piped output (a log, a report) gets the whole table rather than 80 columns of it.
console = Console() if sys.stdout.isatty() else Console(width=170)

MODEL = "smollm2"
PROMPTS = [  # asked as chat messages; each invites a long answer so 64 tokens come
    "Write a long story about a robot who learns to paint.",
    "Explain in detail how a steam engine works.",
    "Describe the water cycle step by step, with examples.",
    "List ten ideas for a birthday party and explain each one.",
    "Write a letter to a friend about a summer holiday by the sea.",
]
RSS_SAMPLE_S = 0.2
REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Config:
    label: str
    peers: int
    latency_ms: float = 0.0

    @property
    def hops(self) -> int:
        return self.peers + 1  # stages = peers; the last stage returns to the entry


@dataclass
class Run:
    """One row: per-request tokens and seconds, texts, and what the peers reported."""

    label: str
    peers: int = 0
    latency_ms: float = 0.0
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    peerd: list[dict[str, Any]] = field(default_factory=list)  # the "peerd" object per request
    rss_peak_mib: dict[str, float] = field(default_factory=dict)  # peer -> MiB
    # 1-minute load average when the requests started and ended: other work on the
    # machine shows here (and in compute ms/step), and makes a row not comparable.
    load: list[float] = field(default_factory=list)
    links_with_latency: int = 0
    up_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.seconds)

    @property
    def ms_per_token(self) -> float:
        return 1e3 / self.tokens_per_s


def reference(prompts: list[str], max_tokens: int, threads: int) -> Run:
    """transformers `generate`, greedy, on the whole model in this process."""
    import torch

    from peerd.inference.model.source import load_tokenizer, reference_model, resolve
    from peerd.inference.runtime import eos_ids

    torch.set_num_threads(threads)
    source = resolve(MODEL)
    tokenizer = load_tokenizer(source)
    model = reference_model(source)
    eos = sorted(eos_ids(tokenizer, model.config))
    run = Run("transformers, 1 process")

    def generate(prompt: str, n: int) -> tuple[int, float, str]:
        messages = [{"role": "user", "content": prompt}]
        enc: Any = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(  # type: ignore[operator]
                **enc, do_sample=False, max_new_tokens=n, eos_token_id=eos)
        took = time.perf_counter() - t0
        new = out[0, enc["input_ids"].shape[1] :].tolist()  # [completion tokens]
        return len(new), took, str(tokenizer.decode(new, skip_special_tokens=True))

    generate(prompts[0], 4)  # warm-up: first-call allocations are not decoding speed
    run.load.append(os.getloadavg()[0])
    for prompt in prompts:
        n, took, text = generate(prompt, max_tokens)
        run.tokens.append(n)
        run.seconds.append(took)
        run.texts.append(text)
    run.load.append(os.getloadavg()[0])
    # The process's own peak (ru_maxrss is in KiB on Linux): it is the whole reference.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run.rss_peak_mib = {"bench": round(peak, 1)}
    return run


class RssSampler:
    """Peak RSS of every peer of the run in `run_dir`, sampled from the state file's
    pids in a thread, so loading (before `up` returns) is covered too."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._since = time.time()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            try:
                state = RunState.load(self.run_dir)
            except TestnetError:
                continue
            if state is None or state.started_at < self._since:  # an earlier run's file
                continue
            for rec in state.peers:
                proc = rec.proc.handle()
                if proc is None:
                    continue
                try:
                    mib = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.peak[rec.name] = max(self.peak.get(rec.name, 0.0), mib)


def pipeline(cfg: Config, prompts: list[str], max_tokens: int, threads: int, base_port: int,
             run_dir: Path) -> Run:
    run = Run(cfg.label, cfg.peers, cfg.latency_ms)
    with RssSampler(run_dir) as rss:
        t0 = time.monotonic()
        peers = launcher.up(cfg.peers, run_dir, base_port, cfg.latency_ms, model=MODEL,
                            stages=cfg.peers, torch_threads=threads, settle_s=0.0)
        run.up_s = time.monotonic() - t0
        try:
            entry = peers[0]
            chat(entry, prompts[0], 4)  # warm-up: first request's allocations, connections
            run.load.append(os.getloadavg()[0])
            for prompt in prompts:
                t0 = time.perf_counter()
                reply = chat(entry, prompt, max_tokens)
                run.seconds.append(time.perf_counter() - t0)
                run.tokens.append(reply["usage"]["completion_tokens"])
                run.texts.append(reply["choices"][0]["message"]["content"])
                run.peerd.append(reply["peerd"])
            run.load.append(os.getloadavg()[0])
            run.links_with_latency = links_with_latency(entry.peer_id, run.peerd[-1]["route"])
        finally:
            launcher.down(run_dir)
    run.rss_peak_mib = {name: round(mib, 1) for name, mib in sorted(rss.peak.items())}
    return run


def chat(peer: launcher.PeerInfo, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    reply: dict[str, Any] = launcher.api_request(
        peer, "POST", "/v1/chat/completions", json=body, timeout_s=REQUEST_TIMEOUT_S
    )
    return reply


def links_with_latency(entry: str, route: list[dict[str, Any]]) -> int:
    """Links of one step's chain (entry -> hops -> entry) between different peers:
    those cross the latency proxy; a peer talking to itself does not."""
    chain = [entry, *(hop["peer_id"] for hop in route), entry]
    return sum(a != b for a, b in itertools.pairwise(chain))


def row(run: Run, ref: Run, hops: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": run.label, "peers": run.peers, "latency_ms": run.latency_ms,
        "tokens": sum(run.tokens), "seconds": round(sum(run.seconds), 3),
        "tokens_per_s": round(run.tokens_per_s, 2), "ms_per_token": round(run.ms_per_token, 2),
        "same_text_as_reference": sum(a == b for a, b in zip(run.texts, ref.texts, strict=True)),
        "requests": len(run.texts), "rss_peak_mib": run.rss_peak_mib,
        "load_average_1m": [round(x, 2) for x in run.load],
    }  # fmt: skip
    if hops is None:
        return out
    out["hops"] = hops
    out["per_hop_overhead_ms"] = round((run.ms_per_token - ref.ms_per_token) / hops, 2)
    out["links_with_latency"] = run.links_with_latency
    out["up_s"] = round(run.up_s, 1)
    steps = sum(p["steps"] for p in run.peerd)
    out["server"] = {  # what the entry peer measured, per decoding step
        "pipeline_ms_per_step": round(sum(p["pipeline_ms"] for p in run.peerd) / steps, 2),
        "compute_ms_per_step": round(sum(p["compute_ms"] for p in run.peerd) / steps, 2),
        "head_ms_per_step": round(sum(p["head_ms"] for p in run.peerd) / steps, 2),
        # Per request, the entry's wall time outside decoding steps: mostly opening the
        # pipeline session (chained OPENs, the last hop dialling back).
        "outside_steps_ms_per_request": round(statistics.mean(
            p["wall_ms"] - p["pipeline_ms"] - p["head_ms"] for p in run.peerd), 1),
        "reroutes": sum(p["reroutes"] for p in run.peerd),
    }
    if run.latency_ms > 0:
        out["predicted_ms_per_token"] = round(ref.ms_per_token + hops * run.latency_ms, 2)
        out["predicted_ms_per_token_proxied_links"] = round(
            ref.ms_per_token + run.links_with_latency * run.latency_ms, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 prompts x 16 tokens")
    ap.add_argument("--prompts", type=int, default=None, help="how many of the 5 prompts")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per prompt [64]")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads of the reference and of every peer")
    ap.add_argument("--latencies", type=float, nargs="*", default=[10.0, 20.0],
                    help="ms per link for the 3-peer pipeline")
    ap.add_argument("--base-port", type=int, default=18100)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "bench_pipeline")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = ap.parse_args()
    n_prompts = args.prompts or (2 if args.quick else len(PROMPTS))
    max_tokens = args.tokens or (16 if args.quick else 64)
    prompts = PROMPTS[:n_prompts]
    threads = args.torch_threads
    configs = [Config("1 peer", 1), Config("2 peers", 2), Config("3 peers", 3)] + [
        Config(f"3 peers, {t:g} ms/link", 3, t) for t in args.latencies]
    load_before = os.getloadavg()

    with console.status(f"reference: transformers generate, {n_prompts} x {max_tokens} tokens"):
        ref = reference(prompts, max_tokens, threads)
    gc.collect()  # the reference model: its memory goes before the peers load theirs
    console.print(f"reference: {ref.tokens_per_s:.2f} tokens/s")
    runs: list[tuple[Config, Run]] = []
    for cfg in configs:
        with console.status(f"{cfg.label}: loading, warming up, {n_prompts} requests"):
            try:
                run = pipeline(cfg, prompts, max_tokens, threads, args.base_port, args.run_dir)
            except TestnetError as exc:
                console.print(f"[red]{cfg.label}: {exc}[/]")
                return 1
        runs.append((cfg, run))
        console.print(f"{cfg.label}: {run.tokens_per_s:.2f} tokens/s (up in {run.up_s:.0f} s)")

    rows = [row(ref, ref, None)] + [row(run, ref, cfg.hops) for cfg, run in runs]
    print_table(rows, n_prompts, max_tokens, threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "pipeline",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "model": MODEL, "prompts": prompts, "max_tokens": max_tokens,
        "torch_threads": threads, "greedy": True,
        "results": rows,
    }, indent=2) + "\n")  # fmt: skip
    console.print(f"wrote {args.out}")
    return 0


def print_table(rows: list[dict[str, Any]], n_prompts: int, max_tokens: int,
                threads: int) -> None:
    table = Table(title=f"SmolLM2-135M greedy, {n_prompts} prompts x {max_tokens} tokens, "
                  f"{threads} torch thread(s) per process, {machine_cores()} cores")
    for title in ("config", "hops", "tokens/s", "ms/token", "per-hop ms",
                  "predicted ms/token (hops*T / links*T)",
                  "in-pipeline ms/step (compute)", "setup ms/request", "peak RSS MiB/peer",
                  "same text", "load 1m"):
        table.add_column(title, justify="right")
    for r in rows:
        server = r.get("server")
        table.add_row(
            r["config"],
            str(r.get("hops", "-")),
            f"{r['tokens_per_s']:.2f}",
            f"{r['ms_per_token']:.1f}",
            f"{r['per_hop_overhead_ms']:.1f}" if "hops" in r else "-",
            f"{r['predicted_ms_per_token']:.1f} / {r['predicted_ms_per_token_proxied_links']:.1f}"
            if "predicted_ms_per_token" in r else "-",
            f"{server['pipeline_ms_per_step']:.1f} ({server['compute_ms_per_step']:.1f})"
            if server else "-",
            f"{server['outside_steps_ms_per_request']:.0f}" if server else "-",
            " / ".join(f"{v:.0f}" for v in r["rss_peak_mib"].values()) or "-",
            f"{r['same_text_as_reference']}/{r['requests']}",
            " -> ".join(f"{x:.1f}" for x in r["load_average_1m"]),
        )
    console.print(table)
    medians = [r["per_hop_overhead_ms"] for r in rows if r.get("latency_ms") == 0
               and "per_hop_overhead_ms" in r]  # fmt: skip
    if medians:
        console.print(f"per-hop overhead on loopback, median over 1-3 peers: "
                      f"{statistics.median(medians):.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
