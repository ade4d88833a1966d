"""A calculator for chains of thought: the tool a worker hands its model's arithmetic to.

Small models often set a step up right and then get its arithmetic wrong
("9 + 3 - 1 = 5"). GSM8K's own solutions were written with a calculator in the loop
(Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): whenever the
model's text ends in an arithmetic expression and "=", the calculator computes it and
the result is written into the chain for the model, which then goes on from a right
number instead of a guessed one. This module is that tool, pure and without a model:

- `pending(text)`: the expression the text has just asked for ("... 48 / 2 =" ->
  "48 / 2"), or None;
- `evaluate(expression)`: its value as a canonical number string ("24", "0.75"),
  or None when it is not plain arithmetic we can compute exactly and cheaply.

Only numbers, + - * / (also x and the multiplication and division signs), parentheses
and unary minus are accepted; the expression is parsed, never executed; operands and
results are bounded; division is exact (Fraction) and the result rounded to 6
decimals. Anything else is None, and the model's own continuation stands.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from fractions import Fraction

MAX_EXPRESSION_CHARS = 80
MAX_MAGNITUDE = Fraction(10) ** 12  # operands and every intermediate result
MAX_OPERATORS = 8
TAIL_CHARS = MAX_EXPRESSION_CHARS + 8  # what `pending` reads of a text: its end

# The text just before a trailing "=": digits, operators, parentheses, spaces, "$" and
# thousands commas; it must hold two numbers joined by an operator.
_OPERATOR = r"+\-*/x\u00d7\u00f7"  # x, the multiplication sign and the division sign too
_TAIL = re.compile(rf"([0-9.,$\s(){_OPERATOR}]{{3,{MAX_EXPRESSION_CHARS}}})=\s*$")
_BINARY = re.compile(rf"\d\s*[{_OPERATOR}]\s*\(?\s*\$?\s*\d")


def pending(text: str) -> str | None:
    """The arithmetic expression `text` ends by asking for ("... = "), or None. Only
    its last TAIL_CHARS characters matter."""
    m = _TAIL.search(text[-TAIL_CHARS:])
    if m is None:
        return None
    # a sentence or clause may end just before it ("In 2020, 3 * 4 =", "So 12. 3 * 4 =")
    expression = re.split(r"[.,]\s", m.group(1))[-1]
    # the match may start inside a word ("box 3 * 4": "x 3 * 4") or a sentence
    # ("In May, 48 / 2"): keep from the first digit or "(" on
    start = re.search(r"[\d(]", expression)
    if start is None:
        return None
    expression = expression[start.start():].strip()
    if _BINARY.search(expression) is None:
        return None
    return expression


def evaluate(expression: str) -> str | None:
    """The value of a plain arithmetic expression as a canonical number, else None."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    text = (expression.replace("$", "").replace("\u00d7", "*").replace("\u00f7", "/")
            .replace("x", "*"))
    # thousands separators: "1,200" -> "1200"; any other comma is not arithmetic
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    if "," in text or "**" in text or "//" in text:
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    operators = sum(isinstance(n, (ast.BinOp, ast.UnaryOp)) for n in ast.walk(tree))
    if operators > MAX_OPERATORS:
        return None
    try:
        value = _value(tree.body)
    except (_NotArithmetic, ZeroDivisionError):
        return None
    return canonical(value)


def canonical(value: Fraction) -> str:
    """12 -> "12", 3/4 -> "0.75", 1/3 -> "0.333333" (6 decimals, no trailing zeros)."""
    if value.denominator == 1:
        return str(value.numerator)
    rounded = round(value, 6)
    text = f"{float(rounded):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class _NotArithmetic(Exception):
    pass


_OPS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
}


def _value(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = Fraction(str(node.value))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _value(node.operand)
        value = -value if isinstance(node.op, ast.USub) else value
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        value = _OPS[type(node.op)](_value(node.left), _value(node.right))
    else:
        raise _NotArithmetic
    if abs(value) > MAX_MAGNITUDE:
        raise _NotArithmetic
    return value
