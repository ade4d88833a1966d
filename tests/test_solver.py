"""A worker's solver on SmolLM2 with the calculator in the loop: the chain pauses at
"<arithmetic> =", the exact result goes in, and generation resumes from the pooled
pipeline session's cached chain. Held against one process doing the same with plain
transformers: the same tokens (a divergence only at a near-tie of the target's top
two logits, reported), and every calculation in the chain right."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.agents.answers import normalise_number
from peerd.agents.calculator import evaluate
from peerd.agents.solver import (
    _ANSWER_LINE,
    ModelSolver,
    authors,
    calculated,
    confidence_of,
    likelihood,
    messages,
)
from peerd.inference.model.source import load_tokenizer, reference_model, resolve
from peerd.inference.slot import ModelOptions, ModelSlot
from protocols.task import TaskRequest
from tests.harness import gossip, swarm
from tests.test_inference_model import needs_smollm2

QUESTION = ("A baker makes 14 loaves of bread a day for 6 days and then sells 9 of them. "
            "How many loaves does he have left?")
MAX_TOKENS = 96
NEAR_TIE = 1e-4
# "<arithmetic> = <number>": a calculation as the chain states it
_EQUATION = re.compile(r"((?:\d[\d.,]*\s*[-+*/x]\s*)+\d[\d.,]*)\s*=\s*\$?(-?\d[\d,]*(?:\.\d+)?)")


@functools.cache
def reference_smollm2() -> tuple[Any, Any]:
    """SmolLM2 as one process loads it (seconds from the GGUF: loaded once), its
    tokenizer."""
    source = resolve("smollm2")
    return reference_model(source), load_tokenizer(source)


def reference_prompt(question: str) -> tuple[Any, Any, list[int]]:
    """SmolLM2 as one process loads it, its tokenizer, and the task prompt's ids."""
    model, tok = reference_smollm2()
    prompt = tok.apply_chat_template(messages(question, "number"),
                                     add_generation_prompt=True, tokenize=False)
    return model, tok, list(tok(prompt, add_special_tokens=False)["input_ids"])


def reference_chain(question: str) -> tuple[list[int], list[float], int, list[float]]:
    """What one process writes with the calculator: tokens, the top-two logit gap at
    each token the model chose, how many results the calculator wrote in, and the
    log-probability of each token the model chose."""
    model, tok, ids = reference_prompt(question)
    out: list[int] = []
    gaps: list[float] = []
    chosen: list[float] = []
    calculations = 0
    step = torch.tensor([ids])
    past = None
    with torch.inference_mode():
        while len(out) < MAX_TOKENS:
            result = model(step, past_key_values=past, use_cache=True)
            past = result.past_key_values
            top = result.logits[0, -1].float().topk(2)
            token = int(top.indices[0])
            if token == tok.eos_token_id:
                break
            out.append(token)
            gaps.append(float(top.values[0] - top.values[1]))
            chosen.append(float(torch.log_softmax(result.logits[0, -1].float(), -1)[token]))
            text = tok.decode(out, skip_special_tokens=True)
            if _ANSWER_LINE.search(text):
                break
            value = calculated(text)
            forced = [] if value is None else list(
                tok(" " + value, add_special_tokens=False)["input_ids"])
            forced = forced[:MAX_TOKENS - len(out)]
            calculations += bool(forced)
            out += forced
            gaps += [float("inf")] * len(forced)  # written in, not chosen
            step = torch.tensor([[token, *forced]])
    return out, gaps, calculations, chosen


def reference_measure(question: str, cot: str) -> float:
    """One process's confidence in `cot` as written, under the prompt for `question`."""
    model, tok, ids = reference_prompt(question)
    chain: list[int] = []
    mine: list[bool] = []  # the model's own tokens, not the calculator's
    for text, by_calculator in authors(cot):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        chain += piece
        mine += [not by_calculator] * len(piece)
    with torch.inference_mode():
        logits = model(torch.tensor([ids + chain])).logits[0, len(ids) - 1:-1].float()
    chosen = torch.log_softmax(logits, -1).gather(1, torch.tensor(chain)[:, None])[:, 0]
    return confidence_of(cot, "number", likelihood(chosen[torch.tensor(mine)].tolist()))[1]


