"""Drafters: cheap guesses of the next few tokens, made at the entry peer.

Speculative decoding (speculative.py) asks a drafter for γ tokens, runs them through
the pipeline in one pass and keeps the prefix the target agrees with. A drafter is
per model (`Drafter`); each request gets its own `DraftSession`, which follows the
committed sequence:

- `extend(tokens, features)`: `tokens` were just committed. `features` [n, H] are the
  target's final-layer hidden states (the last shard's output, before the final
  norm) for the positions that the pipeline just ran *and* that stayed committed, in
  order. After every call, features are known for every committed position but the
  last (whose token has not been through the pipeline yet). The first call carries
  the prompt and the first generated token, with the prompt's features.
- `propose(gamma, params, rng)`: up to γ draft tokens continuing the committed
  sequence, and for sampling the distribution each was drawn from. Proposing never
  changes what is committed.
- `propose_tree(depth, nodes, deeper)` (optional, `TreeDraftSession`): a token tree of candidates
  for greedy or adaptive verification.

Drafters here: `ngram` (prompt lookup: no model) and `model:<SPEC>` (a small causal
LM with the target's tokenizer). `eagle` lives in eagle.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from peerd.inference.sampling import SamplingParams, distribution
from peerd.inference.speculative.gamma import TREE_NODES
from peerd.inference.speculative.tree import DepthBudget, NodeBudget, TokenTree, TreeBuilder

LOOKUP_BRANCHES = 3  # prompt-lookup continuations a token tree carries
# a lookup branch's own nodes: after every scored candidate in slot order, and with no
# estimate of their chance (exp(-1e4) is 0)
LOOKUP_SCORE = -1e4


class DraftError(ValueError):
    """A drafter cannot be built or used for this model (a clear message for users)."""


@dataclass(frozen=True, slots=True)
class Draft:
    tokens: list[int]
    # [len(tokens), V] float32: the distribution each token was drawn from, for
    # rejection sampling; None when the draft is deterministic (a one-hot per token).
    probs: torch.Tensor | None = None


class DraftBuilder:
    """Collects a draft token by token from the drafter's logits: the argmax when
    decoding greedily, else a sample from the request's distribution (kept for
    rejection sampling)."""

    def __init__(self, params: SamplingParams, rng: torch.Generator) -> None:
        self.params, self.rng = params, rng
        self.tokens: list[int] = []
        self.probs: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor) -> int:
        """logits [V] -> the next draft token."""
        if self.params.temperature == 0.0:
            token = int(torch.argmax(logits))
        else:
            p = distribution(logits, self.params)  # [V]
            token = int(torch.multinomial(p, 1, generator=self.rng))
            self.probs.append(p)
        self.tokens.append(token)
        return token

    def build(self) -> Draft:
        return Draft(self.tokens, torch.stack(self.probs) if self.probs else None)  # [γ, V]


class DraftSession(Protocol):
    def extend(self, tokens: Sequence[int], features: torch.Tensor | None) -> None: ...
    def propose(self, gamma: int, params: SamplingParams,
                rng: torch.Generator) -> Draft: ...


@runtime_checkable
class TreeDraftSession(DraftSession, Protocol):
    """A session that can also grow a token tree of candidates, up to `depth` deep, for
    greedy or adaptive verification (tree.py)."""

    # whether the tree grows level by level with scored candidates (a draft head):
    # then `deeper` can stop it short of `depth`; else `depth` is its depth
    levels: bool

    def propose_tree(self, depth: int, nodes: NodeBudget = TREE_NODES,
                     deeper: DepthBudget | None = None) -> TokenTree:
        """`nodes`: how many scored candidates to keep, or a function of their
        estimated chances (likeliest first) that says how many (gamma.TreeBudget);
        `deeper`: whether to grow another level (gamma.TreeBudget.deeper)."""
        ...


class Drafter(Protocol):
    name: str

    def start(self) -> DraftSession: ...


# ---- ngram: prompt lookup -----------------------------------------------------------------


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (n from `max_n` down to `min_n`) and propose what followed it. No model, no cost;
    strong wherever the answer repeats the prompt (code, extraction, arithmetic)."""

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def start(self) -> NgramSession:
        return NgramSession(self.max_n, self.min_n)


