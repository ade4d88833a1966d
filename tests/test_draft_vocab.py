"""Picking a draft vocabulary (pure), and counting text for one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from peerd.inference.speculative.vocab import (
    VocabError,
    count_files,
    count_tokens,
    coverage,
    pick,
    texts,
    validate,
)


def test_the_most_counted_ids_are_kept_with_the_special_ones() -> None:
    counts = Counter({5: 10, 7: 10, 2: 3, 9: 50, 1: 1})
    assert pick(counts, 12, 3) == [5, 7, 9]  # 9, then the 5/7 tie by id
    assert pick(counts, 12, 3, always=[11]) == [5, 9, 11]  # 11 first, then 9 and 5
    assert pick(counts, 12, 4, always=[99, -1]) == [2, 5, 7, 9]  # not in the vocabulary


def test_ids_never_counted_fill_up_in_id_order() -> None:
    assert pick(Counter({8: 2}), 10, 4) == [0, 1, 2, 8]
    assert pick(Counter(), 10, 2) == [0, 1]
    assert pick(Counter({3: 0, 4: 1, 50: 9}), 6, 2) == [0, 4]  # zero counts and ids >= V
    assert pick(Counter({1: 1}), 5, 5) == [0, 1, 2, 3, 4]  # the whole vocabulary
    assert pick(Counter({1: 1}), 5, 9) == list(range(5))
    with pytest.raises(VocabError, match="at least one"):
        pick(Counter(), 5, 0)


def test_validate_and_coverage() -> None:
    validate([0, 3, 4], 5)
    for bad, match in (([], "empty"), ([0, 5], "outside"), ([-1], "outside"),
                       ([1, 1], "repeats")):
        with pytest.raises(VocabError, match=match):
            validate(bad, 5)
    counts = count_tokens([[1, 1, 2], [3]])
    assert counts == Counter({1: 2, 2: 1, 3: 1})
    assert coverage([1], counts) == 0.5 and coverage([1, 2, 3], counts) == 1.0
    assert coverage([1], Counter()) == 1.0


def test_text_files_are_counted_jsonl_by_string_values(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"q": "ab", "n": 3, "more": ["c", {"d": "e"}]}\n\n{"q": "f"}\n')
    plain = tmp_path / "b.py"
    plain.write_text("xy")
    assert list(texts(jsonl)) == ["ab", "c", "e", "f"]
    assert list(texts(plain)) == ["xy"]
    seen: list[Path] = []
    counts = count_files([jsonl, plain], lambda t: [ord(c) for c in t], seen.append)
    assert counts == Counter(ord(c) for c in "abcefxy") and seen == [jsonl, plain]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"q": "ok"}\n{"q": \n')
    with pytest.raises(VocabError, match=r"broken\.jsonl:2: not JSON"):
        list(texts(broken))
