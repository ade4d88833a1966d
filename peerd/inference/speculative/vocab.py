"""A draft vocabulary: the target's most frequent tokens, for scoring drafts.

One lm_head call over the whole vocabulary is most of a draft step (SmolLM2: a
49152 x 576 matrix against ~4M multiply-adds in the head's decoder layer). Text uses
few of those tokens: FR-Spec (Zhao et al., 2025) drafts over the most frequent ones
only and verifies with the full vocabulary, so the output is unchanged (a token
outside the draft vocabulary is simply never drafted; the target still emits it).
A third of SmolLM2's vocabulary, counted on general and code text, covers nearly every
token of its answers, the more so with each request's own context tokens added
(`EagleSession.extra`); the coverage measured on the DSD benchmark's prompts is in
bench/README.md.

The ids are picked here (pure); the head file stores them (`draft_vocab`, see
eagle_file.py). `peerd draft train` counts the target's own training answers; `peerd
draft vocab` counts text files, for a head that was trained without one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

DRAFT_VOCAB_SIZE = 16384  # ids drafted over by default (a third of SmolLM2's 49152)
CHUNK_CHARS = 1 << 16  # text handed to the tokenizer at a time


class VocabError(Exception):
    """A draft vocabulary that cannot be used (or built) as given."""


def count_tokens(sequences: Iterable[Sequence[int]]) -> Counter[int]:
    counts: Counter[int] = Counter()
    for ids in sequences:
        counts.update(ids)
    return counts


def pick(counts: Mapping[int, int], vocab_size: int, size: int,
         always: Iterable[int] = ()) -> list[int]:
    """The `size` ids to draft over, ascending: `always` (special tokens such as the
    end of a turn), then the most counted (ties: lower id first), then ids never
    counted in id order (a BPE vocabulary's earlier merges are the commoner ones).
    The whole vocabulary when `size` >= `vocab_size`."""
    if size < 1:
        raise VocabError(f"a draft vocabulary needs at least one id, not {size}")
    if size >= vocab_size:
        return list(range(vocab_size))
    chosen: dict[int, None] = {}  # insertion-ordered set
    for t in always:
        if 0 <= t < vocab_size:
            chosen[t] = None
    ranked = sorted((t for t in counts if 0 <= t < vocab_size and counts[t] > 0),
                    key=lambda t: (-counts[t], t))
    for t in ranked:
        if len(chosen) >= size:
            break
        chosen[t] = None
    t = 0
    while len(chosen) < size:
        chosen.setdefault(t, None)
        t += 1
    return sorted(list(chosen)[:size])


def validate(ids: Sequence[int], vocab_size: int) -> None:
    """VocabError unless `ids` is a non-empty, duplicate-free list of ids < vocab_size."""
    if not ids:
        raise VocabError("the draft vocabulary is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise VocabError(f"draft vocabulary id {bad[0]} is outside the model's "
                         f"vocabulary of {vocab_size}")
    if len(set(ids)) != len(ids):
        raise VocabError("the draft vocabulary repeats ids")


def coverage(ids: Iterable[int], counts: Mapping[int, int]) -> float:
    """The share of the counted tokens that are in `ids` (1.0 when nothing was counted)."""
    total = sum(counts.values())
    if total == 0:
        return 1.0
    keep = set(ids)
    return sum(n for t, n in counts.items() if t in keep) / total


def texts(path: Path) -> Iterator[str]:
    """The text in a file: in JSON lines, every string value of every record (a
    malformed line is an error naming it); any other file as a whole, in chunks."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise VocabError(f"{path}:{n}: not JSON ({exc.msg})") from exc
                yield from _strings(record)
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    for i in range(0, len(text), CHUNK_CHARS):
        yield text[i:i + CHUNK_CHARS]


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def count_files(files: Iterable[Path], encode: Callable[[str], list[int]],
                on_file: Callable[[Path], None] | None = None) -> Counter[int]:
    """Token counts over the text of `files` (see `texts`), encoded by `encode`."""
    counts: Counter[int] = Counter()
    for path in files:
        for text in texts(path):
            counts.update(encode(text))
        if on_file is not None:
            on_file(path)
    return counts
