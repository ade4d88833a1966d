"""A generation request once it is prepared, and what its generation reports.

`Generator.prepare` turns (prompt ids, sampling, speculative options) into a
`GenerationRequest`: everything that can refuse the request is settled there, before
a token is streamed. `Generator.generate` decodes it and returns `GenerationStats`.

Torch-free: the API reads these types without loading the model's code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from peerd.inference.options import MAX_TOP_LOGPROBS, SamplingParams, SpeculativeOptions
from peerd.inference.swarm.routing import Route

if TYPE_CHECKING:
    import torch

    from peerd.inference.speculative.drafters import Drafter

# Called with each new token id; returns False to stop (a stop string was reached).
OnToken = Callable[[int], Awaitable[bool]]


class TokenConstraint(Protocol):
    """What a constrained generation may write (peerd/plans/constrain.py builds one from
    a grammar): the mask applies before sampling; decoding stops once the constraint
    is finished. No drafter drafts under it; greedy decoding drafts the tokens the
    constraint forces (`forced`), verified under each position's mask (`fork`)."""

    def allowed_mask(self, remaining_tokens: int) -> torch.Tensor:
        """[V] bool: the tokens that may come next, `remaining_tokens` (this one
        included) being all that may still be generated."""
        ...

    def advance(self, token_id: int) -> None:
        """Take the token chosen (one the mask allowed)."""
        ...

    @property
    def finished(self) -> bool:
        """Nothing more may be written: generation ends."""
        ...

    def forced(self, limit: int) -> list[int]:
        """At most `limit` tokens spelling text that must come next (maybe none)."""
        ...

    def fork(self) -> TokenConstraint:
        """A copy to advance without moving this one."""
        ...


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A committed token's log-probability under the model's own distribution (its
    logits' log-softmax: before temperature and top-p, as vLLM reports them by
    default), and the `top` most likely tokens at that position, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Logprobs:
    """Where a generation reports its tokens' log-probabilities: one entry per token
    handed to on_token, appended just before the call (so a streaming caller reads
    entries[-1]). `top` alternatives per position, 0..MAX_TOP_LOGPROBS."""

    top: int = 0
    entries: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top log-probabilities must be between 0 and {MAX_TOP_LOGPROBS}")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A request the swarm can serve as asked: its speculative options defaulted and
    checked against its sampling, its drafter built, its first route found."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    speculative: SpeculativeOptions
    verify: str  # the rule verification applies: greedy | sample | adaptive
    drafter: Drafter | None  # None: plain decoding
    route: Route  # the route the first pipeline session takes (later ones route again)


@dataclass(frozen=True, slots=True)
class Round:
    """One decoding round: drafted γ, kept `accepted`, where its time went."""

    drafted: int  # the draft's depth (its length, for a chain)
    accepted: int
    draft_ms: float
    pipeline_ms: float
    nodes: int = 0  # draft tokens sent (more than `drafted` for a tree)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    route: list[dict[str, Any]] = field(default_factory=list)
    pipeline_ms: float = 0.0  # wall time inside pipeline steps
    compute_ms: float = 0.0  # of which the shards computed
    head_ms: float = 0.0  # embeddings, lm_head, sampling and verification at the entry peer
    draft_ms: float = 0.0  # drafting at the entry peer
    wall_ms: float = 0.0
    steps: int = 0  # pipeline passes (the prompt's included)
    cached_tokens: int = 0  # prompt tokens whose KV a pooled session already held
    reroutes: int = 0
    finish_reason: str = "length"
    draft: str = "none"
    verify: str = "greedy"
    tree: bool = False  # drafts were token trees
    rounds: list[Round] = field(default_factory=list)  # decoding rounds (not the prompt's)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.wall_ms / 1e3) if self.wall_ms > 0 else 0.0

    def speculative_json(self) -> dict[str, Any]:
        n = len(self.rounds)
        drafted = sum(r.drafted for r in self.rounds)
        accepted = sum(r.accepted for r in self.rounds)
        by_position = [0] * max((r.drafted for r in self.rounds), default=0)
        for r in self.rounds:
            for i in range(r.accepted):
                by_position[i] += 1
        tried = [sum(1 for r in self.rounds if r.drafted > i) for i in range(len(by_position))]
        return {
            "draft": self.draft, "verify": self.verify, "rounds": n,
            "drafted_tokens": drafted, "accepted_tokens": accepted,
            # tokens committed per pipeline pass: accepted drafts + the target's own token
            "tokens_per_round": round((accepted + n) / n, 3) if n else 0.0,
            "accepted_per_round": round(accepted / n, 3) if n else 0.0,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
            # share of rounds that drafted position i where it was accepted
            "acceptance_by_position": [round(a / t, 3) if t else 0.0
                                       for a, t in zip(by_position, tried, strict=True)],
            "mean_gamma": round(drafted / n, 3) if n else 0.0,
            "tree": self.tree,  # then gamma is the depth, and nodes what was sent
            "mean_nodes": round(sum(r.nodes for r in self.rounds) / n, 3) if n else 0.0,
            "draft_ms": round(self.draft_ms, 3), "pipeline_ms": round(self.pipeline_ms, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route, "tokens_per_s": round(self.tokens_per_s, 3),
            "pipeline_ms": round(self.pipeline_ms, 3), "compute_ms": round(self.compute_ms, 3),
            "head_ms": round(self.head_ms, 3), "draft_ms": round(self.draft_ms, 3),
            "wall_ms": round(self.wall_ms, 3), "steps": self.steps, "reroutes": self.reroutes,
            "cached_tokens": self.cached_tokens,
            "speculative": self.speculative_json(),
        }
