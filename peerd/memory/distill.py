"""Candidate items distilled from a scored run, and the prompt that abstracts a proven
item into a domain-general insight.

A run the scorer passed gives a worked example: the question and the model's own
answer. A run it failed, when the reference is known, gives a correction: the question
and the right answer. Neither is trusted for being distilled: each is only a candidate,
admitted when a replay shows it helps (admission.py). Pure: no model, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocols.memory import MAX_TEXT_CHARS

PASSED = 1.0  # a score at least this is a pass (number scorers give 1.0 for right)
MAX_INSIGHT_CHARS = 400
_INSIGHT = re.compile(r"^\s*(?:tip|insight|rule)\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Candidate:
    text: str
    kind: str  # "example" or "correction" here; "insight" from abstraction


def distill(prompt: str, output: str, answer: str, score: float) -> list[Candidate]:
    """What a scored run (its task text, the model's output, the reference answer and
    the score) offers to the memory: at most one candidate."""
    question = prompt.strip()
    if score >= PASSED and output.strip():
        return _fit(f"Question: {question}\nAnswer: {output.strip()}", "example")
    if score < PASSED and answer.strip():
        return _fit(f"Question: {question}\nCorrect answer: {answer.strip()}", "correction")
    return []


def _fit(text: str, kind: str) -> list[Candidate]:
    return [Candidate(text, kind)] if len(text) <= MAX_TEXT_CHARS else []


def abstraction_prompt(item_text: str, domain: str) -> str:
    """The user message asking the model to turn a proven item into a general tip."""
    return (f"Here is a note that helped answer a {domain} question:\n\n{item_text}\n\n"
            "Write one short general tip, useful for other kinds of questions too, that "
            "this note teaches. Start with 'Tip:' and do not mention the numbers in it.")


def parse_insight(output: str) -> str | None:
    """The tip in the model's answer: its first non-empty line, without a 'Tip:' label;
    None when there is nothing usable (empty, or too long to be one tip)."""
    for line in output.splitlines():
        text = _INSIGHT.sub("", line).strip()
        if text:
            return f"Tip: {text}" if len(text) <= MAX_INSIGHT_CHARS else None
    return None
