"""The entry peer's drafters, by `draft` option, built on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peerd.inference.model.head import Head
from peerd.inference.model.source import (
    ModelError,
    load_config,
    load_tokenizer,
    reference_model,
    resolve,
)
from peerd.inference.speculative.draft_model import ModelDrafter
from peerd.inference.speculative.drafters import Drafter, DraftError
from peerd.inference.speculative.eagle_file import default_eagle_path, load_eagle
from peerd.inference.speculative.ngram import NgramDrafter


class DrafterCatalog:
    """`draft` option -> Drafter for one target model; each is built once (loading a
    draft model or head takes seconds) and shared by every request."""

    def __init__(self, head: Head, tokenizer: Any, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.head = head
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self._built: dict[str, Drafter] = {}

    def get(self, draft: str) -> Drafter:
        """Build (or reuse) the drafter; DraftError says why one cannot be had."""
        if draft not in self._built:
            self._built[draft] = self._build(draft)
        return self._built[draft]

    def _build(self, draft: str) -> Drafter:
        kind, _, arg = draft.partition(":")
        if kind == "ngram":
            return NgramDrafter()
        if kind == "eagle":
            model_id = self.head.model_id
            path = Path(arg).expanduser() if arg else default_eagle_path(model_id)
            if path is None:
                raise DraftError(f"no EAGLE head ships for {model_id}; train one with "
                                 f"`peerd draft train --model SPEC --out PATH` and ask for "
                                 f"eagle:PATH")
            return load_eagle(path, self.head)
        if kind == "model":
            return self._draft_model(arg)
        raise DraftError(f"unknown drafter {draft!r}")

    def _draft_model(self, spec: str) -> ModelDrafter:
        try:
            source = resolve(spec)
            config = load_config(source)
            theirs = load_tokenizer(source)
        except ModelError as exc:
            raise DraftError(f"draft model {spec!r}: {exc}") from None
        vocab = self.head.vocab_size
        if int(config.vocab_size) != vocab or theirs.get_vocab() != self.tokenizer.get_vocab():
            raise DraftError(f"draft model {spec!r} has another vocabulary than the target "
                             f"({int(config.vocab_size)} vs {vocab} entries, or different "
                             f"tokens): a drafter must share the target's tokenizer")
        model = reference_model(source, device=self.device, dtype=self.dtype)
        return ModelDrafter(model, f"model:{spec}")
