"""The nearest-neighbour index over item embeddings: hnswlib, cosine space.

The index is a cache of the store's embeddings (SQLite is the truth): it is saved
beside the database with a small JSON meta, and `load` refuses any file that does
not match what the store expects, so the store rebuilds it from its embeddings.
hnswlib reads an index file without checking it (a garbage file can crash the
process), so the file's checksum is checked before hnswlib sees a byte of it.

A label is the store's integer key of an item, and its vector never changes (an
item's text is fixed). Labels are never reused (SQLite AUTOINCREMENT): hnswlib's
replace-deleted mode assumes a new label is new, and maps it wrongly otherwise.

Deletions mark the element deleted; additions take a deleted element's slot first
(`replace_deleted=True`), so under churn the element count stays near the live
count instead of growing with every write.

Not thread-safe: the store serialises calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import hnswlib
import numpy as np
import numpy.typing as npt

from peerd.durable import fsync, replace_text

Vectors = npt.NDArray[np.float32]

META_VERSION = 1
# Graph degree and build beam: at 100k MiniLM-like vectors these give recall@10 above
# 0.95 at the query beam below (scripts/bench_memory.py retrieval measures it).
M = 16
EF_CONSTRUCTION = 200
EF_SEARCH = 64  # the query beam; at least k (hnswlib returns no more than ef)
MIN_CAPACITY = 1_024


class IndexMismatch(Exception):
    """An index file that cannot be used as it is; the message says why."""


@dataclass(frozen=True, slots=True)
class IndexMeta:
    dim: int
    embedder: str  # the vector space: an index of another embedder's vectors is useless
    count: int  # live elements
    generation: int  # the store's index generation the file reflects
    sha256: str = ""  # of the index file
    version: int = META_VERSION


class VectorIndex:
    def __init__(self, dim: int, capacity: int = MIN_CAPACITY) -> None:
        self.dim = dim
        self._index = hnswlib.Index(space="cosine", dim=dim)
        self._index.init_index(max_elements=max(capacity, MIN_CAPACITY), M=M,
                               ef_construction=EF_CONSTRUCTION, allow_replace_deleted=True)
        self._index.set_num_threads(1)  # the store is one writer; callers hold a thread
        self._live: set[int] = set()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, label: int) -> bool:
        return label in self._live

    @property
    def element_count(self) -> int:
        """Slots in use, deleted ones included: what the index's memory grows with."""
        return int(self._index.element_count)

    @property
    def capacity(self) -> int:
        return int(self._index.max_elements)

    def add(self, labels: Sequence[int], vectors: Vectors, threads: int = 1) -> None:
        """Add (or, for a live label, replace) vectors [N, dim], on `threads` threads."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(labels) != len(vectors):
            raise ValueError(f"{len(labels)} labels for {len(vectors)} vectors")
        if len(set(labels)) != len(labels):
            raise ValueError("a label given twice")
        fresh = [i for i, label in enumerate(labels) if label not in self._live]
        again = [i for i, label in enumerate(labels) if label in self._live]
        if again:  # in place: replace_deleted would give the label a second slot
            self._index.add_items(vectors[again], [labels[i] for i in again],
                                  num_threads=threads, replace_deleted=False)
        if fresh:
            deleted = self.element_count - len(self._live)
            needed = self.element_count + max(0, len(fresh) - deleted)
            if needed > self.capacity:
                self._index.resize_index(max(needed, 2 * self.capacity))
            self._index.add_items(vectors[fresh], [labels[i] for i in fresh],
                                  num_threads=threads, replace_deleted=True)
            self._live.update(labels[i] for i in fresh)

    def remove(self, label: int) -> bool:
        if label not in self._live:
            return False
        self._index.mark_deleted(label)
        self._live.discard(label)
        return True

    def search(self, vector: Vectors, k: int, allowed: Callable[[int], bool] | None = None,
               limit: int | None = None) -> list[tuple[int, float]]:
        """The k nearest live labels to `vector` [dim] with their cosine similarity,
        nearest first; with `allowed`, only labels it accepts (`limit`: how many it
        accepts at most, when the caller knows, so k never exceeds what exists)."""
        k = min(k, len(self._live) if limit is None else min(limit, len(self._live)))
        if k <= 0:
            return []
        self._index.set_ef(max(EF_SEARCH, k))
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, self.dim)
        while True:
            try:
                labels, distances = self._index.knn_query(query, k=k, num_threads=1,
                                                          filter=allowed)
                break
            except RuntimeError:
                # Fewer than k reachable (a filter that accepts few, a graph thinned by
                # deletions): ask for fewer rather than fail the search.
                if k == 1:
                    return []
                k = max(1, k // 2)
        return [(int(label), 1.0 - float(d))
                for label, d in zip(labels[0], distances[0], strict=True)]

    def save(self, path: Path, meta: IndexMeta) -> IndexMeta:
        """Write the index to `path` and its meta beside it, each atomically (tmp, fsync,
        rename); a crash between the two leaves a checksum that does not match, so the
        file is never trusted half-written. Returns the meta as written."""
        tmp = path.with_name(path.name + ".tmp")
        self._index.save_index(str(tmp))
        fsync(tmp)
        digest = _sha256(tmp)
        os.replace(tmp, path)
        written = IndexMeta(dim=self.dim, embedder=meta.embedder, count=len(self._live),
                            generation=meta.generation, sha256=digest)
        meta_path = meta_path_of(path)
        replace_text(meta_path, json.dumps(asdict(written)))
        return written

    @classmethod
    def load(cls, path: Path, expect: IndexMeta, live: Collection[int]) -> VectorIndex:
        """The index saved at `path`, if its meta matches `expect` (dim, embedder,
        generation, count), its checksum matches, and it holds every `live` label.
        Raises IndexMismatch saying why not."""
        meta = read_meta(path)
        if meta.version != META_VERSION:
            raise IndexMismatch(f"meta version {meta.version}, not {META_VERSION}")
        if meta.dim != expect.dim or meta.embedder != expect.embedder:
            raise IndexMismatch(f"of {meta.embedder} ({meta.dim} dimensions), the store's "
                                f"embeddings are {expect.embedder} ({expect.dim})")
        if meta.generation != expect.generation:
            raise IndexMismatch(f"stale: generation {meta.generation}, the store is at "
                                f"{expect.generation}")
        if meta.count != len(live):
            raise IndexMismatch(f"{meta.count} items, the store has {len(live)}")
        try:
            digest = _sha256(path)
        except OSError as e:
            raise IndexMismatch(f"unreadable: {e}") from e
        if digest != meta.sha256:
            raise IndexMismatch("checksum does not match (truncated or corrupt)")
        index = cls.__new__(cls)
        index.dim = meta.dim
        index._index = hnswlib.Index(space="cosine", dim=meta.dim)
        try:
            index._index.load_index(str(path), allow_replace_deleted=True)
        except RuntimeError as e:
            raise IndexMismatch(f"hnswlib refused it: {e}") from e
        index._index.set_num_threads(1)
        if index._index.M != M:
            raise IndexMismatch(f"built with M={index._index.M}, not {M}")
        labels = set(index._index.get_ids_list())  # deleted labels included
        index._live = set(live)
        if not index._live <= labels:
            raise IndexMismatch(f"lacks {len(index._live - labels)} of the store's items")
        return index


def meta_path_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_meta(path: Path) -> IndexMeta:
    meta_path = meta_path_of(path)
    if not path.is_file() or not meta_path.is_file():
        raise IndexMismatch("missing")
    try:
        raw = json.loads(meta_path.read_text())
        return IndexMeta(dim=int(raw["dim"]), embedder=str(raw["embedder"]),
                         count=int(raw["count"]), generation=int(raw["generation"]),
                         sha256=str(raw["sha256"]), version=int(raw["version"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexMismatch(f"meta unreadable: {e}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

