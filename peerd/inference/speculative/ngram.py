"""The `ngram` drafter: prompt lookup. No model, no cost; strong wherever the answer
repeats the prompt (code, extraction, arithmetic). Its lookups also give an EAGLE
tree its extra branches (eagle.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peerd.inference.options import SamplingParams
from peerd.inference.speculative.drafters import Draft
from peerd.inference.speculative.gamma import TREE_NODES
from peerd.inference.speculative.tree import DepthBudget, NodeBudget, TokenTree, TreeBuilder

LOOKUP_BRANCHES = 3  # prompt-lookup continuations a token tree carries
# a lookup branch's own nodes: after every scored candidate in slot order, and with no
# estimate of their chance (exp(-1e4) is 0)
LOOKUP_SCORE = -1e4


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (n from `max_n` down to `min_n`) and propose what followed it."""

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
