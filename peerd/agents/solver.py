"""Solving a task with the peer's model: a chain-of-thought prompt, generation, the
final answer pulled out of the chain.

The prompt shows worked examples of the answer format, each ending in
"Answer: <answer>", a pattern even a 135M-parameter model follows; generation stops
at the end of the first answer line. Number tasks have a calculator in the loop
(calculator.py): when the chain ends in "<arithmetic> =", generation pauses, the
result is written into the chain, and the model goes on from it; the pooled pipeline
session still holds the chain's KV, so resuming computes only the new tokens.

Confidence is measured: the chain's likelihood per token, exp(mean log p) over the
tokens the model chose (the calculator's are not its choices), times how cleanly the
answer came out: 1 for a marked answer that normalises, 0.45 for one we had to guess
from the chain, 0.35 for a marked answer that does not parse, 0 for none. The
likelihood tells right chains from wrong ones; the answer tokens' own probability
does not (once the chain is written, the answer follows from it). The figures are in
bench/README.md (Symphony).

A requester measures every chain of its task the same way with its own model
(`measure`: one pass over the chain as written, the calculator's results told apart by
`authors`), and the vote weighs chains by that measure (voting.py), not by the
confidence a worker claims.

`Solver` is what the task service needs; tests give it fakes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from peerd.agents import calculator
from peerd.agents.answers import extract, normalise
from peerd.inference.face import LanguageModel, ModelUnavailable
from peerd.inference.options import SamplingParams
from peerd.inference.request import Logprobs
from protocols.task import TaskRequest

if TYPE_CHECKING:
    from peerd.inference.slot import ModelSlot

log = logging.getLogger(__name__)

# A chain of more tokens than this many times the task's budget was not written within
# it: measured as 0 without running it (the work a requester does stays bounded).
MEASURED_TOKENS_PER_BUDGET = 2
SYSTEM = ("You solve problems step by step. Write a short chain of reasoning, then the "
          "final answer alone on the last line as 'Answer: <answer>'.")
# Worked examples per answer format, each ending in "Answer: <answer>". The number
# examples are short GSM8K *train* problems (MIT licence, (c) 2021 OpenAI;
# bench/data/gsm8k/LICENSE), never test problems, their solutions as the dataset writes
# them without the calculator marks (the last four a little shortened): a small model
# follows real worked problems better than a made-up example (bench/README.md,
# Symphony).
EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {
    "number": (
        ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
         "clips in May. How many clips did Natalia sell altogether in April and May?",
         "Natalia sold 48 / 2 = 24 clips in May.\nNatalia sold 48 + 24 = 72 clips "
         "altogether in April and May.\nAnswer: 72"),
        ("Tim has 30 less apples than Martha, and Harry has half as many apples as Tim. If "
         "Martha has 68 apples, how many apples does Harry have?",
         "Tim has 68 - 30 = 38 apples.\nHarry has 38 / 2 = 19 apples.\nAnswer: 19"),
        ("John writes 20 pages a day. How long will it take him to write 3 books that are "
         "400 pages each?",
         "He wants to write 3 * 400 = 1200 pages.\nSo it will take him 1200 / 20 = 60 days."
         "\nAnswer: 60"),
        ("James buys 5 packs of beef that are 4 pounds each. The price of beef is $5.50 per "
         "pound. How much did he pay?",
         "He bought 5 * 4 = 20 pounds of beef.\nSo he paid 20 * 5.5 = $110.\nAnswer: 110"),
        ("During one day, there are 4 boat trips through the lake. The boat can take up to "
         "12 people during one trip. How many people can the boat transport in 2 days?",
         "During 4 boat trips, the boat can take 4 * 12 = 48 people.\nDuring two days it "
         "can transport 48 * 2 = 96 people.\nAnswer: 96"),
        ("Herbert is 10 years younger than Kris. If Kris is 24 years old now, how old will "
         "Herbert be next year?",
         "Herbert is 24 - 10 = 14 years old now.\nSo Herbert will be 14 + 1 = 15 years old "
         "next year.\nAnswer: 15"),
        ("Five coaster vans are used to transport students for their field trip. Each van "
         "carries 28 students, 60 of which are boys. How many are girls?",
         "There are 5 * 28 = 140 students.\nIf 60 are boys, then 140 - 60 = 80 of them are "
         "girls.\nAnswer: 80"),
        ("Tommy wants to earn enough money to buy 8 new books. Each book costs $5. If Tommy "
         "already has $13, how much does he need to save up?",
         "The books will cost 8 * 5 = $40.\nHe needs to save up 40 - 13 = $27.\nAnswer: 27"),
    ),
    "choice": (
        ("Which animal is a mammal? (A) shark (B) dolphin (C) trout (D) octopus",
         "A shark and a trout are fish, an octopus is a mollusc. A dolphin breathes air and "
         "feeds its young milk, so it is a mammal.\nAnswer: (B)"),
    ),
    "text": (
        ("What is the capital city of Japan?",
         "Japan's government and emperor sit in Tokyo, its largest city.\nAnswer: Tokyo"),
    ),
}
# Prompt sets: which examples each set shows, in order. A task's seats ask for different
# sets (TaskRequest.prompt), so their chains differ while each decodes greedily: on
# SmolLM2 a sampled chain is right less often than a greedy one. The number sets are the
# two halves of the pool and pairs of their pairs, fixed by construction (not picked by
# their scores on any benchmark); set 0 is the original four.
PROMPT_SETS: dict[str, tuple[tuple[int, ...], ...]] = {
    "number": ((0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 4, 5), (2, 3, 6, 7), (0, 2, 4, 6)),
    "choice": ((0,),),
    "text": ((0,),),
}
_ANSWER_LINE = re.compile(r"answer\s*(?:is\s*)?[:\uff1a]\s*\S[^\n]*\n", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Solution:
    answer: str
    cot: str
    confidence: float
    tokens: int = 0
    calculations: int = 0  # results the calculator wrote into the chain


class Solver(Protocol):
    def capable(self) -> bool:
        """Can answer a task now (a model ready, the swarm covering it)."""
        ...

    async def solve(self, request: TaskRequest) -> Solution: ...

    async def measure(self, request: TaskRequest, cot: str) -> float | None:
        """The confidence our own model gives a chain someone else wrote for `request`
        (confidence_of over its likelihood under the prompt the worker was given); None
        when we cannot measure it (no model, no route)."""
        ...


def prompt_sets(answer_format: str) -> int:
    """How many different example sets a task in this format can be prompted with."""
    return len(PROMPT_SETS[answer_format])


def messages(question: str, answer_format: str, prompt: int = 0) -> list[dict[str, str]]:
    """The chat: system prompt, the worked examples of set `prompt` (modulo the sets
    there are), the question."""
    chat = [{"role": "system", "content": SYSTEM}]
    sets = PROMPT_SETS[answer_format]
    for index in sets[prompt % len(sets)]:
        example_q, example_a = EXAMPLES[answer_format][index]
        chat += [{"role": "user", "content": example_q},
                 {"role": "assistant", "content": example_a}]
    return [*chat, {"role": "user", "content": question}]


def confidence_of(cot: str, answer_format: str, likelihood: float) -> tuple[str, float]:
    """(answer as stated, confidence) for a finished chain of thought whose own tokens
    had a geometric-mean probability of `likelihood` under the model."""
    found = extract(cot, answer_format)
    parses = normalise(found.answer, answer_format) is not None
    if not found.answer:
        return "", 0.0
    if found.explicit:
        return found.answer, likelihood * (1.0 if parses else 0.35)
    return found.answer, likelihood * (0.45 if parses else 0.0)


def likelihood(logprobs: Sequence[float]) -> float:
    """exp(mean log-probability) of the tokens the model chose; 0 for none."""
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0


class ModelSolver:
    """Solves with whatever the peer can generate with: its own model end to end, or
    the swarm's pipeline behind its model's head (the model's typed face)."""

    def __init__(self, models: ModelSlot) -> None:
        self.models = models

    def _model(self) -> LanguageModel | None:
        try:
            return self.models.face()
        except ModelUnavailable:
            return None

    def capable(self) -> bool:
        model = self._model()
        return model is not None and model.can_serve()

    async def solve(self, request: TaskRequest) -> Solution:
        model = self._model()
        if model is None:
            raise RuntimeError("the model is not ready")
        ids = await model.chat_ids(messages(request.question, request.answer_format,
                                            request.prompt))
        use_calculator = request.answer_format == "number"
        generated: list[int] = []
        result: list[int] = []  # the calculator's tokens, when it paused the chain
        calculations = 0
        logprobs = Logprobs()  # the model's own tokens, across the segments

        async def on_token(token: int) -> bool:
            generated.append(token)
            text = model.decode(generated)
            # Stop once an answer line has ended: what follows is a new, invented question.
            if _ANSWER_LINE.search(text) is not None:
                return False
            if use_calculator and (value := calculated(text)) is not None:
                result.extend(model.encode(" " + value))
                return False  # paused: the result goes in, then the chain resumes
            return True

        # segment by segment: the model writes until it asks for a calculation (or
        # finishes); the result is appended and generation resumes from the pooled
        # session's cached chain, with the rest of the token budget
        for segment in range(request.max_tokens):
            params = SamplingParams(
                max_tokens=request.max_tokens - len(generated),
                temperature=request.temperature,
                top_p=0.95 if request.temperature > 0 else 1.0,
                seed=(request.seed + segment) % 2**63)
            result.clear()
            prepared = await model.prepare(ids + generated, params)
            await model.generate(prepared, on_token, reuse_prefix=True, logprobs=logprobs)
            if not result:
                break
            calculations += 1
            generated += result[:request.max_tokens - len(generated)]
            if len(generated) >= request.max_tokens:
                break
        cot = model.decode(generated).strip()
        answer, confidence = confidence_of(cot, request.answer_format, likelihood(
            [e.logprob for e in logprobs.entries]))
        return Solution(answer, cot, confidence, len(generated), calculations)

    async def measure(self, request: TaskRequest, cot: str) -> float | None:
        model = self._model()
        if model is None or not model.can_serve():
            return None
        ids = await model.chat_ids(messages(request.question, request.answer_format,
                                            request.prompt))
        parts = [(cot, False)]
        if request.answer_format == "number":
            parts = await trio.to_thread.run_sync(authors, cot)
        # each part tokenised alone, as the worker's model and calculator wrote them
        pieces = await trio.to_thread.run_sync(
            lambda: [model.encode(text) for text, _ in parts])
        chain = [t for piece in pieces for t in piece]
        if len(chain) > MEASURED_TOKENS_PER_BUDGET * request.max_tokens:
            return 0.0  # not a chain written within the task's budget
        try:
            logprobs = await model.score(ids, chain)
        except Exception as exc:  # no route now, a pipeline that failed every try
            log.info("could not measure a chain of task %s: %r", request.task_id, exc)
            return None
        calculated_by = [c for piece, (_, c) in zip(pieces, parts, strict=True) for _ in piece]
        model_chose = [lp for lp, c in zip(logprobs, calculated_by, strict=True) if not c]
        return confidence_of(cot, request.answer_format, likelihood(model_chose))[1]


def authors(cot: str) -> list[tuple[str, bool]]:
    """A number chain split into what its model wrote (False) and the results the
    calculator wrote into it (True): wherever the text up to a "=" asks for a
    calculation and the chain goes on with its result, as `ModelSolver.solve` writes
    it. With the calculator in the loop, every such result is the calculator's."""
    parts: list[tuple[str, bool]] = []
    start = 0
    for m in re.finditer("=", cot):
        end = m.end()
        if end <= start:
            continue
        value = calculated(cot[max(0, end - calculator.TAIL_CHARS):end])  # O(len) in all
        if value is not None and cot.startswith(" " + value, end):
            parts += [(cot[start:end], False), (" " + value, True)]
            start = end + 1 + len(value)
    parts.append((cot[start:], False))
    return [p for p in parts if p[0]]


def calculated(text: str) -> str | None:
    """The calculator's result when `text` has just asked for one ("48 / 2 ="), else
    None (no arithmetic before the "=", or none it can compute)."""
    expression = calculator.pending(text)
    return None if expression is None else calculator.evaluate(expression)