class NgramSession:
    levels = False  # its tree is whole lookup branches, `depth` long

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []

    def extend(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self.tokens.extend(tokens)

    def propose(self, gamma: int, params: SamplingParams, rng: torch.Generator) -> Draft:
        return Draft(lookup(self.tokens, gamma, self.max_n, self.min_n))

    def propose_tree(self, depth: int, nodes: NodeBudget = TREE_NODES,
                     deeper: DepthBudget | None = None) -> TokenTree:
        """The LOOKUP_BRANCHES best continuations at once, the latest match first
        (unscored: `nodes` and `deeper` do not apply)."""
        builder = TreeBuilder()
        found = lookups(self.tokens, depth, self.max_n, self.min_n, LOOKUP_BRANCHES)
        for i, follow in enumerate(found):
            builder.add_chain(follow, LOOKUP_SCORE - i)
        return builder.build()


def lookup(seq: Sequence[int], gamma: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Up to `gamma` tokens that followed the latest earlier match of seq's last n tokens,
    trying the longest n first. [] when nothing matches."""
    found = lookups(seq, gamma, max_n, min_n, 1)
    return found[0] if found else []


def lookups(seq: Sequence[int], gamma: int, max_n: int = 4, min_n: int = 1,
            branches: int = 3) -> list[list[int]]:
    """Up to `branches` different continuations (up to `gamma` tokens each) of seq's
    last n tokens' earlier matches: longest n first, then the latest match first.
    The first is `lookup`'s; the others are runners-up for a token tree."""
    L = len(seq)
    found: list[list[int]] = []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        tail = list(seq[L - n:])
        for start in range(L - n - 1, -1, -1):  # latest first; never the tail itself
            if list(seq[start:start + n]) == tail:
                follow = list(seq[start + n:start + n + gamma])
                if follow and not any(f[:len(follow)] == follow for f in found):
                    found.append(follow)
                    if len(found) >= branches:
                        return found
    return found


# ---- model:<SPEC>: a small causal LM with the same tokenizer ------------------------------


class ModelDrafter:
    """Any small causal LM sharing the target's vocabulary drafts autoregressively with
    its own KV cache (rolled back after each proposal)."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name

    def start(self) -> ModelSession:
        return ModelSession(self.model)


class ModelSession:
    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=getattr(model, "config", None))
        self.tokens: list[int] = []
        self.cached = 0  # committed tokens whose keys and values the cache holds

    def extend(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self.tokens.extend(tokens)

    def _forget(self) -> None:
        """Drop cached positions past the committed ones."""
        extra = self.cache.get_seq_length() - self.cached
        if extra > 0:
            self.cache.crop(-extra)

    @torch.inference_mode()
    def _logits(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids` after the cache; the last position's logits [V]."""
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), cache=self.cache,
                         use_cache=True)
        logits: torch.Tensor = out.logits[0, -1].float()  # [V]
        return logits

    @torch.inference_mode()
    def propose(self, gamma: int, params: SamplingParams, rng: torch.Generator) -> Draft:
        if gamma < 1 or not self.tokens:
            return Draft([])
        # Bring the cache up to all committed tokens (the last one yields the 1st guess).
        self._forget()
        logits = self._logits(self.tokens[self.cached:])
        self.cached = len(self.tokens)
        draft = DraftBuilder(params, rng)
        for i in range(gamma):
            token = draft.add(logits)
            if i + 1 < gamma:
                logits = self._logits([token])
        self._forget()  # the guesses
        return draft.build()


# ---- the entry peer's drafters, built on first use ----------------------------------------


class DrafterCatalog:
    """`draft` option -> Drafter for one target model; each is built once (loading a
    draft model or head takes seconds) and shared by every request."""

    def __init__(self, head: torch.nn.Module, tokenizer: object, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.head = head
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self._built: dict[str, Drafter] = {}

    def get(self, draft: str) -> Drafter:
        """Build (or reuse) the drafter; DraftError says why one cannot be had."""
        if draft not in self._built:
            self._built[draft] = self._build(draft)
        return self._built[draft]

    def _build(self, draft: str) -> Drafter:
        kind, _, arg = draft.partition(":")
        if kind == "ngram":
            return NgramDrafter()
        if kind == "eagle":
            from peerd.inference.speculative.eagle_file import default_eagle_path, load_eagle

            model_id = str(getattr(self.head, "model_id", "?"))
            path = Path(arg).expanduser() if arg else default_eagle_path(model_id)
            if path is None:
                raise DraftError(f"no EAGLE head ships for {model_id}; train one with "
                                 f"`peerd draft train --model SPEC --out PATH` and ask for "
                                 f"eagle:PATH")
            drafter: Drafter = load_eagle(path, self.head)  # type: ignore[arg-type]
            return drafter
        if kind == "model":
            return self._draft_model(arg)
        raise DraftError(f"unknown drafter {draft!r}")

    def _draft_model(self, spec: str) -> ModelDrafter:
        from peerd.inference.model.source import (
            ModelError,
            load_config,
            load_tokenizer,
            reference_model,
            resolve,
        )

        try:
            source = resolve(spec)
            config = load_config(source)
            theirs = load_tokenizer(source)
        except ModelError as exc:
            raise DraftError(f"draft model {spec!r}: {exc}") from None
        mine = self.tokenizer
        vocab = int(getattr(self.head, "vocab_size", 0))
        if int(config.vocab_size) != vocab or theirs.get_vocab() != mine.get_vocab():  # type: ignore[attr-defined]
            raise DraftError(f"draft model {spec!r} has another vocabulary than the target "
                             f"({int(config.vocab_size)} vs {vocab} entries, or different "
                             f"tokens): a drafter must share the target's tokenizer")
        model = reference_model(source, device=self.device, dtype=self.dtype)
        return ModelDrafter(model, f"model:{spec}")
