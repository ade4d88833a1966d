"""What a request may ask of the model, and the limits on it: sampling and speculative
decoding options, each limit defined once.

Torch-free on purpose: config.py, the API and the CLI validate these without loading
torch; the decoding code imports them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_NEW_TOKENS = 1 << 16  # what one request may generate
MAX_TEMPERATURE = 10.0
MAX_STOPS = 8  # stop strings per request
MAX_STOP_CHARS = 200  # characters per stop string
MAX_TOP_LOGPROBS = 20  # alternatives reported per position, as OpenAI allows
MAX_COMPLETION_LOGPROBS = 5  # the same in the legacy completions API

DRAFT_KINDS = ("none", "ngram", "eagle", "eagle:PATH", "model:SPEC")
VERIFY_MODES = ("greedy", "sample", "adaptive")  # the rules acceptance.py implements
VERIFY_CHOICES = ("auto", *VERIFY_MODES)  # auto: greedy at temperature 0, else sample
MAX_GAMMA = 16  # tokens a chain drafts per round (a tree: its depth)


def spoken(choices: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c", for help texts and errors."""
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if len(self.stop) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS
                                             for s in self.stop):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings of at most "
                             f"{MAX_STOP_CHARS} characters")


@dataclass(frozen=True, slots=True)
class SpeculativeOptions:
    """How a request decodes speculatively (DSD): who drafts, how the target verifies,
    how many tokens a round drafts. `draft="none"` is plain decoding."""

    draft: str = "none"  # one of DRAFT_KINDS
    verify: str = "auto"  # auto: greedy at temperature 0, else sample; or adaptive
    gamma: int | None = None  # None: auto, chosen per session from measured rounds
    # draft a token tree (several candidates per position, one pass) where the drafter
    # can (eagle) and verification is greedy or adaptive; else a chain
    tree: bool = True

    def __post_init__(self) -> None:
        kind, _, arg = self.draft.partition(":")
        if kind not in ("none", "ngram", "eagle", "model") or (kind == "model" and not arg) \
                or (kind in ("none", "ngram") and arg) or len(self.draft) > 1000:
            raise ValueError(f"unknown drafter {self.draft[:100]!r}: use one of "
                             f"{', '.join(DRAFT_KINDS)}")
        if self.verify not in VERIFY_CHOICES:
            raise ValueError(f"unknown verification {self.verify[:100]!r}: use one of "
                             f"{', '.join(VERIFY_CHOICES)}")
        if self.gamma is not None and (isinstance(self.gamma, bool)
                                       or not 1 <= self.gamma <= MAX_GAMMA):
            raise ValueError(f"gamma must be an integer in 1..{MAX_GAMMA} or auto")
        if not isinstance(self.tree, bool):
            raise ValueError("tree must be true or false")

    @property
    def enabled(self) -> bool:
        return self.draft != "none"

    @classmethod
    def parse_flag(cls, value: str) -> SpeculativeOptions:
        """`peerd start --speculative DRAFT[,VERIFY[,GAMMA]]`, e.g. `eagle,adaptive`."""
        parts = [p.strip() for p in value.split(",")] if value else ["none"]
        if len(parts) > 3:
            raise ValueError("use DRAFT[,VERIFY[,GAMMA]], e.g. eagle or ngram,greedy,4")
        gamma = None
        if len(parts) == 3 and parts[2] != "auto":
            if not parts[2].isdigit():
                raise ValueError(f"gamma must be an integer in 1..{MAX_GAMMA} or auto")
            gamma = int(parts[2])
        return cls(parts[0], parts[1] if len(parts) > 1 else "auto", gamma)

    def to_json(self) -> dict[str, Any]:
        return {"draft": self.draft, "verify": self.verify,
                "gamma": "auto" if self.gamma is None else self.gamma, "tree": self.tree}
