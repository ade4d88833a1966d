"""The in-process peer the memory benches run on (scripts/bench_memory.py `accuracy`,
`growth` and `transfer`), the learning phase and the held-out evaluation they share.

A peer is one real peerd node on loopback (its ledger's gossip, as every daemon runs),
a ModelSlot and, where a bench asks, the Memory service. Held-out questions are answered
greedily with what a recall gives them (`answer`): through replay.run_task, never
Memory.solve or observe, so evaluating records nothing in any memory and moves no
weight or baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from peerd.config import Config
from peerd.identity import ensure_data_dir, load_or_create_key
from peerd.inference.face import LanguageModel
from peerd.inference.options import SamplingParams
from peerd.inference.slot import ModelOptions, ModelSlot
from peerd.ledger.gossip import LedgerGossip
from peerd.memory.controller import ControllerSettings, rank
from peerd.memory.learning import LearnJob, LearnSpec, learn
from peerd.memory.replay import run_task
from peerd.memory.scec import Task
from peerd.memory.service import SEARCH_WIDTH, Memory
from peerd.memory.store import MemoryStore
from peerd.node import Node, open_node
from peerd.rl.evaluate import newcombe_paired, wilson
from peerd.rl.tasks import Problem

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# max_tokens a task's answers get by default: an `add` answer is a number (SmolLM2
# often writes a sentence first); a GSM8K answer is a few steps of reasoning.
MAX_TOKENS = {"add": 16, "gsm8k": 192}

# The item texts a held-out question is given (none: []).
Recall = Callable[[str], Awaitable[list[str]]]


@contextlib.asynccontextmanager
async def open_peer(data_dir: Path) -> AsyncIterator[tuple[Node, LedgerGossip]]:
    """A peerd node with its identity in `data_dir`, listening on loopback, connected to
    nobody; its ledger's gossip started."""
    ensure_data_dir(data_dir)
    config = Config(data_dir=data_dir, listen=(LOOPBACK,), name=data_dir.name)
    async with open_node(config, load_or_create_key(data_dir)) as node:
        ledger = LedgerGossip(node)
        await node.start(ledger)
        yield node, ledger


async def load_model(node: Node, ledger: LedgerGossip, spec: str, *, dtype: str = "auto",
                     device: str = "auto", threads: int = 2) -> ModelSlot:
    """The node's ModelSlot, ready; SystemExit saying why when the model does not load."""
    slot = ModelSlot(node, ledger, ModelOptions(spec, device=device, dtype=dtype,
                                                torch_threads=threads))
    began = time.perf_counter()
    await node.start(slot)
    await slot.settled.wait()
    if slot.state != "ready":
        raise SystemExit(f"model {spec}: {slot.error}")
    info = slot.to_json()
    print(f"model {info['model_id']} ({info['dtype']}, {info['device']}) loaded in "
          f"{time.perf_counter() - began:.0f} s")
    return slot


@contextlib.asynccontextmanager
async def progress(describe: Callable[[], str], every_s: float = 30.0
                   ) -> AsyncIterator[None]:
    """A status line, describe() and the seconds so far, every `every_s` while the block
    runs (the long phases take most of an hour on this machine)."""
    began = time.perf_counter()

    async def tick() -> None:
        while True:
            await trio.sleep(every_s)
            print(f"{describe()} ({time.perf_counter() - began:.0f} s)", flush=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        yield
        nursery.cancel_scope.cancel()


async def learn_reporting(memory: Memory, spec: LearnSpec, domain: str
                          ) -> tuple[LearnJob, float]:
    """The service's own learning loop (learning.learn, what `peerd memory learn` runs)
    over `spec`, with status lines; the finished job and its seconds."""
    job = LearnJob(spec, domain)
    began = time.perf_counter()
    async with progress(lambda: f"learning {spec.task}: {job.runs}/{spec.n} runs, "
                                f"{job.admitted} admitted, refused {job.refused}"):
        await learn(memory, job)
    return job, time.perf_counter() - began


async def recall_texts(store: MemoryStore, text: str, k: int, domain: str,
                       settings: ControllerSettings) -> list[str]:
    """Memory.recall on a bare store: the controller's ranking (similarity x weight)."""
    vector = (await store.embed([text]))[0]
    hits = await store.search(vector, k * SEARCH_WIDTH, domain)
    return [r.record.item.text for r in rank(hits, time.time(), settings, k)]


@dataclass
class Answered:
    """One arm's greedy answers to the same held-out questions, in order."""

    arm: str
    correct: list[bool] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    given: list[int] = field(default_factory=list)  # items in each prompt
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reused: int = 0  # answers not decoded again (Answers)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def right(self) -> int:
        return sum(self.correct)

    def summary(self) -> dict[str, Any]:
        lo, hi = wilson(self.right, self.n)
        n = max(self.n, 1)
        return {"arm": self.arm, "n": self.n, "correct": self.right,
                "accuracy": self.right / n, "ci95": [lo, hi],
                "mean_prompt_tokens": sum(self.prompt_tokens) / n,
                "mean_items_given": sum(self.given) / n,
                "seconds_per_question": self.seconds / n, "reused": self.reused}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "per_question": [
            {"correct": c, "prompt_tokens": t, "items": g, "output": o[:300]}
            for c, t, g, o in zip(self.correct, self.prompt_tokens, self.given,
                                  self.outputs, strict=True)]}


