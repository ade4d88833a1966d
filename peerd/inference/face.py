"""The typed face of the model a peer serves: what the API, Symphony's solver and the
systems to come (Echo's samplers, SEDM's replays, the planner's `ask` tool) call.

`ModelSlot.face()` gives a `LanguageModel` once the model is loaded (served.py
implements it over the runtime, the swarm's pipeline behind our head) and raises
`ModelUnavailable` until then. Everything here is torch-free: a caller imports it
whether or not its peer serves a model.

A request goes in two steps, so that a caller can refuse it before it streams anything:
`prepare_chat` / `prepare_text` tokenise it and settle everything that can refuse it
(the context length, the speculative options, the drafter, a route), and `complete`
decodes it into a `Completion`, streaming text to `on_text` if given. `chat` does
both. `generate` hands each raw token to a callback instead, for a caller that pauses
and resumes (the solver, around its calculator); `score` returns the log-probabilities
of a continuation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from peerd.inference.options import SamplingParams, SpeculativeOptions
from peerd.inference.request import (
    GenerationRequest,
    GenerationStats,
    Logprobs,
    OnToken,
    TokenConstraint,
    TokenLogprob,
)


class ModelUnavailable(Exception):
    """This peer cannot answer with a model now: it serves none, it is still loading, it
    failed to load (`state`), or it serves another model (`state` "other")."""

    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state


class Refused(Exception):
    """The request cannot be served as asked; `param` names what to change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class SwarmUnavailable(Exception):
    """The swarm cannot serve the request end to end now: `code` is "missing_layers"
    (nobody serves some layers), "saturated" (the peers that do have no room now, their
    capacity shared fairly among the peers asking: try again in `retry_after_s`) or
    "pipeline_failed" (every route tried failed)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Completion:
    """What a request produced: its text (cut before a stop string), how it went, and
    the log-probabilities of its tokens when they were asked for (the token that
    completed a stop string is not among them)."""

    text: str
    stats: GenerationStats
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


# Streamed text: (the new text, the log-probabilities of the tokens it completes);
# returns False to stop (the caller went away).
OnText = Callable[[str, Sequence[TokenLogprob]], Awaitable[bool]]
Message = Mapping[str, str]  # {"role": ..., "content": ...}


class LanguageModel(Protocol):
    """The model this peer serves, through the swarm."""

    @property
    def model_id(self) -> str: ...

    @property
    def max_length(self) -> int:  # positions a request's prompt and answer may take
        ...

    @property
    def default_speculative(self) -> SpeculativeOptions: ...

    @property
    def tokenizer(self) -> Any:  # the model's (Hugging Face) tokenizer: what a constraint
        ...  # over tokens is built from

    def can_serve(self) -> bool:
        """The swarm covers every layer now (a route exists)."""
        ...

    async def prepare_chat(self, messages: Sequence[Message], params: SamplingParams,
                           speculative: SpeculativeOptions | None = None
                           ) -> GenerationRequest:
        """Messages through the model's chat template, ready to decode. Refused,
        SwarmUnavailable."""
        ...

    async def prepare_text(self, prompt: str, params: SamplingParams,
                           speculative: SpeculativeOptions | None = None
                           ) -> GenerationRequest:
        """A raw prompt (with the tokenizer's special tokens), ready to decode."""
        ...

    async def prepare(self, prompt_ids: Sequence[int], params: SamplingParams,
                      speculative: SpeculativeOptions | None = None) -> GenerationRequest:
        """Token ids, ready to decode."""
        ...

    async def complete(self, request: GenerationRequest, *, on_text: OnText | None = None,
                       logprobs: int | None = None,
                       constraint: TokenConstraint | None = None) -> Completion:
        """Decode a prepared request; `logprobs`: that many alternatives per token
        (None: no log-probabilities); `constraint`: only the tokens it allows, plain
        decoding, ending when it is finished (peerd/plans/constrain.py).
        SwarmUnavailable."""
        ...

    async def chat(self, messages: Sequence[Message], params: SamplingParams,
                   speculative: SpeculativeOptions | None = None) -> Completion:
        """prepare_chat, then complete."""
        ...

    async def generate(self, request: GenerationRequest, on_token: OnToken, *,
                       reuse_prefix: bool = False,
                       logprobs: Logprobs | None = None,
                       constraint: TokenConstraint | None = None) -> GenerationStats:
        """Decode, handing each raw token id to `on_token` (False stops).
        `reuse_prefix`: start from a pooled session holding the longest prefix of the
        prompt (a chain resumed after a pause). SwarmUnavailable."""
        ...

    async def score(self, prompt_ids: Sequence[int], tokens: Sequence[int]) -> list[float]:
        """log p(tokens[i] | prompt + tokens[:i]), in one pass. SwarmUnavailable."""
        ...

    async def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """The token ids the chat template makes of `messages`. Refused."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (special tokens skipped)."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for."""
        ...
