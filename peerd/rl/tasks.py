"""Tasks: the problems a run trains on, the held-out ones it is judged on, the reward.

Every task has a number answer and one reward rule (number_reward). The training
stream is seeded and indexed (problem(i)), so a resumed run asks what it would have
asked; the held-out questions do not depend on the seed, so evaluations before and
after training, and across runs, ask the same, and the training stream never
produces one of them:
- add: held out when a hash of the question text falls in HELDOUT_FRACTION.
- gsm8k: the training split trains, the test split is held out.
- FILE.jsonl: rows held out by the same hash of their prompt as add.
Torch-free: the CLI imports it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

CORRECT_REWARD = 1.0
FORMAT_REWARD = 0.1
MAX_REWARD = CORRECT_REWARD + FORMAT_REWARD
# A question is held out when the first byte of the SHA-256 of its text is below this:
# 26/256, about 10% of the questions.
HELDOUT_BYTE = 26
# add lists its held-out questions when its range has at most this many questions.
ENUMERATE_LIMIT = 250_000
GSM8K_DIR = Path(__file__).resolve().parents[2] / "bench" / "data" / "gsm8k"
GSM8K_INSTRUCTION = ("Think step by step, then write the final answer as a number "
                     "alone on the last line.")
SPECS = "'add', 'gsm8k', or a path to a .jsonl file of {\"prompt\", \"answer\"} rows"

# A number: optional minus (never the hyphen of "10-3": it must not follow a digit),
# digits with thousands separated by commas (exactly three digits a group) or plain
# digits, an optional decimal part. Never part of a longer run of digits.
_NUMBER = r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d]|,\d{3})"
_NUMBER_RE = re.compile(_NUMBER)
_BARE_RE = re.compile(rf"\s*{_NUMBER}\.?\s*")
_MINUSES = str.maketrans({"\u2212": "-", "\u2013": "-"})


@dataclass(frozen=True, slots=True)
class Problem:
    prompt: str  # the user message; the sampler applies the chat template
    answer: str  # a number, as text


def parse_number(text: str) -> Decimal | None:
    """The value of a number as _NUMBER writes it (commas allowed), else None."""
    try:
        value = Decimal(text.translate(_MINUSES).strip().replace(",", ""))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def final_number(text: str) -> Decimal | None:
    """The last number in the text, else None."""
    found = _NUMBER_RE.findall(text.translate(_MINUSES))
    return parse_number(found[-1]) if found else None


def number_reward(completion: str, answer: str) -> float:
    """CORRECT_REWARD (1.0) when the last number in the completion equals the answer
    in value ("85.0" and "1,234" count as 85 and 1234), plus FORMAT_REWARD (0.1) when
    the completion's last non-blank line is one number and nothing else (an optional
    full stop after it allowed). So 0, 0.1, 1.0 or 1.1: "85" -> 1.1, "The answer is
    85." -> 1.0, "86" -> 0.1, "8 5" -> 0 (its last number is 5)."""
    reward = 0.0
    expected = parse_number(answer)
    got = final_number(completion)
    if expected is not None and got is not None and got == expected:
        reward += CORRECT_REWARD
    lines = [line for line in completion.translate(_MINUSES).splitlines() if line.strip()]
    if lines and _BARE_RE.fullmatch(lines[-1]):
        reward += FORMAT_REWARD
    return reward


def is_heldout(question: str) -> bool:
    return hashlib.sha256(question.encode()).digest()[0] < HELDOUT_BYTE


class Task(ABC):
    """A source of training problems, held-out problems and their reward."""

    name: str
    seed: int

    @abstractmethod
    def train_problem(self, rng: random.Random) -> Problem:
        """A training problem drawn with rng; never a held-out one."""

    @abstractmethod
    def heldout(self, n: int) -> list[Problem]:
        """The first n held-out problems, the same for every seed (and the first n of
        any longer list); ValueError when the task has fewer than n."""

    @abstractmethod
    def heldout_size(self) -> int:
        """How many held-out problems the task has."""

    def problem(self, index: int) -> Problem:
        """The index-th problem of this seed's training stream (a pure function of
        name, seed and index: a resumed run continues the same stream)."""
        return self.train_problem(random.Random(f"{self.name}:{self.seed}:{index}"))

    def reward(self, completion_text: str, answer: str) -> float:
        return number_reward(completion_text, answer)