@needs_smollm2
async def test_the_calculator_writes_every_result_into_the_chain(tmp_path: Path) -> None:
    want, gaps, want_calculations, chosen = reference_chain(QUESTION)
    async with swarm(1, tmp_path) as (node,):
        host = ModelSlot(node, gossip(node), ModelOptions("smollm2", torch_threads=1))
        await node.start(host)
        await host.settled.wait()
        assert host.runtime is not None, host.error
        solver = ModelSolver(host)
        request = TaskRequest(task_id="t1", question=QUESTION, answer_format="number",
                              temperature=0.0, seed=0, max_tokens=MAX_TOKENS, deadline_s=120.0)
        solution = await solver.solve(request)
        # every segment after a calculation resumed on the one pooled session
        assert len(host.runtime.server.sessions) == 1
        tok = host.runtime.tokenizer
        # As a requester: the chain measured as written (the calculator's tokens too),
        # against one process scoring the same text; a chain far past the budget is 0.
        measured = await solver.measure(request, solution.cot)
        assert measured == pytest.approx(reference_measure(QUESTION, solution.cot), rel=1e-4)
        # the chain as its worker measured it: the same tokens, the calculator's left out
        assert measured == pytest.approx(solution.confidence, rel=1e-4)
        assert await solver.measure(request, "1 + 1 = 2. " * 2 * MAX_TOKENS) == 0.0
        assert await solver.measure(request, "") == 0.0

    print(f"\nchain ({solution.calculations} calculations): {solution.cot!r}")
    assert solution.calculations >= 1
    equations = _EQUATION.findall(solution.cot)
    assert equations, "the chain states no calculation"
    for expression, value in equations:
        assert evaluate(expression) == normalise_number(value), (expression, value)

    if solution.cot != tok.decode(want, skip_special_tokens=True).strip():
        # the first reference token whose text the chain does not continue with
        parted = next(i for i in range(len(want)) if not solution.cot.startswith(
            tok.decode(want[:i + 1], skip_special_tokens=True).strip()))
        print(f"parted from the reference at token {parted}, top-two gap {gaps[parted]:.2e}")
        assert gaps[parted] < NEAR_TIE, "the chain parted from one process away from a tie"
    else:
        assert solution.calculations == want_calculations
        # confidence: the likelihood of the model's own tokens (the answer is marked)
        assert solution.confidence == pytest.approx(likelihood(chosen), rel=1e-4)
    assert 0.0 < solution.confidence <= 1.0


def test_answers_are_read_from_long_runs_of_whitespace_at_once() -> None:
    """The patterns read other peers' text. `\\s*(?:is)?\\s*` and the three `\\s*` of the
    leading-choice pattern backtracked over every split of a run of spaces that is not
    followed by what they look for: a thousand spaces took seconds (cubic), on the event
    loop. A regex holds the GIL, so the check runs in a process of its own, given 30 s
    (the old patterns took minutes on these)."""
    import json
    import subprocess
    import sys

    code = """if True:
        import json
        from peerd.agents.answers import extract, normalise_choice
        got = extract("answer" + " " * 60_000 + "so 9", "number")
        print(json.dumps([normalise_choice(" " * 2500 + "1 or B"),
                          extract("answer" + " " * 20_000 + "is: 7", "number").answer,
                          got.answer, got.explicit,
                          extract("\\n" * 20_000 + "#### 5", "number").answer,
                          normalise_choice("the answer : (c)")]))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    assert json.loads(out.stdout) == ["B", "7", "9", False, "5", "C"]
