#!/usr/bin/env python3
"""Echo's sampler check, measured: how far honest samplers' log-probs are from the
trainer's, and how often lies of several sizes are caught.

One process: the model as a sampler holds it (peerd's ShardBlock + Head, the whole
model, in float32 and in bfloat16) generates completions of held-out `add` questions
(G per question, temperature 1), and the trainer's learner (transformers, float32)
scores the same tokens. The trainer's rule (peerd/rl/trainer.py): a rollout whose mean
absolute log-prob difference a token exceeds the tolerance (RunSpec.verify_tolerance)
is a lie; the tolerance is the run's `verify_tolerance` for a sampler computing in
float32 and `verify_tolerance_half` for one in bfloat16 (it says which in its ledger
entry). Lies: the honest log-probs scaled by 1 - e (tokens claimed likelier than
they were, which inflates the importance ratio), noise N(0, s) on each token (clipped
to <= 0), and the tokens of another completion with their own log-probs (a swapped
completion: the claim is honest for other tokens). Detection rate = lies caught / lies.

Prints a table and writes bench/results/rl_verify.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peerd.inference.model.head import Head  # noqa: E402
from peerd.inference.model.shard import ShardBlock  # noqa: E402
from peerd.inference.model.source import load_config, load_tokenizer, resolve  # noqa: E402
from peerd.inference.runtime import eos_ids  # noqa: E402
from peerd.machine import describe  # noqa: E402
from peerd.rl.learner import Learner, TokenBatch  # noqa: E402
from peerd.rl.policy import LocalPolicy  # noqa: E402
from peerd.rl.run import RunSpec  # noqa: E402
from peerd.rl.sampler import chat_prompt_ids  # noqa: E402
from peerd.rl.tasks import load_task  # noqa: E402

console = Console()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/rl_verify.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = RunSpec(model=args.model)
    tolerances = {"float32": spec.verify_tolerance, "bfloat16": spec.verify_tolerance_half}
    source = resolve(args.model)
    tokenizer = load_tokenizer(source)
    config = load_config(source)
    stops = eos_ids(tokenizer, config)
    problems = load_task("add", seed=0).heldout(args.questions)
    prompts = [chat_prompt_ids(tokenizer, p.prompt) for p in problems]
    learner = Learner.load(args.model)
    result: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out)},
                              "machine": describe(), "tolerance": tolerances, "honest": {},
                              "lies": {}}
    rollouts: dict[str, list[tuple[list[int], list[int], list[float]]]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        policy = LocalPolicy(ShardBlock(source, 0, int(config.num_hidden_layers), dtype=dtype),
                             Head(source, dtype=dtype))
        made = trio.run(lambda p=policy: p.generate_many(
            prompts, n=args.group, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens,
            seed=1, eos_ids=stops))
        rows = [(prompts[i], list(c.ids), list(c.logprobs))
                for i, group in enumerate(made.groups) for c in group]
        rollouts[name] = rows
        devs = deviations(learner, rows)
        result["honest"][name] = summary(devs, tolerances[name])
        console.print(f"honest {name}: {result['honest'][name]}")
    honest = rollouts["float32"]
    ours = scores(learner, honest)
    lies: dict[str, list[list[float]]] = {}
    for e in (0.01, 0.05, 0.1, 0.25, 0.5):
        lies[f"scaled by {1 - e:g}"] = [[lp * (1 - e) for lp in claim] for _, _, claim in honest]
    g = torch.Generator().manual_seed(0)
    for s in (0.01, 0.05, 0.1, 0.5):
        lies[f"noise s={s:g}"] = [
            [min(0.0, lp + float(torch.randn((), generator=g)) * s) for lp in claim]
            for _, _, claim in honest]
    for label, claims in lies.items():  # a float32 sampler's lies; caught at either
        # tolerance (a liar may say it computes in bfloat16 to get the wider one)
        devs = [mean_abs(o, c) for o, c in zip(ours, claims, strict=True)]
        result["lies"][label] = summary(devs, *tolerances.values())
    # a swapped completion: another rollout's tokens and their honest log-probs, under
    # this prompt (the tokens differ, so the claim is off wherever the contexts differ)
    other = [honest[(i + args.group) % len(honest)] for i in range(len(honest))]
    swapped = [(p, o[1], o[2]) for (p, _, _), o in zip(honest, other, strict=True)
               if o[0] != p]
    result["lies"]["another question's completion"] = summary(
        deviations(learner, swapped), *tolerances.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    report(result)


def scores(learner: Learner, rows: list[tuple[list[int], list[int], list[float]]]
           ) -> list[list[float]]:
    batch = TokenBatch.from_sequences([r[0] for r in rows], [r[1] for r in rows],
                                      [r[2] for r in rows], [0.0] * len(rows))
    lp = learner.score(batch, temperature=1.0)
    return [lp[i, :len(r[1])].tolist() for i, r in enumerate(rows)]


def deviations(learner: Learner, rows: list[tuple[list[int], list[int], list[float]]]
               ) -> list[float]:
    return [mean_abs(o, r[2]) for o, r in zip(scores(learner, rows), rows, strict=True)]


def mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def summary(devs: list[float], *tolerances: float) -> dict[str, Any]:
    """The spread of deviations, and the share above each tolerance given."""
    devs = sorted(devs)
    return {"n": len(devs), "median": statistics.median(devs),
            "p95": devs[min(len(devs) - 1, int(0.95 * len(devs)))], "max": devs[-1],
            "flagged": [sum(d > t for d in devs) / len(devs) for t in tolerances]}


def report(result: dict[str, Any]) -> None:
    t = result["tolerance"]
    table = Table(title="mean |claimed - trainer's| log-prob a token; flagged: above the "
                  f"tolerance (float32 samplers {t['float32']:g}, bfloat16 "
                  f"{t['bfloat16']:g})")
    for col in ("rollouts", "n", "median", "p95", "max", "flagged"):
        table.add_column(col)
    for group in ("honest", "lies"):
        for label, s in result[group].items():
            flagged = " / ".join(f"{100 * f:.0f}%" for f in s["flagged"])
            table.add_row(f"{group}: {label}", str(s["n"]), f"{s['median']:.2e}",
                          f"{s['p95']:.2e}", f"{s['max']:.2e}", flagged)
    console.print(table)


if __name__ == "__main__":
    main()