class AddTask(Task):
    """'What is a + b? Answer with just the number.', a and b uniform in [lo, hi]."""

    def __init__(self, *, lo: int = 10, hi: int = 99, seed: int) -> None:
        if not 0 <= lo <= hi:
            raise ValueError(f"add: operands need 0 <= lo <= hi, got lo={lo} hi={hi}")
        self.name, self.seed, self.lo, self.hi = "add", seed, lo, hi
        self._pool: list[Problem] | None = None

    def _question(self, a: int, b: int) -> Problem:
        return Problem(f"What is {a} + {b}? Answer with just the number.", str(a + b))

    def _draws(self, rng: random.Random, limit: int, heldout: bool) -> Problem | None:
        for _ in range(limit):
            p = self._question(rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi))
            if is_heldout(p.prompt) == heldout:
                return p
        return None

    def train_problem(self, rng: random.Random) -> Problem:
        # ~90% of draws are training questions: 1000 misses in a row means the range
        # has (almost) none, a configuration error rather than bad luck.
        p = self._draws(rng, 1000, heldout=False)
        if p is None:
            raise ValueError(f"add: no training questions for operands in "
                             f"[{self.lo}, {self.hi}]")
        return p

    def heldout(self, n: int) -> list[Problem]:
        pool = self._heldout_pool()
        if pool is not None:
            if n > len(pool):
                raise ValueError(f"add: {len(pool)} held-out questions for operands in "
                                 f"[{self.lo}, {self.hi}], {n} asked")
            return pool[:max(n, 0)]
        # Too many questions to list: draw held-out ones in a fixed order instead.
        rng = random.Random(f"add:heldout:{self.lo}:{self.hi}")
        out: dict[str, Problem] = {}
        for _ in range(200 * max(n, 0)):
            if len(out) >= n:
                break
            p = self._draws(rng, 1, heldout=True)
            if p is not None:
                out.setdefault(p.prompt, p)
        if len(out) < n:
            raise ValueError(f"add: only {len(out)} held-out questions found for operands "
                             f"in [{self.lo}, {self.hi}], {n} asked")
        return list(out.values())

    def heldout_size(self) -> int:
        pool = self._heldout_pool()
        if pool is not None:
            return len(pool)
        span = range(self.lo, self.hi + 1)
        return sum(is_heldout(self._question(a, b).prompt) for a in span for b in span)

    def _heldout_pool(self) -> list[Problem] | None:
        """Every held-out question in a fixed shuffled order, when there are at most
        ENUMERATE_LIMIT questions in the range (the default range has 8,100)."""
        if (self.hi - self.lo + 1) ** 2 > ENUMERATE_LIMIT:
            return None
        if self._pool is None:
            span = range(self.lo, self.hi + 1)
            pool = [p for a in span for b in span
                    if is_heldout((p := self._question(a, b)).prompt)]
            random.Random(f"add:heldout:{self.lo}:{self.hi}").shuffle(pool)
            self._pool = pool
        return self._pool


class ListTask(Task):
    """Problems from lists: a training list and a held-out list, disjoint."""

    def __init__(self, name: str, train: list[Problem], held: list[Problem], *,
                 seed: int) -> None:
        if not train:
            raise ValueError(f"{name}: no training problems")
        self.name, self.seed, self._train, self._held = name, seed, train, held

    def train_problem(self, rng: random.Random) -> Problem:
        return rng.choice(self._train)

    def heldout(self, n: int) -> list[Problem]:
        if n > len(self._held):
            raise ValueError(f"{self.name}: {len(self._held)} held-out problems, {n} asked")
        return self._held[:max(n, 0)]

    def heldout_size(self) -> int:
        return len(self._held)


def gsm8k_task(*, seed: int, root: Path = GSM8K_DIR) -> ListTask:
    """GSM8K: train.jsonl trains, test.jsonl is held out (in file order); the answer
    is the number after '####', without thousands separators."""

    def read(split: str) -> list[Problem]:
        path = root / f"{split}.jsonl"
        if not path.exists():
            raise ValueError(f"gsm8k: no such file {path}")
        out = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                answer = str(row["answer"]).rsplit("####", 1)[1].strip().replace(",", "")
                question = str(row["question"])
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise ValueError(f"{path}: line {lineno}: {e!r}") from e
            if parse_number(answer) is None:
                raise ValueError(f"{path}: line {lineno}: answer {answer!r} is not a number")
            out.append(Problem(f"{question}\n{GSM8K_INSTRUCTION}", answer))
        return out

    return ListTask("gsm8k", read("train"), read("test"), seed=seed)


def jsonl_task(path: Path, *, seed: int) -> ListTask:
    """Rows {"prompt": str, "answer": number or str of a number} (other keys ignored,
    blank lines skipped); held out by is_heldout(prompt), in file order."""
    if not path.is_file():
        raise ValueError(f"task file {path}: no such file")
    problems = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be an object with prompt and answer")
        prompt, answer = row.get("prompt"), row.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        if answer is None:
            raise ValueError(f"{where}: no 'answer'")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float) or (
                parse_number(str(answer)) is None):
            raise ValueError(f"{where}: 'answer' {answer!r} is not a number")
        problems.append(Problem(prompt, str(answer)))
    if not problems:
        raise ValueError(f"task file {path}: no rows")
    train = [p for p in problems if not is_heldout(p.prompt)]
    held = [p for p in problems if is_heldout(p.prompt)]
    return ListTask(path.stem, train, held, seed=seed)


def load_task(spec: str, *, seed: int) -> Task:
    """The task a spec names: 'add' (operands 10-99), 'add:LO-HI', 'gsm8k', or a path
    ending in .jsonl."""
    if spec == "add":
        return AddTask(seed=seed)
    if spec.startswith("add:"):
        lo, sep, hi = spec[4:].partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and len(lo) + len(hi) <= 12):
            raise ValueError(f"task {spec!r}: write add:LO-HI, e.g. add:1-30")
        task = AddTask(lo=int(lo), hi=int(hi), seed=seed)
        task.name = spec  # the stream of questions depends on the range
        return task
    if spec == "gsm8k":
        return gsm8k_task(seed=seed)
    if spec.endswith(".jsonl"):
        return jsonl_task(Path(spec), seed=seed)
    raise ValueError(f"unknown task {spec!r}: accepted are {SPECS}")
