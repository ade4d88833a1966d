#!/usr/bin/env python3
"""Audits of a route's compute, measured: how far honest versions of a hop's layers
are apart, how far what a route served while decoding is from its replay, and how
often lies of several sizes are caught (peerd/inference/swarm/audit.py).

One process, SmolLM2-135M split as a 3-hop route ([0, 10), [10, 20), [20, 30)), the
embeddings of a chat request (the mixed DSD prompt set and GSM8K test questions, a
chat message each, in the model's chat template) passed through it in float32 and
in bfloat16 and float16 (every hop and the wire). The audit compares the route's final hidden
states with a version of one hop's layers computed by someone else, and with what
the route returned while the request decoded; its rule is the largest relative L2
distance at a position (`deviation`) within `tolerance`.

Honest versions of a hop: its layers computed in one go on 2 threads (as the route),
against in chunks of 8 positions on 1 thread (a peer whose compute turns cut the
prefill, another thread count: other summation orders), for each of the three hops;
in 16 bits also against another kernel: the same 16-bit weights, computed in float32
within a layer and rounded to 16 bits at each layer's end (as GPU kernels that
accumulate in float32 and fuse operations round less often than PyTorch's CPU path,
which rounds after every operation).
Honest serving: the request decoded greedily (--answer tokens) as a pipeline runs it,
the prompt in one pass and then one position a pass, each hop on its own KV cache;
what the route returned at every position against a replay of prompt and answer in
one pass.
Lies, by the middle hop: its output scaled by 1 + e; plus noise of s times its
spread; one of its 10 layers skipped; its input passed on uncomputed; on every pass
(caught by the versions), and on the passes after the first only (the answer's
positions: caught by what the route served). Caught = the route's output deviates
from the honest one by more than the tolerance.

Prints a table and writes bench/results/audit.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from peerd.inference.model.head import Head  # noqa: E402
from peerd.inference.model.shard import ShardBlock  # noqa: E402
from peerd.inference.model.source import load_config, load_tokenizer, resolve  # noqa: E402
from peerd.inference.swarm.audit import deviation, tolerance  # noqa: E402
from peerd.machine import describe  # noqa: E402
from peerd.rl.sampler import chat_prompt_ids  # noqa: E402

console = Console()
SPANS = [(0, 10), (10, 20), (20, 30)]
LIAR = 1  # the middle hop

Span = Callable[[torch.Tensor], torch.Tensor]


def run_span(block: ShardBlock, x: torch.Tensor, span: tuple[int, int], chunk: int = 0,
             threads: int = 2, skip: int | None = None) -> torch.Tensor:
    """Layers `span` on x [1, T, H] (`chunk` positions at a time; without layer `skip`)."""
    torch.set_num_threads(threads)
    cache = block.new_cache()
    cuts = [0, x.shape[1]] if not chunk else [*range(0, x.shape[1], chunk), x.shape[1]]
    out = []
    with torch.inference_mode():
        for a, b in itertools.pairwise(cuts):
            step = block.begin(x[:, a:b], a, cache, span=span)
            if skip is None:
                block.run(step, range(*span))
            else:
                block.run(step, range(span[0], skip))
                block.run(step, range(skip + 1, span[1]))
            out.append(step.x)
    torch.set_num_threads(2)
    return torch.cat(out, 1)


def through(block: ShardBlock, x: torch.Tensor, versions: dict[int, Span]) -> torch.Tensor:
    """The route's output, hop k computed by versions[k] where given."""
    for k, span in enumerate(SPANS):
        x = versions[k](x) if k in versions else run_span(block, x, span)
        x = x.to(block.dtype)  # the wire carries the route's dtype
    return x


def kernel_span(block32: ShardBlock, dtype: torch.dtype, x: torch.Tensor,
                span: tuple[int, int]) -> torch.Tensor:
    """Layers `span` on x as another kernel computes them: `block32` (float32, its
    weights rounded to `dtype`) within each layer, the output rounded to `dtype` at
    each layer's end."""
    cache = block32.new_cache()
    with torch.inference_mode():
        step = block32.begin(x.float(), 0, cache, span=span)
        for i in range(*span):
            block32.run(step, range(i, i + 1))
            step.x = step.x.to(dtype).float()
    return step.x.to(dtype)


