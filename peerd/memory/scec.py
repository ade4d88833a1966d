"""The self-contained execution context (SCEC) of a scored run: build one, name it by
its hash, encode and decode it.

A `Task` is what a run is asked (the user's prompt, the reference answer, the scorer,
the domain); an SCEC (`protocols.memory.ScecMsg`) is a task as one run went: the
model and version, the sampling and seed, the memory it was given, the output and its
score. Replaying one (replay.py) runs the same prompt, memory and sampling again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from peerd.inference.options import SamplingParams
from protocols.codec import decode, encode
from protocols.errors import WireError
from protocols.memory import ScecMsg


@dataclass(frozen=True, slots=True)
class Task:
    """A scorable task: `prompt` is the user's text, before any memory goes in."""

    prompt: str
    answer: str  # the reference
    scorer: str = "number"  # a name in scoring.py
    domain: str = "general"


def build(task: Task, *, model: str, version: str, params: SamplingParams,
          memory: Sequence[str], memory_ids: Sequence[str] = (), output: str,
          score: float, prompt_tokens: int, latency_s: float) -> ScecMsg:
    """The SCEC of one run of `task`. Raises WireError when a field is out of bounds
    (a prompt or output too long to keep, a score outside [0, 1]): the caller keeps no
    SCEC of that run."""
    scec = ScecMsg(prompt=task.prompt, domain=task.domain, model=model, version=version,
                   max_tokens=params.max_tokens, temperature=params.temperature,
                   top_p=params.top_p, seed=params.seed, stop=tuple(params.stop),
                   memory=tuple(memory), memory_ids=tuple(memory_ids), answer=task.answer,
                   scorer=task.scorer, output=output, score=score,
                   prompt_tokens=prompt_tokens, latency_s=latency_s)
    scec.check()
    return scec


def task_of(scec: ScecMsg) -> Task:
    return Task(prompt=scec.prompt, answer=scec.answer, scorer=scec.scorer,
                domain=scec.domain)


def params_of(scec: ScecMsg, *, greedy: bool = False) -> SamplingParams:
    """The sampling the run used; `greedy`: the same with temperature 0 (the seed is
    kept, though greedy decoding does not draw on it)."""
    try:
        return SamplingParams(max_tokens=scec.max_tokens,
                              temperature=0.0 if greedy else scec.temperature,
                              top_p=1.0 if greedy else scec.top_p, seed=scec.seed,
                              stop=scec.stop)
    except ValueError as exc:  # check() bounds the fields; SamplingParams may be stricter
        raise WireError(f"SCEC sampling: {exc}") from None


def encode_scec(scec: ScecMsg) -> bytes:
    """Canonical bytes: the same SCEC always gives the same bytes, and so the same hash."""
    return encode(scec)


def decode_scec(data: bytes) -> ScecMsg:
    """An SCEC from its bytes (the store's, or a peer's): WireError when malformed or
    out of bounds."""
    scec = decode(data, ScecMsg)
    scec.check()
    return scec


def scec_hash(scec: ScecMsg) -> str:
    """sha256 hex of the canonical bytes: an item's `origin`."""
    return hashlib.sha256(encode_scec(scec)).hexdigest()
