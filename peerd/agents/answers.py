"""Final answers: pulled out of a chain of thought, then normalised for the vote.

Pure text functions, no model. Two chains that reach "$1,200.00" and "1200" reached
the same answer and must vote together, so every answer is normalised by its format
before votes are summed:

- number: the last number in the answer, without currency, thousands separators or
  trailing zeros ("$1,200.00" -> "1200", "-0.50" -> "-0.5", "3/4" -> "0.75");
- choice: one letter A-J ("(b)", "B)", "Option B" -> "B");
- text: lower case, punctuation and leading articles dropped, spaces collapsed.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MAX_NORMALISED_CHARS = 200

# "Answer: 42", "Final answer: 42", "The answer is 42", "#### 42" (GSM8K's own marker).
# These read other peers' text: no two runs of spaces a pattern may split between them
# (`\s*(?:is)?\s*` backtracked over every split of a long run of spaces: seconds on
# the event loop for one chain of thought).
_MARKED = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is\s*)?[:\uff1a=]\s*(?P<a>[^\n]*)"
    r"|the\s+(?:final\s+)?answer\s+is\s*(?P<b>[^\n]*)"
    r"|^[ \t]*####\s*(?P<c>[^\n]*)",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBER = re.compile(
    r"(?P<neg>-)?\$?\s?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+))?"
)
_CHOICE_LEADING = re.compile(r"^\s*(?:the\s+)?(?:(?:option|choice|answer)\s*)?(?:[:\-]\s*)?"
                             r"\(?(?P<l>[A-Ja-j])\)?(?![A-Za-z0-9])")
_CHOICE_PAREN = re.compile(r"\((?P<l>[A-Ja-j])\)")
_CHOICE_BARE = re.compile(r"(?<![A-Za-z])(?P<l>[A-J])(?![A-Za-z])")
_ARTICLES = {"a", "an", "the"}


@dataclass(frozen=True, slots=True)
class Extracted:
    answer: str  # as the chain stated it ("" when nothing was found)
    explicit: bool  # the chain marked it ("Answer: ..."), rather than us guessing


def extract(cot: str, answer_format: str) -> Extracted:
    """The final answer a chain of thought states: the first marked one (small models
    that go on after their answer invent new questions with answers of their own),
    else a guess by format (the last number, the last "(X)", the last line)."""
    marked = [next(g for g in m.groups() if g is not None).strip()
              for m in _MARKED.finditer(cot)]
    marked = [m for m in marked if m]
    if marked:
        return Extracted(marked[0][:MAX_NORMALISED_CHARS * 2], True)
    if answer_format == "number":
        numbers = list(_NUMBER.finditer(cot))
        return Extracted(numbers[-1].group(0).strip() if numbers else "", False)
    if answer_format == "choice":
        letters = list(_CHOICE_PAREN.finditer(cot))
        return Extracted(f"({letters[-1].group('l')})" if letters else "", False)
    lines = [line.strip() for line in cot.splitlines() if line.strip()]
    return Extracted(lines[-1][:MAX_NORMALISED_CHARS * 2] if lines else "", False)


def normalise(answer: str, answer_format: str) -> str | None:
    """The canonical form votes are counted under; None when there is no answer."""
    if answer_format == "number":
        return normalise_number(answer)
    if answer_format == "choice":
        return normalise_choice(answer)
    return normalise_text(answer)


def normalise_number(answer: str) -> str | None:
    matches = list(_NUMBER.finditer(answer))
    if not matches:
        return None
    m = matches[-1]
    try:
        value = Decimal(m.group("num").replace(",", ""))
        if m.group("den") is not None:
            den = Decimal(m.group("den"))
            if den == 0:
                return None
            value = (value / den).quantize(Decimal("0.000001"))
    except InvalidOperation:
        return None
    if m.group("neg"):
        value = -value
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    return text if len(text) <= MAX_NORMALISED_CHARS else None


def normalise_choice(answer: str) -> str | None:
    for pattern in (_CHOICE_PAREN, _CHOICE_LEADING):
        m = pattern.search(answer)
        if m:
            return m.group("l").upper()
    bare = list(_CHOICE_BARE.finditer(answer))
    return bare[-1].group("l") if bare else None


def normalise_text(answer: str) -> str | None:
    text = unicodedata.normalize("NFKC", answer).casefold()
    words = re.sub(r"[^\w]+", " ", text).split()
    while words and words[0] in _ARTICLES:
        words = words[1:]
    out = " ".join(words)[:MAX_NORMALISED_CHARS]
    return out or None
