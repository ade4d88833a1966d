"""What a scored run offers the memory, and the abstraction prompt's parsing."""

from __future__ import annotations

from peerd.memory.distill import Candidate, abstraction_prompt, distill, parse_insight
from protocols.memory import MAX_TEXT_CHARS


def test_a_pass_gives_the_models_own_worked_example() -> None:
    got = distill("What is 2 + 3?", " 2 + 3 = 5 ", "5", 1.0)
    assert got == [Candidate("Question: What is 2 + 3?\nAnswer: 2 + 3 = 5", "example")]


def test_a_fail_gives_a_correction_from_the_reference() -> None:
    got = distill("What is 2 + 3?", "6", "5", 0.1)
    assert got == [Candidate("Question: What is 2 + 3?\nCorrect answer: 5", "correction")]


def test_nothing_without_an_output_or_a_reference() -> None:
    assert distill("q", "  ", "5", 1.0) == []
    assert distill("q", "6", "", 0.0) == []


def test_an_oversized_candidate_is_not_offered() -> None:
    assert distill("q" * MAX_TEXT_CHARS, "5", "5", 1.0) == []


def test_the_insight_is_the_first_line_without_its_label() -> None:
    assert parse_insight("\n Tip: add the ones first.\nmore") == "Tip: add the ones first."
    assert parse_insight("Carry the ten.") == "Tip: Carry the ten."
    assert parse_insight("   \n") is None
    assert parse_insight("Tip: " + "x" * 1000) is None
    assert "arithmetic" in abstraction_prompt("Question: 1+1\nAnswer: 2", "arithmetic")
