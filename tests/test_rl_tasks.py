"""Tasks and rewards, pure: the number parsing on tricky completions, held-out
questions never produced by the training stream, and clear errors on bad files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from peerd.rl.tasks import (
    MAX_REWARD,
    AddTask,
    Problem,
    final_number,
    load_task,
    number_reward,
)


@pytest.mark.parametrize(("completion", "answer", "reward"), [
    ("85", "85", 1.1),  # right, and just the number
    ("85\n", "85", 1.1),
    ("85.", "85", 1.1),  # a full stop after the number is still just the number
    ("85.0", "85", 1.1),  # the same value
    ("The answer is 85.", "85", 1.0),  # right, in a sentence
    ("37 + 48 = 85", "85", 1.0),  # the last number counts
    ("I think 85 apples", "85", 1.0),
    ("Let me see.\n37 + 48\n85", "85", 1.1),  # the last line is just the number
    ("86", "85", 0.1),  # wrong, well formatted
    ("8 5", "85", 0.0),  # two numbers, the last is 5: wrong, and not one number
    ("85 or 86", "85", 0.0),
    ("-3", "-3", 1.1),
    ("\u22123", "-3", 1.1),  # a typographic minus
    ("5-8=-3", "-3", 1.0),  # '8-' is no sign: the numbers are 5, 8, -3
    ("10-3", "7", 0.0),  # 10 and 3, not -3
    ("1,234", "1234", 1.1),
    ("It costs $1,234.", "1,234", 1.0),
    ("12,34", "1234", 0.0),  # not a thousands separator: 12 and 34
    ("", "85", 0.0),
    ("   \n  ", "85", 0.0),
    ("eighty-five", "85", 0.0),
    ("3.14", "3.14", 1.1),
])
def test_number_reward(completion: str, answer: str, reward: float) -> None:
    assert number_reward(completion, answer) == pytest.approx(reward)
    assert 0.0 <= number_reward(completion, answer) <= MAX_REWARD


def test_final_number() -> None:
    assert final_number("a 1,234.5 b") == pytest.approx(1234.5)
    assert final_number("no digits") is None
    assert final_number("1,2345") == 2345  # "1" then "2345": never half a number


def test_add_problems_and_their_reward() -> None:
    task = load_task("add", seed=1)
    assert task.name == "add"
    p = task.train_problem(random.Random(0))
    assert p.prompt.startswith("What is ") and p.prompt.endswith("Answer with just the number.")
    a, b = (int(x) for x in p.prompt[len("What is "):].split("?")[0].split(" + "))
    assert 10 <= a <= 99 and 10 <= b <= 99 and p.answer == str(a + b)
    assert task.reward(p.answer, p.answer) == pytest.approx(MAX_REWARD)
    custom = AddTask(lo=100, hi=999, seed=0)
    for i in range(20):
        q = custom.problem(i)
        a, b = (int(x) for x in q.prompt[len("What is "):].split("?")[0].split(" + "))
        assert 100 <= a <= 999 and 100 <= b <= 999


def test_the_training_stream_is_seeded_and_resumable() -> None:
    one, two, other = load_task("add", seed=3), load_task("add", seed=3), load_task("add", seed=4)
    first = [one.problem(i) for i in range(50)]
    assert first == [two.problem(i) for i in range(50)]
    assert first != [other.problem(i) for i in range(50)]
    assert one.problem(37) == first[37]  # step 37 of a resumed run asks the same


def test_no_add_heldout_question_can_come_from_training() -> None:
    # a range small enough to enumerate every question it can ask: 9 x 9 = 81
    task = AddTask(lo=1, hi=9, seed=0)
    everything = {f"What is {a} + {b}? Answer with just the number."
                  for a in range(1, 10) for b in range(1, 10)}
    heldout = {p.prompt for p in task.heldout(task.heldout_size())}
    rng = random.Random(0)
    trained = {task.train_problem(rng).prompt for _ in range(5000)}
    assert heldout and not heldout & trained
    assert heldout | trained == everything  # every other question is trained on
    with pytest.raises(ValueError, match="held-out"):
        task.heldout(len(heldout) + 1)
    # and on the default range: the held-out set is fixed, whatever the seed
    default = load_task("add", seed=0).heldout(200)
    assert default == load_task("add", seed=99).heldout(200)
    assert len({p.prompt for p in default}) == 200
    stream = {load_task("add", seed=5).problem(i).prompt for i in range(20000)}
    assert not stream & {p.prompt for p in default}
    assert load_task("add", seed=0).heldout(50) == default[:50]


def test_gsm8k_trains_on_the_training_split_and_holds_out_the_test_split() -> None:
    task = load_task("gsm8k", seed=0)
    assert task.name == "gsm8k"
    p = task.problem(0)
    assert "final answer" in p.prompt and p.answer.lstrip("-").replace(".", "").isdigit()
    # the first training row: Natalia's clips, 72
    root = Path(__file__).resolve().parents[1] / "bench" / "data" / "gsm8k"
    first = json.loads((root / "train.jsonl").read_text().splitlines()[0])
    assert task.reward("48 + 24 = 72\n72", "72") == pytest.approx(1.1)
    assert first["answer"].endswith("#### 72")
    test_questions = {json.loads(line)["question"]
                      for line in (root / "test.jsonl").read_text().splitlines()}
    held = task.heldout(50)
    assert len(held) == 50 and all(h.prompt.rsplit("\n", 1)[0] in test_questions for h in held)
    trained = {task.problem(i).prompt.rsplit("\n", 1)[0] for i in range(300)}
    assert not trained & test_questions
    assert all("," not in h.answer for h in task.heldout(1319))
    with pytest.raises(ValueError, match="held-out"):
        task.heldout(1320)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_jsonl_task_splits_its_rows_by_a_hash_of_the_prompt(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": f"What is {i} squared?", "answer": i * i})
            for i in range(200)]
    task = load_task(str(write(tmp_path / "sq.jsonl", [*rows, ""])), seed=0)
    assert task.name == "sq"
    held = {p.prompt for p in task.heldout(task.heldout_size())}
    trained = {task.problem(i).prompt for i in range(3000)}
    assert held and trained and not held & trained
    assert len(held | trained) == 200
    p = task.problem(0)
    n = int(p.prompt.split()[2])
    assert p.answer == str(n * n) and task.reward(str(n * n), p.answer) == pytest.approx(1.1)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "line 2"),
    ("[1, 2]", "line 2: .*object"),
    ('{"prompt": "x"}', "line 2: .*answer"),
    ('{"answer": "3"}', "line 2: .*prompt"),
    ('{"prompt": "", "answer": "3"}', "line 2: .*prompt"),
    ('{"prompt": "x", "answer": "three"}', "line 2: .*number"),
    ('{"prompt": 5, "answer": "3"}', "line 2: .*prompt"),
])
def test_a_malformed_jsonl_file_names_the_line(tmp_path: Path, line: str,
                                                message: str) -> None:
    path = write(tmp_path / "bad.jsonl", ['{"prompt": "What is 1 + 1?", "answer": "2"}', line])
    with pytest.raises(ValueError, match=message):
        load_task(str(path), seed=0)


def test_load_task_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"add.*gsm8k.*jsonl"):
        load_task("chess", seed=0)
    with pytest.raises(ValueError, match="no such file"):
        load_task(str(tmp_path / "missing.jsonl"), seed=0)
    with pytest.raises(ValueError, match="no rows"):
        load_task(str(write(tmp_path / "empty.jsonl", [""])), seed=0)
    with pytest.raises(ValueError):
        AddTask(lo=50, hi=10, seed=0)


def test_problem_is_a_plain_record() -> None:
    assert Problem("q", "1") == Problem(prompt="q", answer="1")


def test_tasks_do_not_import_torch() -> None:
    code = ("import sys, peerd.rl.tasks; load = peerd.rl.tasks.load_task('gsm8k', seed=0); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_range_too_large_to_list_still_holds_questions_out() -> None:
    task = AddTask(lo=1000, hi=9999, seed=0)  # 81 million questions: drawn, not listed
    held = task.heldout(30)
    assert len({p.prompt for p in held}) == 30 and held[:10] == task.heldout(10)
    rng = random.Random(1)
    train = [task.train_problem(rng) for _ in range(2000)]
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert all(1000 <= int(p.prompt.split()[2]) <= 9999 for p in train)
