"""Head: the two ends of the model that stay with the entry peer.

Token ids go in through the embeddings, hidden states come back through the final
norm and lm_head. They are small next to the decoder layers (SmolLM2: one 49152 x 576
matrix, shared by both ends), and keeping them at the entry peer means tokens and
logits never cross the network: only hidden states do. The entry peer also runs the
speculative draft, which needs the logits here.

Only these tensors are read from the checkpoint; lm_head is the embedding matrix
itself when the config ties them (SmolLM2 does; llama.cpp then omits output.weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peerd.inference.model.source import ModelSource, architecture, load_config
from peerd.inference.model.weights import read_tensors


class Head(nn.Module):
    """Embeddings, final norm and lm_head of `source`."""

    def __init__(self, source: ModelSource, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, config: Any = None) -> None:
        super().__init__()
        config = config if config is not None else load_config(source)
        arch = architecture(config)
        self.source = source
        self.model_id = source.model_id
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.dtype = dtype
        self.device = torch.device(device)

        with torch.device("meta"):  # shapes only: the checkpoint supplies every value
            self.embed_tokens = nn.Embedding(self.vocab_size, self.hidden_size,
                                             getattr(config, "pad_token_id", None))
            self.norm = arch.norm(self.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(self.hidden_size, self.vocab_size, bias=False)
        names = {"embed_tokens.weight": "model.embed_tokens.weight",
                 "norm.weight": "model.norm.weight"}
        if not self.tied:
            names["lm_head.weight"] = "lm_head.weight"
        tensors = read_tensors(source, config, list(names.values()), dtype=dtype,
                               device=self.device)
        state = {mine: tensors[theirs] for mine, theirs in names.items()}
        # strict unless tied: then lm_head.weight is not read but shared, just below
        self.load_state_dict(state, strict=not self.tied, assign=True)
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight  # one matrix, two uses
        self.eval().requires_grad_(False)

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [B, T] -> hidden states [B, T, H] (the first shard's input)."""
        ids = token_ids.to(device=self.device, dtype=torch.long)  # [B, T]
        out: torch.Tensor = self.embed_tokens(ids)  # [B, T, H]
        return out

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden states [B, T, H] (the last shard's output) -> logits [B, T, V], float32
        so sampling and verification see the same numbers whatever the compute dtype."""
        x = hidden.to(device=self.device, dtype=self.dtype)  # [B, T, H]
        x = self.norm(x)  # [B, T, H]
        out: torch.Tensor = self.lm_head(x)  # [B, T, V]
        return out.float()

    def extra_repr(self) -> str:
        tied = ", lm_head tied to embeddings" if self.tied else ""
        return f"{self.model_id}: vocab {self.vocab_size}, hidden {self.hidden_size}{tied}"
