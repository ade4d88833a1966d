"""scripts/bench_dsd.py's prompt sets: the mixed set as shipped (40 prompts, ten of each
kind, none from the head's training prompts or the other sets), sent once per token
budget, and the per-prompt spread the report gives each set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_dsd import GSM8K, MIXED, mixed_prompts, spread  # noqa: E402


def test_the_mixed_set_as_shipped() -> None:
    rows = [json.loads(line) for line in MIXED.read_text().splitlines()]
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    kinds = [r["kind"] for r in rows]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "chat": 10, "instruction": 10, "word-problem": 10, "code": 10}
    assert set(kinds[:4]) == {"chat", "instruction", "word-problem", "code"}  # interleaved
    # written for the benchmark: nothing from the head's prompts or the reported sets
    elsewhere = {json.loads(line)["prompt"].strip()
                 for line in (ROOT / "peerd/data/draft_prompts.jsonl").read_text().splitlines()}
    for path in (GSM8K, GSM8K.with_name("train.jsonl")):
        elsewhere |= {json.loads(line)["question"].strip()
                      for line in path.read_text().splitlines()}
    assert not {r["text"].strip() for r in rows} & elsewhere
    assert all(r["text"].startswith("Complete this Python function:\n\n```python\ndef ")
               for r in rows if r["kind"] == "code")


def test_mixed_prompts_go_once_per_budget() -> None:
    prompts = mixed_prompts(3, [48, 160])
    assert [p.set for p in prompts] == ["mixed/48"] * 3 + ["mixed/160"] * 3
    assert len({p.id for p in prompts}) == 6 and all(p.chat for p in prompts)
    assert prompts[0].text == prompts[3].text


def test_spread_is_min_quartiles_max() -> None:
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == {"min": 1.0, "q1": 2.0, "median": 3.0,
                                                  "q3": 4.0, "max": 5.0}
    assert spread([2.5]) == {"min": 2.5, "q1": 2.5, "median": 2.5, "q3": 2.5, "max": 2.5}
