"""Verification of a speculative round: which drafted tokens the target keeps.

Pure functions over the target's logits at the γ+1 positions of one pipeline pass
(row i scores the token after draft token i-1; row 0 follows the last committed
token). Each returns how many draft tokens are accepted and the one token the target
adds after them (a correction where it disagreed, or a bonus after a full accept),
so a round always commits between 1 and γ+1 tokens. The rules (options.VERIFY_MODES):

- `greedy`: the longest prefix where the draft equals the target's argmax, then the
  target's argmax. Output identical to non-speculative greedy decoding.
- `sample`: speculative rejection sampling (Leviathan et al. 2023; Chen et al.
  2023). Draft token d_i drawn from q_i is accepted with probability
  min(1, p_i(d_i) / q_i(d_i)); on the first rejection the token is drawn from
  norm(max(p_i - q_i, 0)); after a full accept the bonus is drawn from p_γ. The
  committed tokens are distributed exactly as the target's own sampling. A
  deterministic drafter (prompt lookup, greedy heads) has q_i = one-hot(d_i).
- `adaptive`: opt-in, lossy relaxation of greedy by token-level importance:

      τ_i = 0                                 if p_i(t_i) ≥ CONFIDENT   (target sure)
      τ_i = min(τ[class(d_i)], τ[class(t_i)])  otherwise
      accept d_i  ⇔  d_i = t_i  or  (rank_i(d_i) < TOP_K  and  p_i(d_i) ≥ (1 − τ_i)·p_i(t_i))

  where t_i is the target's argmax at position i and p_i its softmax. class() sorts
  a token by its text: `strict` (digits, operators, brackets and quotes, identifiers
  with _ or capitals, i.e. names and entities; the words that carry logic: negation,
  connectives, quantifiers, comparison; indentation: τ = 0), `word` (other words: a
  small τ that only admits near-ties), `function` (function words) and `punct` /
  `space` (more relaxed). Taking the min over the draft's and the target's class
  means a digit is never swapped for anything, nor anything for a digit.

A tree draft (tree.py) is verified by `verify_tree`: greedy or adaptive along the
tree, from the root down to the child the target accepts at each node.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from peerd.inference.speculative.tree import TokenTree


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: int  # draft tokens kept, a prefix of the draft
    token: int  # the target's own token after them (correction or bonus)

    def committed(self, draft: Sequence[int]) -> list[int]:
        return [*draft[:self.accepted], self.token]


def verify_greedy(logits: torch.Tensor, draft: Sequence[int]) -> Verdict:
    """logits [γ+1, V]; draft: γ token ids. (verify_tree's walk along a chain.)"""
    return _verify_chain(logits, draft, None)


def verify_sample(probs: torch.Tensor, draft: Sequence[int], draft_probs: torch.Tensor | None,
                  rng: torch.Generator) -> Verdict:
    """probs [γ+1, V]: the target's sampling distributions (sampling.distribution);
    draft_probs [γ, V]: what each draft token was drawn from, None for one-hots."""
    _check(probs, draft)
    if draft_probs is not None and draft_probs.shape[0] < len(draft):
        raise ValueError("draft_probs must have one row per draft token")
    for i, d in enumerate(draft):
        p = probs[i]  # [V]
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        r = float(torch.rand((), generator=rng))
        if q_d > 0 and r * q_d < float(p[d]):  # r < p/q, without dividing by zero
            continue
        if draft_probs is None:
            residual = p.clone()  # max(p - onehot(d), 0) = p with d removed (p(d) ≤ 1)
            residual[d] = 0.0
        else:
            residual = torch.clamp(p - draft_probs[i], min=0.0)  # [V]
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: nothing to correct
            residual = p
        return Verdict(i, int(torch.multinomial(residual, 1, generator=rng)))
    return Verdict(len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=rng)))


# ---- adaptive ---------------------------------------------------------------------------

CONFIDENT = 0.9  # the target's top probability at or above which a position is strict
TOP_K = 3  # a relaxed accept must still be among the target's top candidates
TAU = {"strict": 0.0, "word": 0.4, "function": 0.6, "punct": 0.7, "space": 0.8}

FUNCTION_WORDS = frozenset([
    "a", "an", "the", "so", "yet", "of", "to", "on", "at", "by", "for", "with", "from",
    "into", "onto", "over", "under", "about", "as", "then", "that", "this", "these",
    "those", "there", "here", "it", "its", "are", "was",
    "were", "be", "been", "being", "am", "do", "does", "did", "have", "has", "had", "will",
    "would", "shall", "should", "can", "could", "may", "might", "must", "i", "you", "he",
    "she", "we", "they", "me", "him", "her", "us", "them", "my", "your", "his", "our", "their",
    "which", "who", "whom", "whose", "what", "when", "where", "why", "how",
    "also", "just", "very", "too", "such", "own", "same", "other", "one's",
    "let", "let's", "well",
])
# Small words that carry the logic of a sentence (or are Python's operators): negation,
# connectives, conditions, quantifiers and comparison. Swapping one for a neighbour
# ("and" for "or", "more" for "less") changes what is said, so they are strict.
LOGIC_WORDS = frozenset([
    "not", "no", "nor", "never", "none", "nothing", "and", "or", "but", "if", "unless",
    "else", "elif", "all", "any", "some", "each", "every", "both", "either", "neither",
    "only", "more", "most", "less", "least", "fewer", "much", "many", "few", "than",
    "is", "in", "true", "false",
])
_PUNCT = set(".,;:!?…") | {"...", "--", "—", "–"}
_STRICT_CHARS = set(string.digits) | set("+-*/=<>%^&|~()[]{}\"'`$#@\\_")


