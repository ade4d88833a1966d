"""The drafter interface: what every drafter provides. A drafter makes cheap guesses of
the next few tokens at the entry peer.

A decoding round (decoding.py) asks a drafter for γ tokens, runs them through the
pipeline in one pass and keeps the prefix the target agrees with. A drafter is per
model (`Drafter`); each request gets its own `DraftSession`, which follows the
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
- `propose_tree(depth, nodes, deeper)` (optional, `TreeDraftSession`): a token tree of
  candidates for greedy or adaptive verification.

The drafters: ngram.py (prompt lookup), draft_model.py (`model:<SPEC>`, a small LM),
eagle.py (a draft head over the target's features); catalog.py builds them by name.
This module imports none of them: they all import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from peerd.inference.options import SamplingParams
from peerd.inference.sampling import distribution
from peerd.inference.speculative.gamma import TREE_NODES
from peerd.inference.speculative.tree import DepthBudget, NodeBudget, TokenTree


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
