"""A grammar (grammar.py) lifted to tokens: which of the vocabulary's tokens may come
next, so that a model decoding under the mask writes text the grammar admits, and
finishes it within its token budget.

The vocabulary is each token's text. A token whose bytes are not whole UTF-8 alone
(a piece of a multi-byte character), one holding a control character (compact JSON
has none outside escapes), and the tokenizer's special tokens are never allowed:
the automaton reads characters, and every ASCII character is a token of its own in
a byte-level BPE, so nothing the grammar needs is lost (a non-ASCII character is
written with a token that holds it whole).

A step's mask costs far less than running the automaton over every token:
- tokens are walked in a trie with the automaton's state, so a prefix that the
  grammar refuses is never extended (outside strings almost everything is);
- inside a free string, where nearly every token fits, tokens of plain string
  characters are judged at once from their precomputed lengths (a tensor
  comparison), and only those holding a quote or a backslash are walked;
- walks are cached per state and vocabulary.
Each walk gives, for every token it allows, the fewest characters that complete the
JSON after it. The budget rule: with `remaining` tokens left, a token is allowed only
if that many characters fit in the `remaining - 1` tokens after it (one character is
at most one token), so the text is whole by max_tokens whatever the model prefers.
EOS is allowed only when the text is whole; `finished` says when no character can
extend it (then decoding stops).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from peerd.inference.request import TokenConstraint
from peerd.inference.text import token_bytes
from peerd.plans.automaton import ESCAPES, State, StrFrame
from peerd.plans.grammar import JsonGrammar, StepGrammar, ToolSpecLike

if TYPE_CHECKING:
    from peerd.inference.face import LanguageModel

__all__ = ["GrammarConstraint", "TokenConstraint", "Vocab", "step_constraint"]

FAR = 1 << 30  # the cost of a token that is not allowed
CACHED_WALKS = 4096  # per vocabulary
FORCED_CHARS_A_TOKEN = 8  # forced text looked at per drafted token


class _Trie:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.ids: list[int] = []

    def add(self, text: str, token: int) -> None:
        node = self
        for c in text:
            node = node.children.setdefault(c, _Trie())
        node.ids.append(token)


def _plain(c: str) -> bool:
    return c not in '"\\' and c >= " "


class Vocab:
    """Each token's text (None: never allowed), the tries over them, and for each token
    how many plain string characters it is (-1: not only those)."""

    def __init__(self, texts: Sequence[str | None], eos: Iterable[int]) -> None:
        self.size = len(texts)
        self.eos = frozenset(t for t in eos if 0 <= t < self.size)
        self.texts = [None if t is None or not t or any(c < " " for c in t) else t
                      for t in texts]
        self.trie = _Trie()  # every allowed token
        self.quoting = _Trie()  # those holding a quote or a backslash
        plain = [-1] * self.size
        tail = [-1] * self.size  # an escape's letter, then plain characters
        for token, text in enumerate(self.texts):
            if text is None:
                continue
            self.trie.add(text, token)
            if all(_plain(c) for c in text):
                plain[token] = len(text)
            else:
                self.quoting.add(text, token)
            if text[0] in ESCAPES and all(_plain(c) for c in text[1:]):
                tail[token] = len(text) - 1
        self.plain = torch.tensor(plain, dtype=torch.int32)  # [V]
        self.tail = torch.tensor(tail, dtype=torch.int32)  # [V]
        self.walks: OrderedDict[tuple[State, bool], tuple[torch.Tensor, torch.Tensor]] = \
            OrderedDict()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Vocab:
        """The vocabulary of a Hugging Face tokenizer, built once per tokenizer."""
        try:
            return _BY_TOKENIZER[tokenizer]
        except (KeyError, TypeError):
            pass
        special = set(getattr(tokenizer, "all_special_ids", ()))
        special |= set(getattr(tokenizer, "get_added_vocab", dict)().values())
        texts: list[str | None] = []
        for token in range(len(tokenizer)):
            if token in special:
                texts.append(None)
                continue
            try:
                texts.append(token_bytes(tokenizer, token).decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(None)
        eos = tokenizer.eos_token_id
        vocab = cls(texts, [eos] if isinstance(eos, int) else [])
        try:
            _BY_TOKENIZER[tokenizer] = vocab
        except TypeError:  # not weakly referable: built again next time
            pass
        return vocab

    def walk(self, state: State, quoting_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens `state` allows among the trie's (or only the quoting ones), and
        the characters that complete the text after each: (ids [n], costs [n])."""
        key = (state, quoting_only)
        hit = self.walks.get(key)
        if hit is not None:
            self.walks.move_to_end(key)
            return hit
        ids: list[int] = []
        costs: list[int] = []
        todo = [(self.quoting if quoting_only else self.trie, state)]
        while todo:
            node, at = todo.pop()
            chars = at.next_chars()
            pairs = node.children.items() if chars is None else (
                (c, node.children[c]) for c in chars if c in node.children)
            for c, child in pairs:
                after = at.step(c)
                if after.dead:
                    continue
                if child.ids:
                    cost = after.shortest()
                    ids.extend(child.ids)
                    costs.extend([cost] * len(child.ids))
                if child.children:
                    todo.append((child, after))
        found = (torch.tensor(ids, dtype=torch.long), torch.tensor(costs, dtype=torch.int32))
        self.walks[key] = found
        if len(self.walks) > CACHED_WALKS:
            self.walks.popitem(last=False)
        return found

    def costs(self, state: State) -> torch.Tensor:
        """[V] int32: the characters that complete the text after each token (FAR for a
        token that may not come next)."""
        cost = torch.full((self.size,), FAR, dtype=torch.int32)  # [V]
        in_string = [s for s in state.stacks if isinstance(s[-1], StrFrame) and s[-1].opened]
        rest = state.stacks.difference(in_string)
        if rest:
            ids, found = self.walk(State(rest), False)
            cost[ids] = found
        # stacks in a string that cost alike (need, room, escape, below): compared once
        strings: dict[tuple[int, int, bool, int], None] = {}
        for stack in in_string:
            top = stack[-1]
            assert isinstance(top, StrFrame)
            below = sum(f.shortest() for f in stack[:-1])
            strings[(top.node.min_length - top.used, top.node.max_length - top.used,
                     top.escape, below)] = None
        for need, room, escape, below in strings:
            if escape:  # the escape's letter, then plain characters: 1 + tail
                ok = (self.tail >= 0) & (self.tail < room)  # [V]
                after = torch.clamp(need - 1 - self.tail, min=0)  # [V]
            else:
                ok = (self.plain >= 1) & (self.plain <= room)  # [V]
                after = torch.clamp(need - self.plain, min=0)  # [V]
            after += below + 1
            cost = torch.where(ok, torch.minimum(cost, after), cost)  # [V]
        if in_string:  # tokens with a quote or a backslash: walked
            ids, found = self.walk(State(frozenset(in_string)), True)
            cost[ids] = torch.minimum(cost[ids], found)
        return cost


