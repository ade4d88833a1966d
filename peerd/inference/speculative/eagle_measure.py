"""How well a drafter would do on held-out answers: speculative rounds replayed along
the target's greedy answers with greedy verification (the longest draft prefix the
target agrees with, plus the target's own next token; for a token tree, the path down
it along the answer), for an EAGLE head against prompt lookup on the same answers,
overall and per prompt kind. No pipeline: the answers carry the features."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peerd.inference.model.head import Head
from peerd.inference.options import SamplingParams
from peerd.inference.speculative.drafters import (
    Drafter,
    DraftError,
    DraftSession,
    TreeDraftSession,
)
from peerd.inference.speculative.eagle import EagleDrafter, EagleHead
from peerd.inference.speculative.eagle_data import Example
from peerd.inference.speculative.ngram import NgramDrafter
from peerd.inference.speculative.tree import TokenTree

GREEDY = SamplingParams(temperature=0.0)


@dataclass(slots=True)
class Acceptance:
    """Replayed speculative rounds of one drafter at one γ (full rounds only: those
    whose answer had γ+1 tokens left, so the end of an answer does not bias them)."""

    gamma: int
    rounds: int = 0
    committed: int = 0  # tokens committed by those rounds (accepted + the target's own)
    attempts: list[int] = field(default_factory=list)  # [γ]: drafts reaching position i
    accepted: list[int] = field(default_factory=list)  # [γ]: and accepted there

    @property
    def tokens_per_round(self) -> float:
        return self.committed / self.rounds if self.rounds else 0.0

    def rates(self) -> list[float]:
        """P(draft token i accepted | tokens before it accepted), i = 1..γ."""
        return [a / n if n else 0.0 for a, n in zip(self.accepted, self.attempts, strict=True)]

    def as_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "rounds": self.rounds,
                "tokens_per_round": round(self.tokens_per_round, 3),
                "acceptance_by_position": [round(r, 3) for r in self.rates()]}



def replay(session: DraftSession, example: Example, result: Acceptance,
           tree_nodes: int | None = None) -> None:
    """Speculative rounds along `example` (the target's greedy answer) with greedy
    verification; adds the full rounds to `result`. A chain of γ = result.gamma draft
    tokens a round, or with `tree_nodes` a token tree that deep (that many scored
    candidates, plus the drafter's own lookup branches), accepted along the path that
    follows the answer."""
    tokens, P, gamma = example.tokens.tolist(), example.prompt_len, result.gamma
    N = len(tokens)
    rng = torch.Generator().manual_seed(0)  # unused under greedy; the protocol wants one
    tree: TreeDraftSession | None = None
    if tree_nodes is not None:
        if not isinstance(session, TreeDraftSession):
            raise DraftError("this drafter cannot draft token trees")
        tree = session
    # the prefill: the prompt through the pipeline gives the first answer token
    session.extend(tokens[:P + 1], example.features[:P])
    n = P + 1
    while n < N:
        truth = tokens[n:n + gamma + 1]  # the target's greedy continuation
        if tree is None or tree_nodes is None:
            k = agreed(session.propose(gamma, GREEDY, rng).tokens, truth)
        else:
            k = descended(tree.propose_tree(gamma, tree_nodes), truth)
        if len(truth) == gamma + 1:  # a full round
            result.rounds += 1
            result.committed += k + 1
            for i in range(min(k + 1, gamma)):
                result.attempts[i] += 1
                result.accepted[i] += int(i < k)
        c = min(k + 1, N - n)  # accepted drafts and the target's own token
        session.extend(tokens[n:n + c], example.features[n - 1:n - 1 + c])
        n += c


def agreed(draft: Sequence[int], truth: Sequence[int]) -> int:
    """How many leading draft tokens greedy verification accepts: those equal to the
    target's, leaving the last of `truth` as the target's own."""
    k = 0
    while k < min(len(draft), len(truth) - 1) and draft[k] == truth[k]:
        k += 1
    return k


def descended(tree: TokenTree, truth: Sequence[int]) -> int:
    """How deep greedy verification goes down `tree`: at each node, the child equal to
    the target's next token (acceptance.verify_tree, on the target's known answer)."""
    node, k = -1, 0
    while k < len(truth) - 1:
        child = next((c for c in tree.children(node) if tree.tokens[c] == truth[k]), None)
        if child is None:
            break
        node, k = child, k + 1
    return k


def measure(drafter: Drafter, examples: Sequence[Example], gamma: int,
            tree_nodes: int | None = None,
            on_example: Callable[[], None] | None = None) -> Acceptance:
    result = Acceptance(gamma, attempts=[0] * gamma, accepted=[0] * gamma)
    for example in examples:
        replay(drafter.start(), example, result, tree_nodes)
        if on_example is not None:
            on_example()
    return result


def by_kind(drafters: dict[str, tuple[Drafter, int | None]], examples: Sequence[Example],
            gammas: Sequence[int], on_example: Callable[[], None] | None = None
            ) -> dict[str, dict[str, dict[str, Any]]]:
    """Held-out acceptance per drafter configuration ({name: (drafter, tree nodes or None
    for a chain)}) and γ (a tree's depth), per kind (the examples' `source`) and over
    all: {"eagle-chain@4": {"all": ..., "chat": ...}}."""
    kinds = sorted({e.source for e in examples})
    report: dict[str, dict[str, dict[str, Any]]] = {}
    for name, (drafter, nodes) in drafters.items():
        for gamma in gammas:
            parts = {kind: measure(drafter, [e for e in examples if e.source == kind], gamma,
                                   nodes, on_example) for kind in kinds}
            report[f"{name}@{gamma}"] = {
                "all": sum_acceptance(gamma, parts.values()).as_dict(),
                **{kind: a.as_dict() for kind, a in parts.items()}}
    return report


def compare(head: Head, eagle: EagleHead, examples: Sequence[Example],
            gammas: Sequence[int], vocab: Sequence[int] | None = None
            ) -> dict[str, dict[str, Any]]:
    """Held-out acceptance of the head (drafting over `vocab`) and of prompt lookup,
    overall ("eagle@5") and per prompt source ("eagle@5:gsm8k")."""
    sources = sorted({e.source for e in examples})
    report: dict[str, dict[str, Any]] = {}
    for name, drafter in (("eagle", EagleDrafter(head, eagle, vocab=vocab)),
                          ("ngram", NgramDrafter())):
        for gamma in gammas:
            parts = {src: measure(drafter, [e for e in examples if e.source == src], gamma)
                     for src in sources}
            report[f"{name}@{gamma}"] = sum_acceptance(gamma, parts.values()).as_dict()
            if len(parts) > 1:
                report.update({f"{name}@{gamma}:{src}": a.as_dict() for src, a in parts.items()})
    return report


def sum_acceptance(gamma: int, parts: Iterable[Acceptance]) -> Acceptance:
    total = Acceptance(gamma, attempts=[0] * gamma, accepted=[0] * gamma)
    for a in parts:
        total.rounds += a.rounds
        total.committed += a.committed
        total.attempts = [x + y for x, y in zip(total.attempts, a.attempts, strict=True)]
        total.accepted = [x + y for x, y in zip(total.accepted, a.accepted, strict=True)]
    return total
