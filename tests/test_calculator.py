"""The chain-of-thought calculator (peerd.agents.calculator): what it takes as a request
for arithmetic, what it computes, and everything it refuses to touch."""

from __future__ import annotations

import pytest

from peerd.agents.calculator import canonical, evaluate, pending
from peerd.agents.solver import calculated


@pytest.mark.parametrize(("text", "expression"), [
    ("Natalia sold 48 / 2 =", "48 / 2"),
    ("So he paid 20 * 5.5 = ", "20 * 5.5"),
    ("He has (9 + 3) - 1 =", "(9 + 3) - 1"),
    ("In 2020, 3 * 4 =", "3 * 4"),  # the year belongs to the sentence, not the sum
    ("He had 12. 3 * 4 =", "3 * 4"),
    ("Each box 3 x 4 =", "3 x 4"),  # "x" of "box" is not an operator
    ("That costs $1,200 + $300 =", "1,200 + $300"),
    ("x =", None),
    ("Tom has 3 =", None),  # a number, no arithmetic
    ("3 * 4 = 12", None),  # already answered
    ("3 * 4", None),  # not asked yet
    ("He is 3 - years old =", None),
    ("", None),
])
def test_pending_finds_the_expression_a_chain_just_asked_for(
        text: str, expression: str | None) -> None:
    assert pending(text) == expression


@pytest.mark.parametrize(("expression", "value"), [
    ("48 / 2", "24"),
    ("20 * 5.5", "110"),
    ("(9 + 3) - 1", "11"),
    ("3 x 4", "12"),
    ("6 \u00d7 7 \u00f7 2", "21"),  # the multiplication and division signs
    ("$1,200 + $300", "1500"),
    ("1 / 3", "0.333333"),
    ("3 / 4", "0.75"),
    ("2 - 5", "-3"),
    ("0.1 + 0.2", "0.3"),  # exact, not 0.30000000000000004
    ("-(2 + 3) * 2", "-10"),
])
def test_evaluate_computes_plain_arithmetic_exactly(expression: str, value: str) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression", [
    "5 / 0",
    "2 ** 10",  # powers can be made huge
    "7 // 2",
    "__import__('os')",
    "a + 1",
    "1e308 * 10",  # not a plain decimal: refused by the bound
    "999999999999 * 999999999999",  # past 10^12
    "1 + " * 9 + "1",  # more than 8 operators
    "1, 2",
    "(1 + 2",
    "x" * 200,
])
def test_evaluate_refuses_what_is_not_small_plain_arithmetic(expression: str) -> None:
    assert evaluate(expression) is None


def test_canonical_numbers_match_the_votes_normal_form() -> None:
    from fractions import Fraction

    from peerd.agents.answers import normalise_number

    for value in (Fraction(24), Fraction(3, 4), Fraction(-7, 2), Fraction(1, 3), Fraction(0)):
        text = canonical(value)
        assert normalise_number(text) == text


def test_calculated_pairs_the_two() -> None:
    assert calculated("Tim has 68 - 30 =") == "38"
    assert calculated("Tim has 68 - 30 = 38 apples.") is None
    assert calculated("Harry has 38 / 0 =") is None
