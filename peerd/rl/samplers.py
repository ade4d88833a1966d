"""The trainer's view of its samplers: who they are, which to ask, who is dropped.

A sampler is a peer whose ledger entry advertises the rollout feature and serves our
model whole (the same model id, every layer), or serves a slice of it and advertises
the pipeline sampler's feature too (it samples through a pipeline of rollout shards).
A sampler that fails a request is asked again later; one that fails `MAX_FAILURES`
requests in a row, or is caught lying, is dropped for the rest of the run (a lie is
also an offence on the node). Each answered request moves the sampler's rate (prompts
a second, a moving average), by which the trainer shares a step out (slots.share_of).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from peerd.ledger.book import Ledger
from protocols.ledger import LedgerEntry
from protocols.rollout import FEATURE_PIPELINE_SAMPLER

MAX_FAILURES = 3
RATE_WEIGHT = 0.5  # of a sampler's latest request in its moving average of prompts/s


def serves_whole(entry: LedgerEntry, model_id: str) -> bool:
    return any(m.model_id == model_id and m.layer_start == 0 and m.num_layers > 0
               and m.layer_end == m.num_layers for m in entry.models)


def samples(entry: LedgerEntry, model_id: str) -> bool:
    """Whether the peer can sample our model: whole, or through a pipeline."""
    return serves_whole(entry, model_id) or (
        FEATURE_PIPELINE_SAMPLER in entry.features
        and any(m.model_id == model_id for m in entry.models))


@dataclass
class SamplerPool:
    book: Ledger
    model_id: str
    feature: str  # the ledger feature a sampler advertises
    own_id: str
    dropped: dict[str, str] = field(default_factory=dict)  # peer -> why
    failures: Counter[str] = field(default_factory=Counter)  # in a row
    rates: dict[str, float] = field(default_factory=dict)  # peer -> prompts a second

    def found(self) -> list[str]:
        """Samplers in the ledger now, not dropped, sorted (a stable order)."""
        return sorted(e.peer_id for e in self.book.entries()
                      if self.feature in e.features and samples(e, self.model_id)
                      and e.peer_id not in self.dropped)

    def failed(self, peer: str, why: str) -> bool:
        """Count a failed request; True when the sampler is dropped for it."""
        self.failures[peer] += 1
        if self.failures[peer] >= MAX_FAILURES:
            self.dropped[peer] = f"{MAX_FAILURES} failures in a row, the last: {why}"
            return True
        return False

    def dtype(self, peer: str) -> str:
        """The dtype the sampler says it computes in ("" if unknown)."""
        entry = self.book.get(peer)
        for m in entry.models if entry is not None else ():
            if m.model_id == self.model_id:
                return m.dtype
        return ""

    def served(self, peer: str, prompts: int, seconds: float) -> None:
        """A request of `prompts` prompts answered in `seconds`."""
        self.failures.pop(peer, None)
        rate = prompts / max(seconds, 1e-3)
        old = self.rates.get(peer)
        self.rates[peer] = rate if old is None else RATE_WEIGHT * rate + (1 - RATE_WEIGHT) * old

    def drop(self, peer: str, why: str) -> None:
        self.dropped[peer] = why
