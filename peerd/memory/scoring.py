"""Scorers of a model's output against a reference answer, by name (an SCEC names its
scorer). Each returns a score in [0, 1]: 1.0 right, 0.0 wrong.

- number: the output's final number equals the answer's final number in value ("85.0",
  "1,234" and "The answer is 85." count; rl/tasks.py reads the numbers).
- exact: the output equals the answer, surrounding whitespace stripped.
- contains: the answer, stripped, appears in the output; a blank answer is contained
  nowhere (else it would reward every output).
"""

from __future__ import annotations

from collections.abc import Callable

from peerd.rl.tasks import final_number

Scorer = Callable[[str, str], float]  # (output, answer) -> score


def number(output: str, answer: str) -> float:
    expected = final_number(answer)
    return float(expected is not None and final_number(output) == expected)


def exact(output: str, answer: str) -> float:
    return float(output.strip() == answer.strip())


def contains(output: str, answer: str) -> float:
    wanted = answer.strip()
    return float(bool(wanted) and wanted in output)


SCORERS: dict[str, Scorer] = {"number": number, "exact": exact, "contains": contains}


def scorer(name: str) -> Scorer:
    """The scorer called `name`; ValueError, listing the known ones, when there is none."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r:.40}: use one of "
                         f"{', '.join(SCORERS)}") from None


def score(name: str, output: str, answer: str) -> float:
    return scorer(name)(output, answer)
