"""k per kind of prompt: how many tokens a speculative round would commit, for a draft
head, on the target's greedy answers to held-out prompts of each kind (the files
scripts/draft_corpus.py writes, or any prompt files), as a chain at a few γ and,
optionally, as a token tree that deep; prompt lookup beside it on the same answers.

The answers are generated as `peerd draft train` generates them (batched, with the
target's features; eagle_train.answer) and, with a data file, kept and reused: a head
measured before and after retraining is measured on the very same answers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from peerd.inference.model.head import Head
from peerd.inference.model.source import load_tokenizer, reference_model, resolve
from peerd.inference.speculative.drafters import Drafter, DraftError
from peerd.inference.speculative.eagle_data import Prompt, load_prompts
from peerd.inference.speculative.eagle_file import default_eagle_path, load_eagle
from peerd.inference.speculative.eagle_measure import by_kind
from peerd.inference.speculative.eagle_train import answer, progress_bar
from peerd.inference.speculative.gamma import TREE_NODES
from peerd.inference.speculative.ngram import NgramDrafter
from peerd.machine import describe


def kind_prompts(kinds: Mapping[str, Path], limit: int | None = None) -> list[Prompt]:
    """The prompts of each kind's file (at most `limit` a kind, the first ones),
    labelled with their kind."""
    prompts: list[Prompt] = []
    for kind, path in kinds.items():
        prompts += [replace(p, source=kind) for p in load_prompts(path)[:limit]]
    return prompts


def measure_kinds(spec: str, kinds: Mapping[str, Path], head_file: Path | None = None, *,
                  gammas: Sequence[int] = (2, 4, 6), tree: bool = False,
                  tree_nodes: int = TREE_NODES, max_new_tokens: int = 160,
                  data: Path | None = None, limit: int | None = None, gen_batch: int = 32,
                  threads: int | None = 2, progress: bool = True) -> dict[str, Any]:
    """Generate (or reuse, from `data`) the target's answers to each kind's prompts and
    replay speculative rounds on them: the head of `head_file` (default: the one shipped
    for this model) as a chain at each γ, as a tree of `tree_nodes` candidates that
    deep if `tree`, and prompt lookup as a chain. Returns a report: per configuration,
    k (tokens per round) and acceptance by position, per kind and over all."""
    began = time.monotonic()
    if threads is not None:
        torch.set_num_threads(threads)
    if not kinds:
        raise ValueError("no prompt files to measure on")
    source = resolve(spec)
    head = Head(source)
    path = head_file or default_eagle_path(head.model_id)
    if path is None:
        raise DraftError(f"no EAGLE head is shipped for {head.model_id}: give one (--head)")
    eagle = load_eagle(path, head)  # a head for another model is refused before any work
    prompts = kind_prompts(kinds, limit)
    if not prompts:
        raise ValueError("the prompt files hold no prompts")
    examples, made = answer(lambda: reference_model(source), load_tokenizer(source), prompts,
                            max_new_tokens, gen_batch, data, head.model_id, progress)
    answered_s = time.monotonic() - began

    drafters: dict[str, tuple[Drafter, int | None]] = {"eagle-chain": (eagle, None)}
    if tree:
        drafters["eagle-tree"] = (eagle, tree_nodes)
    drafters["ngram"] = (NgramDrafter(), None)
    with progress_bar(progress) as bar:
        task = bar.add_task("replaying", total=len(examples) * len(gammas) * len(drafters),
                            info="")
        k = by_kind(drafters, examples, gammas, lambda: bar.update(task, advance=1))
    per_kind = {kind: {"file": str(f), "prompts": sum(e.source == kind for e in examples),
                       "answer_tokens": sum(len(e.tokens) - e.prompt_len
                                            for e in examples if e.source == kind)}
                for kind, f in kinds.items()}
    return {"model_id": head.model_id, "head": str(path), "max_new_tokens": max_new_tokens,
            "gammas": list(gammas), "tree_nodes": tree_nodes if tree else None,
            "answers": made, "kinds": per_kind, "k": k, "machine": describe(),
            "data_s": round(answered_s, 1),
            "total_s": round(time.monotonic() - began, 1)}
