"""How well a drafter would do on held-out answers: speculative rounds replayed along
the target's greedy answers with greedy verification (the longest draft prefix the
target agrees with, plus the target's own next token), for an EAGLE head against
prompt lookup on the same answers. No pipeline: the answers carry the features."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peerd.inference.model.head import Head
from peerd.inference.options import SamplingParams
from peerd.inference.speculative.drafters import Drafter, DraftSession
from peerd.inference.speculative.eagle import EagleDrafter, EagleHead
from peerd.inference.speculative.eagle_data import Example
from peerd.inference.speculative.ngram import NgramDrafter

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



def replay(session: DraftSession, example: Example, result: Acceptance) -> None:
    """Speculative rounds along `example` (the target's greedy answer) with greedy
    verification; adds the full rounds to `result`."""
    tokens, P, gamma = example.tokens.tolist(), example.prompt_len, result.gamma
    N = len(tokens)
    rng = torch.Generator().manual_seed(0)  # unused under greedy; the protocol wants one
    # the prefill: the prompt through the pipeline gives the first answer token
    session.extend(tokens[:P + 1], example.features[:P])
    n = P + 1
    while n < N:
        draft = session.propose(gamma, GREEDY, rng).tokens
        truth = tokens[n:n + gamma + 1]  # the target's greedy continuation
        k = 0
        while k < min(len(draft), len(truth) - 1) and draft[k] == truth[k]:
            k += 1
        if len(truth) == gamma + 1:  # a full round
            result.rounds += 1
            result.committed += k + 1
            for i in range(min(k + 1, gamma)):
                result.attempts[i] += 1
                result.accepted[i] += int(i < k)
        c = min(k + 1, N - n)  # accepted drafts and the target's own token
        session.extend(tokens[n:n + c], example.features[n - 1:n - 1 + c])
        n += c


def measure(drafter: Drafter, examples: Sequence[Example], gamma: int) -> Acceptance:
    result = Acceptance(gamma, attempts=[0] * gamma, accepted=[0] * gamma)
    for example in examples:
        replay(drafter.start(), example, result)
    return result


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
