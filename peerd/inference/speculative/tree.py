"""Token trees: several candidate continuations verified in one pipeline pass.

A chain draft bets everything on one guess per position; once it misses, the rest
of the round is wasted. A tree keeps the drafter's runners-up too (EAGLE-2, SpecInfer):
node j is a token whose parent is an earlier node, or -1 for the last committed
token, and the target scores every node in the same FORWARD, each attending to the
committed prefix and its own ancestors only (`attention_mask`). Verification then
walks down from the root along the target's choices (acceptance.verify_tree).

Nodes are kept in depth-first order with each node's likeliest child first, so the
drafter's best chain occupies the first slots: when the target takes it, the KV the
shards wrote for it stays valid and nothing is recomputed (`chain_prefix`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# how many scored candidates a tree keeps: a count, or a function of their estimated
# chances, likeliest first, that says how many (gamma.TreeBudget.choose)
NodeBudget = int | Callable[[Sequence[float]], int]
# whether a tree grows one more level: given the estimated chances of the best
# candidates the last level added (likeliest first) and what that level cost in ms
# (gamma.TreeBudget.deeper)
DepthBudget = Callable[[Sequence[float], float], bool]


@dataclass(frozen=True, slots=True)
class TokenTree:
    tokens: list[int]
    parents: list[int]  # parents[j] < j, or -1: a child of the last committed token
    # the drafter's estimate of each node's chance to be accepted, where it has one
    # (a draft head's cumulative probability); 0 for a node it did not score
    estimates: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a tree needs one parent per token")
        if self.estimates and len(self.estimates) != len(self.tokens):
            raise ValueError("a tree's estimates need one value per token")
        if any(not -1 <= p < j for j, p in enumerate(self.parents)):
            raise ValueError("every parent must be an earlier node or -1")

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        """The children of `node` (-1: the root) in slot order."""
        return [j for j, p in enumerate(self.parents) if p == node]

    def depth(self) -> int:
        """Tokens on the longest root-to-leaf path (0 for an empty tree)."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return max(depths, default=0)

    def first_chain(self) -> int:
        """How many leading nodes form a chain from the root (the drafter's best guess)."""
        n = 0
        while n < len(self.parents) and self.parents[n] == n - 1:
            n += 1
        return n

    def is_chain(self) -> bool:
        return self.first_chain() == len(self)

    def head(self, n: int) -> TokenTree:
        """The first `n` nodes: a tree again, as every parent comes before its child."""
        if n >= len(self):
            return self
        n = max(n, 0)
        return TokenTree(self.tokens[:n], self.parents[:n], self.estimates[:n])

    def estimated(self, path: Sequence[int] | None = None) -> tuple[float, int]:
        """(Σ estimates over the tree, how many nodes of `path` were estimated): what
        the drafter predicted this round would accept and what it got, for calibration."""
        if not self.estimates:
            return 0.0, 0
        hits = sum(1 for n in path or () if self.estimates[n] > 0)
        return float(sum(self.estimates)), hits

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> TokenTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))


def chain_prefix(path: Sequence[int]) -> int:
    """How many of an accepted path's first nodes sit in slots 0, 1, 2...: the part of
    the round whose KV the shards keep."""
    n = 0
    while n < len(path) and path[n] == n:
        n += 1
    return n


def attention_mask(parents: Sequence[int], past: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [1, 1, T, past + T] (True: attend) for T tree positions after `past`
    cached ones: every position sees the whole cache, its ancestors and itself."""
    T = len(parents)
    seen = torch.zeros(T, T, dtype=torch.bool)  # [T, T]: row j = ancestors of j and j
    for j, p in enumerate(parents):
        if p >= 0:
            seen[j] = seen[p]
        seen[j, j] = True
    full = torch.cat([torch.ones(T, past, dtype=torch.bool), seen], dim=1)  # [T, past+T]
    return full.to(device)[None, None]


class TreeBuilder:
    """Grows a tree node by node (children of one parent stay distinct tokens), then
    lays it out depth-first, likeliest child first (`build`)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []  # log of an estimated chance to be accepted
        self._index: dict[tuple[int, int], int] = {}  # (parent, token) -> node

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float) -> int:
        """The node for `token` under `parent` (existing or new); a node's score is the
        best it was given."""
        key = (parent, token)
        node = self._index.get(key)
        if node is None:
            node = self._index[key] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.scores.append(score)
        else:
            self.scores[node] = max(self.scores[node], score)
        return node

    def add_chain(self, tokens: Sequence[int], score: float) -> list[int]:
        """A whole candidate continuation (e.g. a prompt-lookup match) under the root;
        its nodes, existing or new."""
        parent, nodes = -1, []
        for token in tokens:
            parent = self.add(parent, token, score)
            nodes.append(parent)
        return nodes

    def best(self, nodes: NodeBudget) -> list[int]:
        """The candidates a tree keeps: the `nodes` best by score (as a function: as
        many as it says, given every candidate's estimate, best first)."""
        ranked = sorted(range(len(self.tokens)), key=lambda n: -self.scores[n])
        n = nodes if isinstance(nodes, int) else nodes([self.estimate(i) for i in ranked])
        return ranked[:max(n, 0)]

    def estimate(self, node: int) -> float:
        """The node's estimated chance to be accepted: exp(score), at most 1."""
        return math.exp(min(self.scores[node], 0.0))

    def build(self, keep: Sequence[int] | None = None) -> TokenTree:
        """The tree of `keep` (default all nodes; ancestors of a kept node are kept
        too) in depth-first, best-child-first order."""
        wanted = set(range(len(self.tokens)) if keep is None else keep)
        for node in list(wanted):
            p = self.parents[node]
            while p >= 0 and p not in wanted:
                wanted.add(p)
                p = self.parents[p]
        children: dict[int, list[int]] = {}
        for node in sorted(wanted):
            children.setdefault(self.parents[node], []).append(node)
        tokens: list[int] = []
        parents: list[int] = []
        estimates: list[float] = []
        stack = [(-1, c) for c in sorted(children.get(-1, []), key=self._rank)]
        while stack:  # depth first; the best child is popped first
            new_parent, node = stack.pop()
            tokens.append(self.tokens[node])
            parents.append(new_parent)
            estimates.append(self.estimate(node))
            mine = len(tokens) - 1
            stack.extend((mine, c) for c in sorted(children.get(node, []), key=self._rank))
        return TokenTree(tokens, parents, estimates)

    def _rank(self, node: int) -> tuple[float, int]:
        # ascending: the best child (higher score, then the earlier node) is pushed last
        # and so popped first
        return (self.scores[node], -node)