def token_class(text: str) -> str:
    """The importance class of a token from its decoded text (see the module doc)."""
    core = text.strip()
    if not core:  # indentation is syntax in Python: spaces after a newline, or a run of them
        indent = text.replace("\n", "") != "" and ("\n" in text or len(text) > 1)
        return "strict" if indent else "space"
    if any(c in _STRICT_CHARS for c in core) or any(c.isupper() for c in core):
        return "strict"
    if core in _PUNCT or all(c in _PUNCT for c in core):
        return "punct"
    if not any(c.isalpha() for c in core) or core.lower() in LOGIC_WORDS:
        return "strict"  # other symbols: treat as syntax
    return "function" if core.lower() in FUNCTION_WORDS else "word"


class TokenClasses:
    """token id -> importance τ, computed once per vocabulary from decoded texts."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.tau = torch.tensor([TAU[token_class(t)] for t in texts],
                                dtype=torch.float32)  # [V]

    @classmethod
    def from_tokenizer(cls, tokenizer: object, vocab_size: int) -> TokenClasses:
        decode = tokenizer.decode  # type: ignore[attr-defined]
        return cls([decode([i]) for i in range(vocab_size)])


class Relaxed:
    """The adaptive rule at one position, from the target's logits there [V]."""

    def __init__(self, logits: torch.Tensor, classes: TokenClasses) -> None:
        self.probs = torch.softmax(logits.float(), dim=-1)  # [V]
        top_p, top = torch.topk(self.probs, TOP_K)  # [K] each
        self.target = int(top[0])  # t_i
        self.p_target = float(top_p[0])
        self.top = top.tolist()
        self.classes = classes

    def accepts(self, d: int) -> bool:
        if d == self.target:
            return True
        if self.p_target >= CONFIDENT or d not in self.top:
            return False
        tau = min(float(self.classes.tau[d]), float(self.classes.tau[self.target]))
        return tau > 0 and float(self.probs[d]) >= (1.0 - tau) * self.p_target


def verify_adaptive(logits: torch.Tensor, draft: Sequence[int],
                    classes: TokenClasses) -> Verdict:
    """logits [γ+1, V]; the relaxed greedy rule in the module doc."""
    return _verify_chain(logits, draft, classes)


def _verify_chain(logits: torch.Tensor, draft: Sequence[int],
                  classes: TokenClasses | None) -> Verdict:
    _check(logits, draft)
    verdict = verify_tree(TokenTree.chain(draft), lambda node: logits[node + 1], classes)
    return Verdict(len(verdict.path), verdict.token)


# ---- trees ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeVerdict:
    path: list[int]  # accepted nodes, root to leaf
    token: int  # the target's own token after them

    def committed(self, tree: TokenTree) -> list[int]:
        return [*(tree.tokens[n] for n in self.path), self.token]


def verify_tree(tree: TokenTree, logits_at: Callable[[int], torch.Tensor],
                classes: TokenClasses | None = None) -> TreeVerdict:
    """The longest path down `tree` that the target accepts, from the root (node -1,
    the last committed token), then the target's token after it. `logits_at(node)`
    gives the target's logits [V] after a node.

    Greedy (`classes` None): at each node the child equal to the argmax, so the output
    is plain greedy decoding's; there is one such path, and `logits_at` is called for
    its k + 1 nodes only. Adaptive: every child the relaxed rule accepts is explored
    and the longest accepted path wins; on equal length the one found first, which
    takes the argmax child before the others and the others in slot order (the
    drafter's best first). `logits_at` is called for the root and every node the
    rule accepts, on the chosen path or not."""
    if classes is None:
        node, path = -1, list[int]()
        while True:
            best = int(torch.argmax(logits_at(node)))
            chosen = next((c for c in tree.children(node) if tree.tokens[c] == best), None)
            if chosen is None:
                return TreeVerdict(path, best)
            path.append(chosen)
            node = chosen
    return _longest_relaxed(tree, -1, logits_at, classes)


def _longest_relaxed(tree: TokenTree, node: int, logits_at: Callable[[int], torch.Tensor],
                     classes: TokenClasses) -> TreeVerdict:
    rule = Relaxed(logits_at(node), classes)
    best = TreeVerdict([], rule.target)
    # the target's own child first (a stable sort keeps the others in slot order)
    for c in sorted(tree.children(node), key=lambda c: tree.tokens[c] != rule.target):
        if rule.accepts(tree.tokens[c]):
            below = _longest_relaxed(tree, c, logits_at, classes)
            if len(below.path) + 1 > len(best.path):
                best = TreeVerdict([c, *below.path], below.token)
    return best


def _check(scores: torch.Tensor, draft: Sequence[int]) -> None:
    if scores.dim() != 2 or scores.shape[0] != len(draft) + 1:
        raise ValueError(f"need [γ+1, V] scores for a draft of {len(draft)}, got "
                         f"{list(scores.shape)}")