def decode(block: ShardBlock, head: Head, x: torch.Tensor, n: int
           ) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding of n tokens after the prompt x [1, T, H], as a pipeline runs it:
    the prompt in one pass, then a position a pass, each hop on its own cache. The
    answer, and what the route returned at each position it ran [1, T + n - 1, H]."""
    caches = [block.new_cache() for _ in SPANS]
    answer: list[int] = []
    served = []
    pos = 0
    with torch.inference_mode():
        while True:
            h = x
            for k, span in enumerate(SPANS):
                step = block.begin(h, pos, caches[k], span=span)
                block.run(step, range(*span))
                h = step.x.to(block.dtype)
            served.append(h)
            pos += x.shape[1]
            answer.append(int(head.logits(h[:, -1:])[0, -1].argmax()))
            if len(answer) == n:
                return answer, torch.cat(served, 1)
            x = head.embed(torch.tensor([answer[-1:]])).to(block.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--mixed", type=int, default=40, help="prompts of the mixed set (first N)")
    ap.add_argument("--gsm8k", type=int, default=2, help="GSM8K test questions (the first N)")
    ap.add_argument("--answer", type=int, default=64, help="tokens decoded a request")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/audit.json")
    args = ap.parse_args()
    source = resolve(args.model)
    tokenizer = load_tokenizer(source)
    config = load_config(source)
    assert int(config.num_hidden_layers) == SPANS[-1][1]
    texts = [json.loads(line)["text"] for line in
             (ROOT / "bench/data/mixed/prompts.jsonl").read_text().splitlines()[:args.mixed]]
    texts += [json.loads(line)["question"] for line in
              (ROOT / "bench/data/gsm8k/test.jsonl").read_text().splitlines()[:args.gsm8k]]
    prompts = [chat_prompt_ids(tokenizer, t) for t in texts]
    head = Head(source)
    lies: dict[str, Callable[[ShardBlock, torch.Tensor], torch.Tensor]] = {
        "scaled by 1.001": lambda b, x: run_span(b, x, SPANS[LIAR]) * 1.001,
        "scaled by 1.01": lambda b, x: run_span(b, x, SPANS[LIAR]) * 1.01,
        "scaled by 1.1": lambda b, x: run_span(b, x, SPANS[LIAR]) * 1.1,
        "noise 0.01 of its spread": lambda b, x: _noisy(run_span(b, x, SPANS[LIAR]), 0.01),
        "noise 0.1 of its spread": lambda b, x: _noisy(run_span(b, x, SPANS[LIAR]), 0.1),
        "one layer skipped": lambda b, x: run_span(b, x, SPANS[LIAR], skip=SPANS[LIAR][1] - 1),
        "input passed on": lambda b, x: x,
    }
    result: dict[str, Any] = {"settings": {"model": args.model, "prompts": len(prompts),
                                           "answer_tokens": args.answer, "spans": SPANS},
                              "machine": describe(), "honest": {}, "kernel": {}, "served": {},
                              "lies": {}, "lies_after_the_first_pass": {}}
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        tol = tolerance([name])
        block = ShardBlock(source, 0, SPANS[-1][1], dtype=dtype)
        block32 = None
        if dtype != torch.float32:  # another kernel's: the same 16-bit weights
            block32 = ShardBlock(source, 0, SPANS[-1][1], dtype=torch.float32)
            with torch.no_grad():
                for param in block32.parameters():
                    param.copy_(param.to(dtype).float())
        honest: list[float] = []
        kernel: list[float] = []
        served: list[float] = []
        caught: dict[str, list[float]] = {lie: [] for lie in lies}
        later: dict[str, list[float]] = {lie: [] for lie in lies}
        for ids in track(prompts, description=f"{name}: requests", console=console):
            with torch.inference_mode():
                x = head.embed(torch.tensor([ids])).to(dtype)
            base = through(block, x, {})
            for k, span in enumerate(SPANS):
                other = through(block, x, {k: functools.partial(
                    run_span, block, span=span, chunk=8, threads=1)})
                honest.append(deviation(base, other))
                if block32 is not None:
                    kernel.append(deviation(base, through(block, x, {k: functools.partial(
                        kernel_span, block32, dtype, span=span)})))
            for lie, make in lies.items():
                caught[lie].append(deviation(through(block, x, {LIAR: functools.partial(
                    make, block)}), base))
            # what the route served while decoding, against a replay of the request
            answer, returned = decode(block, head, x, args.answer)
            with torch.inference_mode():
                x = head.embed(torch.tensor([ids + answer[:-1]])).to(dtype)
            replay = through(block, x, {})
            served.append(deviation(returned, replay))
            # a liar on the passes after the first only, the answer's positions (the
            # route's output as one prefill computes it, the liar's output replaced
            # from the prompt's end on), against the honest replay
            for lie, make in lies.items():
                later[lie].append(deviation(through(block, x, {LIAR: functools.partial(
                    after_prompt, block, make, len(ids))}), replay))
        result["honest"][name] = spread(honest, tol)
        result["served"][name] = spread(served, tol)
        if kernel:
            result["kernel"][name] = spread(kernel, tol)
        result["lies"][name] = caught_of(caught, tol)
        result["lies_after_the_first_pass"][name] = caught_of(later, tol)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    show(result)


def after_prompt(block: ShardBlock, make: Callable[[ShardBlock, torch.Tensor], torch.Tensor],
                 cut: int, x: torch.Tensor) -> torch.Tensor:
    """The middle hop honest up to position `cut`, `make`'s lie from there on."""
    out = run_span(block, x, SPANS[LIAR])
    return torch.cat([out[:, :cut], make(block, x)[:, cut:]], 1)