@dataclass
class Answers:
    """What `answer` keeps between arms and between runs: greedy answers by their
    prompt (the question and the item texts given), so a question given the same texts
    in another arm (an arm with nothing to give it is the no-memory prompt) is not
    answered twice, on this machine the same answer; and, with a `journal`, every
    answer as a JSONL line, so a run killed part way resumes where it stopped, and
    another benchmark asking the same questions of the same model with as many tokens
    takes its answers (transfer's no-memory arm: accuracy's on GSM8K)."""

    journal: Path | None = None
    by_prompt: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_arm: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.journal is None or not self.journal.exists():
            return
        for line in self.journal.read_text().splitlines():
            try:
                row = json.loads(line)
                self._keep(row)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill: answered again

    @staticmethod
    def key(model: str, max_tokens: int, question: str, given: Sequence[str]) -> str:
        return json.dumps([model, max_tokens, question, list(given)])

    def _keep(self, row: dict[str, Any]) -> None:
        self.by_prompt[self.key(row["model"], row["max_tokens"], row["question"],
                                row["given"])] = row
        self.by_arm[(row["arm"], row["index"])] = row

    def add(self, row: dict[str, Any]) -> None:
        self._keep(row)
        if self.journal is not None:
            with self.journal.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())


async def answer(face: LanguageModel, arm: str, problems: Sequence[Problem], domain: str,
                 recall: Recall, max_tokens: int, answers: Answers | None = None
                 ) -> Answered:
    """Each problem answered greedily with the texts `recall` gives it, scored by the
    number scorer (right: its final number is the answer's). With `answers`: what this
    arm answered before (a resumed run) is taken from it, and a prompt already answered
    (by any arm) is not decoded again; `reused` counts those. seconds: the decoding
    time of every answer, reused ones at what they took when they were decoded."""
    out = Answered(arm)
    answers = answers if answers is not None else Answers()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for index, p in enumerate(problems):
        row = answers.by_arm.get((arm, index))
        if row is None or (row["model"], row["max_tokens"], row["question"]) != (
                face.model_id, max_tokens, p.prompt):
            given = await recall(p.prompt)
            row = answers.by_prompt.get(Answers.key(face.model_id, max_tokens, p.prompt,
                                                    given))
            if row is None:
                o = await run_task(face, Task(p.prompt, p.answer, "number", domain), given,
                                   params)
                row = {"correct": o.score >= 1.0, "prompt_tokens": o.prompt_tokens,
                       "output": o.output, "latency_s": o.latency_s}
            else:
                out.reused += 1
            row = {**row, "arm": arm, "index": index, "model": face.model_id,
                   "max_tokens": max_tokens, "question": p.prompt, "given": list(given)}
            answers.add(row)
        else:
            out.reused += 1
        out.correct.append(bool(row["correct"]))
        out.prompt_tokens.append(int(row["prompt_tokens"]))
        out.given.append(len(row["given"]))
        out.outputs.append(str(row["output"]))
        out.seconds += float(row["latency_s"])
    return out


def paired(first: Answered, second: Answered) -> dict[str, Any]:
    """first - second in accuracy on the same questions, with Newcombe's paired 95%
    interval, and how many questions each got that the other missed."""
    pairs = list(zip(first.correct, second.correct, strict=True))
    both = sum(a and b for a, b in pairs)
    only_first = sum(a and not b for a, b in pairs)
    only_second = sum(b and not a for a, b in pairs)
    lo, hi = newcombe_paired(both, only_first, only_second, len(pairs) - both - only_first
                             - only_second)
    return {"first": first.arm, "second": second.arm,
            "difference": (first.right - second.right) / max(len(pairs), 1),
            "ci95": [lo, hi], "only_first": only_first, "only_second": only_second}


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile of `values` (the nearest rank below), None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_cell(a: Answered) -> str:
    s = a.summary()
    lo, hi = s["ci95"]
    return f"{pct(s['accuracy'])}% [{pct(lo)}, {pct(hi)}]"


def difference_cell(d: dict[str, Any]) -> str:
    lo, hi = d["ci95"]
    return (f"{100 * d['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"({d['only_first']} gained, {d['only_second']} lost)")
