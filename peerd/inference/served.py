"""`ServedModel`: the typed face (face.py) over a loaded runtime: its tokenizer and chat
template, its generator (the swarm's pipeline behind our head) and its limits.

It turns the generator's own errors into the face's: `NoCoverage` into
SwarmUnavailable("missing_layers"), `Saturated` (every route through peers with no
room now) into SwarmUnavailable("saturated") with a retry delay,
`GenerationFailed` into SwarmUnavailable("pipeline_failed"), `DraftError` and a prompt
longer than a session holds into Refused. Tokenising and the chat template run in a
worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from peerd.inference.face import Completion, Message, OnText, Refused, SwarmUnavailable
from peerd.inference.generate import GenerationFailed, NoCoverage, Saturated
from peerd.inference.options import SamplingParams, SpeculativeOptions
from peerd.inference.request import (
    GenerationRequest,
    GenerationStats,
    Logprobs,
    OnToken,
    TokenConstraint,
    TokenLogprob,
)
from peerd.inference.speculative.drafters import DraftError
from peerd.inference.swarm.routing import NoRoute
from peerd.inference.text import TextStream, token_bytes

if TYPE_CHECKING:
    from peerd.inference.runtime import ModelRuntime


class ServedModel:
    """The model this peer serves, through the swarm (a `LanguageModel`)."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.generator = runtime.generator
        self.tokenizer = runtime.tokenizer

    @property
    def model_id(self) -> str:
        return self.runtime.model_id

    @property
    def max_length(self) -> int:
        return self.runtime.server.limits.max_length

    @property
    def default_speculative(self) -> SpeculativeOptions:
        return self.generator.default_speculative

    def can_serve(self) -> bool:
        return not isinstance(self.generator.route(), NoRoute)

    # ---- tokens ---------------------------------------------------------------------

    async def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        tok = self.tokenizer
        try:
            text = await trio.to_thread.run_sync(
                lambda: tok.apply_chat_template(list(messages), add_generation_prompt=True,
                                                tokenize=False))
        except Exception as exc:  # templates may raise on what they do not accept
            raise Refused("messages", "the model's chat template refused these messages: "
                          f"{exc}") from None
        return await trio.to_thread.run_sync(
            lambda: list(tok(text, add_special_tokens=False)["input_ids"]))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_bytes(self, token: int) -> bytes:
        return token_bytes(self.tokenizer, token)

    # ---- requests -------------------------------------------------------------------

    async def prepare_chat(self, messages: Sequence[Message], params: SamplingParams,
                           speculative: SpeculativeOptions | None = None
                           ) -> GenerationRequest:
        return await self.prepare(await self.chat_ids(messages), params, speculative)

    async def prepare_text(self, prompt: str, params: SamplingParams,
                           speculative: SpeculativeOptions | None = None
                           ) -> GenerationRequest:
        tok = self.tokenizer
        ids = await trio.to_thread.run_sync(
            lambda: list(tok(prompt, add_special_tokens=True)["input_ids"]))
        return await self.prepare(ids, params, speculative)

    async def prepare(self, prompt_ids: Sequence[int], params: SamplingParams,
                      speculative: SpeculativeOptions | None = None) -> GenerationRequest:
        limit = self.max_length
        if len(prompt_ids) + params.max_tokens > limit:
            raise Refused("max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                          f"({params.max_tokens}) exceed the context of {limit} positions")
        try:
            return await self.generator.prepare(prompt_ids, params, speculative)
        except NoCoverage as exc:
            raise SwarmUnavailable("missing_layers", f"the swarm cannot serve "
                                   f"{self.model_id} end to end: no peer serves layers "
                                   f"{exc.layers}") from None
        except Saturated as exc:
            raise self._unavailable(exc) from None
        except DraftError as exc:
            raise Refused("speculative", f"speculative: {exc}") from None

    async def complete(self, request: GenerationRequest, *, on_text: OnText | None = None,
                       logprobs: int | None = None,
                       constraint: TokenConstraint | None = None) -> Completion:
        """The text is re-decoded as tokens arrive and released once final (text.py);
        `on_text` gets each released piece with the entries of the tokens not yet
        sent. Pooled sessions' prompt prefixes are reused where the prompt cache is
        on (--prompt-cache; by default where that is safe: Generator.reuses_prompts)."""
        text = TextStream(self.decode, request.params.stop)
        asked = None if logprobs is None else Logprobs(top=logprobs)
        reported: list[TokenLogprob] = []
        unsent = 0  # reported[unsent:] has not been streamed yet

        async def on_token(token: int) -> bool:
            nonlocal unsent
            delta = text.push(token)
            if asked is not None and not text.stopped:
                reported.append(asked.entries[-1])
            if delta and on_text is not None:
                if not await on_text(delta, reported[unsent:]):
                    return False
                unsent = len(reported)
            return not text.stopped

        stats = await self.generate(request, on_token,
                                    reuse_prefix=self.generator.reuses_prompts(request.route),
                                    logprobs=asked, constraint=constraint)
        rest = text.flush()
        if (rest or unsent < len(reported)) and on_text is not None:
            await on_text(rest, reported[unsent:])
        return Completion(text.text(), stats, tuple(reported))

    async def chat(self, messages: Sequence[Message], params: SamplingParams,
                   speculative: SpeculativeOptions | None = None) -> Completion:
        return await self.complete(await self.prepare_chat(messages, params, speculative))

    async def generate(self, request: GenerationRequest, on_token: OnToken, *,
                       reuse_prefix: bool = False,
                       logprobs: Logprobs | None = None,
                       constraint: TokenConstraint | None = None) -> GenerationStats:
        try:
            return await self.generator.generate(request, on_token, reuse_prefix=reuse_prefix,
                                                 logprobs=logprobs, constraint=constraint)
        except (NoCoverage, GenerationFailed) as exc:
            raise self._unavailable(exc) from None

    async def score(self, prompt_ids: Sequence[int], tokens: Sequence[int]) -> list[float]:
        try:
            return await self.generator.score(list(prompt_ids), list(tokens))
        except (NoCoverage, GenerationFailed) as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: NoCoverage | GenerationFailed) -> SwarmUnavailable:
        if isinstance(exc, NoCoverage):
            return SwarmUnavailable("missing_layers", f"the swarm cannot serve "
                                    f"{self.model_id} end to end: {exc}")
        if isinstance(exc, Saturated):
            return SwarmUnavailable("saturated", f"{exc}; try again in "
                                    f"{exc.retry_after_s:.0f} s", exc.retry_after_s)
        return SwarmUnavailable("pipeline_failed", str(exc))