def spread(devs: list[float], tol: float) -> dict[str, Any]:
    devs = sorted(devs)
    return {"tolerance": tol, "versions": len(devs), "median": statistics.median(devs),
            "p99": devs[int(0.99 * (len(devs) - 1))], "max": devs[-1],
            "over_tolerance": sum(d > tol for d in devs)}


def caught_of(devs: dict[str, list[float]], tol: float) -> dict[str, Any]:
    return {lie: {"caught": sum(d > tol for d in ds), "of": len(ds),
                  "median_deviation": statistics.median(ds)} for lie, ds in devs.items()}


def _noisy(h: torch.Tensor, s: float) -> torch.Tensor:
    return h + s * h.float().std().to(h.dtype) * torch.randn_like(h)


def show(result: dict[str, Any]) -> None:
    for key, title in (("honest", "honest versions of a hop's layers (chunked, another "
                        "thread count)"),
                       ("kernel", "honest 16-bit versions: another kernel (float32 within "
                        "a layer, rounded at its end)"),
                       ("served", "honest serving: what the route returned while decoding, "
                        "against a replay")):
        t = Table(title=title)
        for col in ("dtype", "tolerance", "requests" if key == "served" else "versions",
                    "median", "p99", "max", "over tolerance"):
            t.add_column(col)
        for name, h in result[key].items():
            t.add_row(name, f"{h['tolerance']:g}", str(h["versions"]), f"{h['median']:.2e}",
                      f"{h['p99']:.2e}", f"{h['max']:.2e}", str(h["over_tolerance"]))
        console.print(t)
    for key, title in (("lies", "lies by the middle hop on every pass"),
                       ("lies_after_the_first_pass", "lies by the middle hop after a "
                        "session's first pass (caught by what it served)")):
        t = Table(title=f"{title}: caught / requests (median deviation)")
        t.add_column("lie")
        for name in result[key]:
            t.add_column(name)
        for lie in next(iter(result[key].values())):
            t.add_row(lie, *(f"{r[lie]['caught']}/{r[lie]['of']} "
                             f"({r[lie]['median_deviation']:.2e})"
                             for r in result[key].values()))
        console.print(t)


if __name__ == "__main__":
    main()
