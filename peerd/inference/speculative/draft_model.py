"""The `model:<SPEC>` drafter: a small causal LM with the target's tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from peerd.inference.options import SamplingParams
from peerd.inference.speculative.drafters import Draft, DraftBuilder


class ModelDrafter:
    """Any small causal LM sharing the target's vocabulary drafts autoregressively with
    its own KV cache (rolled back after each proposal)."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name

    def start(self) -> ModelSession:
        return ModelSession(self.model)


class ModelSession:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache = DynamicCache(config=getattr(model, "config", None))
        self.tokens: list[int] = []
        self.cached = 0  # committed tokens whose keys and values the cache holds

    def extend(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        self.tokens.extend(tokens)

    def _forget(self) -> None:
        """Drop cached positions past the committed ones."""
        extra = self.cache.get_seq_length() - self.cached
        if extra > 0:
            self.cache.crop(-extra)

    @torch.inference_mode()
    def _logits(self, ids: list[int]) -> torch.Tensor:
        """Feed `ids` after the cache; the last position's logits [V]."""
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), cache=self.cache,
                         use_cache=True, logits_to_keep=1)  # the last position's only
        logits: torch.Tensor = out.logits[0, -1].float()  # [V]
        return logits

    @torch.inference_mode()
    def propose(self, gamma: int, params: SamplingParams, rng: torch.Generator) -> Draft:
        if gamma < 1 or not self.tokens:
            return Draft([])
        # Bring the cache up to all committed tokens (the last one yields the 1st guess).
        self._forget()
        logits = self._logits(self.tokens[self.cached:])
        self.cached = len(self.tokens)
        draft = DraftBuilder(params, rng)
        for i in range(gamma):
            token = draft.add(logits)
            if i + 1 < gamma:
                logits = self._logits([token])
        self._forget()  # the guesses
        return draft.build()
