"""Which holder to ask for which chunks while pulling a version (sans I/O).

A `ChunkPlan` hands out batches of missing chunks, one holder per batch, and hears back
what came of each. The rules:
- spread the load: the holder with the fewest of our requests in flight gets the next
  batch; the author (the trainer) counts one request more than it has, so peers that
  already hold chunks serve first and the trainer's upload does not grow with the
  number of samplers; ties are broken at random, so pullers do not all pick alike;
- a holder that did not have a chunk is not asked for it again in this pull;
- a holder that failed (sent a bad chunk, answered garbage, broke or timed out) is
  not asked again in this pull; its chunks go back to the queue;
- the plan is stuck when chunks remain that no usable holder has yet been asked for
  and nothing is in flight: the pull fails, naming them.
New holders (a `Have` heard mid-pull) join with `add_holder`, at most `max_holders`
besides the author: a version's holders are capped (announce.py), but fresh keys take
the stalest one's place there, so without a cap here the plan grew with every Have for
as long as the pull ran. When full, a newcomer takes a failed holder's place (never to
be asked again anyway) while fewer than `max_holders` have failed; a failed holder does
not rejoin.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping

AUTHOR_PENALTY = 1  # requests in flight the author is deemed to have beyond its own


class ChunkPlan:
    def __init__(self, sizes: Mapping[bytes, int], holders: Iterable[str], *,
                 author: str | None, rng: random.Random | None = None,
                 max_in_flight: int = 8, per_holder: int = 2,
                 batch_bytes: int = 4 * 1024 * 1024, batch_chunks: int = 64,
                 max_holders: int = 64) -> None:
        self.rng = rng or random.Random()
        self.sizes = dict(sizes)  # the chunks to fetch -> their lengths
        self.pending = list(self.sizes)
        self.rng.shuffle(self.pending)  # pullers fetch in different orders: they can
        # serve each other what they already hold
        self.holders: list[str] = []
        self.author = author
        self.tried: dict[bytes, set[str]] = {}
        self.failed: set[str] = set()
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight = max_in_flight
        self.per_holder = per_holder
        self.batch_bytes = batch_bytes
        self.batch_chunks = batch_chunks
        self.max_holders = max_holders  # besides the author
        for h in holders:
            self.add_holder(h)

    def add_holder(self, peer: str) -> None:
        if peer in self.holders or peer in self.failed:
            return
        if peer != self.author and len(self.holders) - (self.author in self.holders) \
                >= self.max_holders:
            gone = next((p for p in self.holders if p in self.failed and p != self.author),
                        None)
            if gone is None or len(self.failed) >= self.max_holders:
                return  # full of holders still worth asking, or too many have failed
            self.holders.remove(gone)  # (it stays in `failed`: not asked again)
        self.holders.append(peer)

    @property
    def finished(self) -> bool:
        return not self.pending and not self.in_flight

    @property
    def busy(self) -> int:
        return sum(self.in_flight.values())

    def next(self) -> tuple[str, list[bytes]] | None:
        """(holder, chunks) to ask for now, or None: nothing to hand out until a batch
        in flight comes back or a holder joins (or ever: see `stuck`)."""
        if not self.pending or self.busy >= self.max_in_flight:
            return None
        usable = [p for p in self.holders
                  if p not in self.failed and self.in_flight[p] < self.per_holder]
        self.rng.shuffle(usable)
        usable.sort(key=lambda p: self.in_flight[p] + (AUTHOR_PENALTY if p == self.author
                                                       else 0))
        for peer in usable:
            batch = self._batch_for(peer)
            if batch:
                self.in_flight[peer] += 1
                return peer, batch
        return None

    def _batch_for(self, peer: str) -> list[bytes]:
        batch: list[bytes] = []
        size = 0
        for h in self.pending:
            if peer in self.tried.get(h, ()):
                continue
            if batch and (size + self.sizes[h] > self.batch_bytes
                          or len(batch) >= self.batch_chunks):
                break
            batch.append(h)
            size += self.sizes[h]
        taken = set(batch)
        self.pending = [h for h in self.pending if h not in taken]
        return batch

    def returned(self, peer: str, got: Iterable[bytes], missing: Iterable[bytes]) -> None:
        """`peer` answered: `got` arrived intact; it does not hold `missing`."""
        self._leave(peer)
        for h in got:
            self.tried.pop(h, None)
        for h in missing:
            self.tried.setdefault(h, set()).add(peer)
            self.pending.append(h)

    def fail(self, peer: str, batch: Iterable[bytes], got: Iterable[bytes] = ()) -> None:
        """`peer` failed this batch (what arrived intact in `got` is kept); it is not
        asked again in this pull."""
        self._leave(peer)
        self.failed.add(peer)
        kept = set(got)
        for h in kept:
            self.tried.pop(h, None)
        self.pending.extend(h for h in batch if h not in kept)

    def stuck(self) -> list[bytes]:
        """The chunks no usable holder is left to ask for, when nothing is in flight
        (the pull has failed); empty otherwise."""
        if self.in_flight:
            return []
        usable = [p for p in self.holders if p not in self.failed]
        return [h for h in self.pending
                if all(p in self.tried.get(h, ()) for p in usable)]

    def _leave(self, peer: str) -> None:
        self.in_flight[peer] -= 1
        if self.in_flight[peer] <= 0:
            del self.in_flight[peer]