_BY_TOKENIZER: weakref.WeakKeyDictionary[Any, Vocab] = weakref.WeakKeyDictionary()


class GrammarConstraint:
    """Decoding under a grammar (a `TokenConstraint`): the mask of the tokens that may
    come next, and the state after each token taken."""

    def __init__(self, grammar: JsonGrammar, vocab: Vocab) -> None:
        self.grammar = grammar
        self.vocab = vocab
        self.state = grammar.start()
        self.text = ""
        self.ended = False  # EOS was taken

    @property
    def finished(self) -> bool:
        return self.ended or self.state.finished

    @property
    def complete(self) -> bool:
        return self.state.complete

    def shortest(self) -> int:
        """Fewest characters (and so tokens, at most) that complete the text."""
        return self.state.shortest()

    def allowed_mask(self, remaining_tokens: int) -> torch.Tensor:
        """[V] bool: the tokens that may come next when `remaining_tokens` may still be
        generated (this one included). When none fits the budget (it was too small
        from the start), those that bring the end nearest."""
        cost = self.vocab.costs(self.state)  # [V]
        allowed = cost <= remaining_tokens - 1  # [V]
        if not bool(allowed.any()):
            best = int(cost.min())
            allowed = cost == best if best < FAR else allowed
        if self.state.complete or not bool(allowed.any()):
            # nothing at all is allowed only if the grammar needs a character no token
            # holds whole: end rather than loop
            allowed[list(self.vocab.eos)] = True
        return allowed

    def forced(self, limit: int) -> list[int]:
        """At most `limit` tokens spelling the text the grammar forces next (State.forced),
        the longest token at each point: a draft that costs no model, which greedy
        verification under the mask accepts where the model would write it so."""
        text = self.state.forced(limit * FORCED_CHARS_A_TOKEN)
        ids: list[int] = []
        i = 0
        while i < len(text) and len(ids) < limit:
            node, j, best = self.vocab.trie, i, None
            while j < len(text) and text[j] in node.children:
                node = node.children[text[j]]
                j += 1
                if node.ids:
                    best = (j, node.ids[0])
            if best is None:
                break
            i, token = best
            ids.append(token)
        return ids

    def fork(self) -> GrammarConstraint:
        """A copy that advances on its own (states are immutable: nothing is copied)."""
        other = GrammarConstraint(self.grammar, self.vocab)
        other.state, other.text, other.ended = self.state, self.text, self.ended
        return other

    def advance(self, token_id: int) -> None:
        """Take a token the mask allowed; ValueError for one it did not."""
        if token_id in self.vocab.eos:
            self.ended = True
            return
        text = self.vocab.texts[token_id] if 0 <= token_id < self.vocab.size else None
        after = self.state.advance(text) if text is not None else None
        if after is None or after.dead:
            raise ValueError(f"token {token_id} ({text!r}) does not continue "
                             f"{self.text[-40:]!r} in the grammar")
        self.state = after
        self.text += text  # type: ignore[operator]


def step_constraint(model: LanguageModel, tools: Sequence[ToolSpecLike]) -> GrammarConstraint:
    """A planner's step (the step format of docs/plans.md) over `tools`, decoded by
    `model`: the planner's `make_constraint`. Builds the model's vocabulary the first
    time (about a second for 49k tokens): call it off the event loop."""
    return GrammarConstraint(StepGrammar.for_tools(tools), Vocab.from_tokenizer(model.tokenizer))
