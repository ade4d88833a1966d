"""The memory's store: SQLite is the truth, the hnswlib index a cache of it.

`<data_dir>/memory/memory.db` holds the items (the author's signed bytes, this peer's
statistics, the embedding), the SCECs (an execution context's canonical bytes and the
embedding of its prompt) and the decision log. The index (`index.bin`, with its meta
`index.bin.json`) is saved beside it on flush, on close, and after SAVE_EVERY index
writes or a quarter of the index, whichever is more (a save writes the whole index, so
its cost per write stays the same as the index grows). Each save is stamped with the
database's index generation: a counter bumped in the same transaction as every write
that changes which embeddings exist (an item added or deleted, items re-embedded;
statistics leave it alone, the index does not hold them). A write commits to SQLite
before it touches the index, so a crash between the two leaves an index of another
generation, which the next open rebuilds from the stored embeddings (no model
needed): nothing committed is lost.

`ItemStore` blocks and is internally locked (one per data dir); `MemoryStore` is its
async face, running every call in a worker thread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import trio

from peerd.embedding import Embedder, Vectors
from peerd.memory.index import IndexMeta, IndexMismatch, VectorIndex
from peerd.memory.item import ItemStats, Record
from peerd.memory.journal import Journal, nearest
from peerd.memory.tables import (
    RECORD_COLUMNS,
    SCHEMA,
    STATS,
    Decision,
    StoredScec,
    Vector,
    record_of,
    stats_row,
    vector_of,
)
from protocols.codec import decode
from protocols.memory import MemoryItemMsg

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
SAVE_EVERY = 256  # index writes between saves of the index file, at least
EXACT_DOMAIN_MAX = 2_048  # a domain this small is searched exactly, not through the graph
REEMBED_BATCH = 256


class ItemStore(Journal):
    def __init__(self, data_dir: Path, embedder: Embedder) -> None:
        self.embedder = embedder
        self.dir = data_dir / "memory"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "memory.db"
        self.index_path = self.dir / "index.bin"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False,
                                   isolation_level=None)  # transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit reported is a commit kept
        self._db.executescript(SCHEMA)
        self._by_domain: dict[str, set[int]] = {}  # domain -> live labels
        # A small domain's labels [L] and vectors [L, dim] for exact search, loaded on its
        # first search and kept in step with its writes.
        self._small: dict[str, tuple[npt.NDArray[np.int64], Vector]] = {}
        self._scec_cache: dict[str, tuple[list[str], Vector]] = {}  # domain -> hashes, [S, dim]
        self._unsaved = 0
        self._saved_generation = -1
        self.index_status = ""  # how the index was opened: "loaded", or why it was rebuilt
        with self._lock:
            self._open()

    # --- opening -------------------------------------------------------------------

    def _open(self) -> None:
        stored = self._meta("embedder")
        if stored is None:
            with self._tx():
                self._set_meta("schema", str(SCHEMA_VERSION))
                self._set_meta("generation", self._meta("generation") or "0")
                self._set_meta("embedder", self.embedder.name)
                self._set_meta("dim", str(self.embedder.dim))
        elif stored != self.embedder.name or self._meta("dim") != str(self.embedder.dim):
            self._reembed(stored)
        for label, domain in self._db.execute("SELECT label, domain FROM items"):
            self._by_domain.setdefault(domain, set()).add(label)
        live = {label for labels in self._by_domain.values() for label in labels}
        expect = IndexMeta(dim=self.embedder.dim, embedder=self.embedder.name,
                           count=len(live), generation=self.generation)
        try:
            self.index = VectorIndex.load(self.index_path, expect, live)
            self._saved_generation = expect.generation
            self.index_status = "loaded"
        except IndexMismatch as e:
            self.index_status = f"rebuilt: index {e}"
            log.log(logging.INFO if str(e) == "missing" else logging.WARNING,
                    "memory: rebuilding the index of %d items from the database (index %s)",
                    len(live), e)
            self._rebuild(len(live))

    def _rebuild(self, count: int) -> None:
        self.index = VectorIndex(self.embedder.dim, capacity=count + count // 4)
        rows = self._db.execute("SELECT label, embedding FROM items ORDER BY label")
        while batch := rows.fetchmany(4_096):
            self.index.add([label for label, _ in batch],
                           np.stack([vector_of(blob) for _, blob in batch]),
                           threads=os.cpu_count() or 1)  # opening waits on it: use them all
        self._save_index()

    def _reembed(self, stored: str) -> None:
        """Another embedder's vectors do not compare with this one's: embed every item's
        text and every SCEC's prompt again, in one transaction."""
        n_items = self._db.execute("SELECT count(*) FROM items").fetchone()[0]
        n_scecs = self._db.execute("SELECT count(*) FROM scecs").fetchone()[0]
        log.warning("memory: the stored embeddings are %s's, this peer embeds with %s: "
                    "re-embedding %d items and %d SCECs from their texts", stored,
                    self.embedder.name, n_items, n_scecs)
        items = self._db.execute("SELECT label, body FROM items").fetchall()
        scecs = self._db.execute("SELECT hash, prompt FROM scecs").fetchall()
        with self._tx():
            for i in range(0, len(items), REEMBED_BATCH):
                batch = items[i:i + REEMBED_BATCH]
                texts = [decode(body, MemoryItemMsg).text for _, body in batch]
                self._db.executemany(
                    "UPDATE items SET embedding = ? WHERE label = ?",
                    [(v.tobytes(), label) for (label, _), v in
                     zip(batch, self.embedder.embed(texts), strict=True)])
            for i in range(0, len(scecs), REEMBED_BATCH):
                sbatch = scecs[i:i + REEMBED_BATCH]
                self._db.executemany(
                    "UPDATE scecs SET embedding = ? WHERE hash = ?",
                    [(v.tobytes(), h) for (h, _), v in
                     zip(sbatch, self.embedder.embed([p for _, p in sbatch]), strict=True)])
            self._set_meta("embedder", self.embedder.name)
            self._set_meta("dim", str(self.embedder.dim))
            self._bump()

    # --- items ---------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return int(self._meta("generation") or 0)

    def put(self, record: Record, embedding: Vector) -> bool:
        """Store an item with the embedding of its text; True when it is new. An item
        already stored keeps its row and takes `record`'s statistics."""
        return self.put_many([(record, embedding)]) == 1

    def put_many(self, entries: Sequence[tuple[Record, Vector]]) -> int:
        """`put` for many items in one transaction; how many were new."""
        rows = [(r, self._unit(v)) for r, v in entries]
        for record, _ in rows:
            if record.signed.item_id != record.item.id:
                raise ValueError(f"record {record.item.id[:12]}: its id is not its body's")
        with self._lock:
            added: list[tuple[int, str, Vector]] = []
            with self._tx():
                for record, vector in rows:
                    if self._update_stats(record.item.id, record.stats):
                        continue
                    it, st = record.item, record.stats
                    cur = self._db.execute(
                        f"INSERT INTO items (id, domain, kind, author, body, sig, embedding, "
                        f"{', '.join(STATS)}, created) VALUES ({', '.join('?' * 15)})",
                        (it.id, it.domain, it.kind, it.author, record.signed.body,
                         record.signed.sig, vector.tobytes(), *stats_row(st), it.created))
                    assert cur.lastrowid is not None
                    added.append((cur.lastrowid, it.domain, vector))
                if added:
                    self._bump()
            if added:
                self.index.add([a[0] for a in added], np.stack([a[2] for a in added]))
                for label, domain, vector in added:
                    self._by_domain.setdefault(domain, set()).add(label)
                    small = self._small.get(domain)
                    if small is not None and len(small[0]) < EXACT_DOMAIN_MAX:
                        self._small[domain] = (np.append(small[0], label),
                                               np.vstack([small[1], vector]))
                    else:
                        self._small.pop(domain, None)
                self._index_written(len(added))
            return len(added)

    def get(self, item_id: str) -> Record | None:
        with self._lock:
            row = self._db.execute(f"SELECT {RECORD_COLUMNS} FROM items WHERE id = ?",
                                   (item_id,)).fetchone()
        return None if row is None else record_of(row)

    def delete(self, item_id: str) -> bool:
        return self.delete_many([item_id]) == 1

    def delete_many(self, item_ids: Collection[str]) -> int:
        """Delete items in one transaction; how many were there."""
        with self._lock:
            with self._tx():
                rows = [row for item_id in dict.fromkeys(item_ids) for row in
                        self._db.execute("DELETE FROM items WHERE id = ? RETURNING label, "
                                         "domain", (item_id,))]
                if rows:
                    self._bump()
            for label, domain in rows:
                self.index.remove(label)
                self._by_domain.get(domain, set()).discard(label)
                small = self._small.get(domain)
                if small is not None:
                    keep = small[0] != label
                    self._small[domain] = (small[0][keep], small[1][keep])
            if rows:
                self._index_written(len(rows))
            return len(rows)

    def update_stats(self, item_id: str, stats: ItemStats) -> bool:
        return self.update_stats_many({item_id: stats}) == 1

    def update_stats_many(self, stats: Mapping[str, ItemStats]) -> int:
        """Replace items' statistics in one transaction; how many items were there."""
        with self._lock, self._tx():
            return sum(self._update_stats(item_id, s) for item_id, s in stats.items())

    def _update_stats(self, item_id: str, stats: ItemStats) -> bool:
        cur = self._db.execute(
            f"UPDATE items SET {', '.join(f'{c} = ?' for c in STATS)} WHERE id = ?",
            (*stats_row(stats), item_id))
        return cur.rowcount > 0

    def records(self, domain: str | None = None) -> list[Record]:
        sql = f"SELECT {RECORD_COLUMNS} FROM items"
        args: tuple[str, ...] = ()
        if domain is not None:
            sql, args = sql + " WHERE domain = ?", (domain,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY label", args).fetchall()
        return [record_of(row) for row in rows]

    def count(self, domain: str | None = None) -> int:
        with self._lock:
            if domain is not None:
                return len(self._by_domain.get(domain, ()))
            return len(self.index)

    def embedding(self, item_id: str) -> Vector | None:
        with self._lock:
            row = self._db.execute("SELECT embedding FROM items WHERE id = ?",
                                   (item_id,)).fetchone()
        return None if row is None else vector_of(row[0])

    def search(self, vector: Vector, k: int, domain: str | None = None,
               exclude: Collection[str] = ()) -> list[tuple[Record, float]]:
        """The k items nearest `vector` (in `domain`, not in `exclude`) with their cosine
        similarity, nearest first."""
        query = self._unit(vector)
        if k <= 0:
            return []
        want = k + len(exclude)
        with self._lock:
            if domain is None:
                hits = self.index.search(query, want)
            else:
                labels = self._by_domain.get(domain, set())
                if len(labels) <= EXACT_DOMAIN_MAX:
                    hits = self._exact(query, want, domain)
                else:
                    hits = self.index.search(query, want, labels.__contains__, len(labels))
            if not hits:
                return []
            sims = dict(hits)
            rows = self._db.execute(
                f"SELECT label, {RECORD_COLUMNS} FROM items WHERE label IN "
                f"({', '.join('?' * len(sims))})", list(sims)).fetchall()
        found = sorted(((record_of(row[1:]), sims[row[0]]) for row in rows),
                       key=lambda hit: -hit[1])
        return [hit for hit in found if hit[0].item.id not in exclude][:k]

    def _exact(self, query: Vector, k: int, domain: str) -> list[tuple[int, float]]:
        if domain not in self._small:
            rows = self._db.execute("SELECT label, embedding FROM items WHERE domain = ?",
                                    (domain,)).fetchall()
            self._small[domain] = (
                np.array([label for label, _ in rows], dtype=np.int64),
                np.stack([vector_of(blob) for _, blob in rows]) if rows
                else np.zeros((0, self.embedder.dim), dtype=np.float32))
        labels, matrix = self._small[domain]
        sims = matrix @ query  # [L]
        top = nearest(sims, k)
        return [(int(labels[i]), float(sims[i])) for i in top]

    # --- lifetime ------------------------------------------------------------------

    def flush(self) -> None:
        """Save the index if it is behind the database."""
        with self._lock:
            if self._saved_generation != self.generation:
                self._save_index()

    def close(self) -> None:
        with self._lock:
            self.flush()
            self._db.close()

    def _save_index(self) -> None:
        generation = self.generation
        self.index.save(self.index_path, IndexMeta(
            dim=self.embedder.dim, embedder=self.embedder.name, count=len(self.index),
            generation=generation))
        self._saved_generation = generation
        self._unsaved = 0

    def _index_written(self, n: int) -> None:
        self._unsaved += n
        if self._unsaved >= max(SAVE_EVERY, len(self.index) // 4):
            self._save_index()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (key, value))

    def _bump(self) -> None:
        self._set_meta("generation", str(self.generation + 1))


class MemoryStore:
    """The async face of an ItemStore: every call runs in a worker thread, one at a time
    (the store is locked anyway; the limiter lets a cancelled caller stop waiting), so
    writes, searches and rebuilds never block the event loop. Embedding runs in its own
    thread beside them: a forward pass need not queue behind the store."""

    def __init__(self, store: ItemStore) -> None:
        self.store = store
        self.embedder = store.embedder
        self._limiter = trio.CapacityLimiter(1)
        self._embedding = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, data_dir: Path, embedder: Embedder) -> MemoryStore:
        """Open (and, when it must, rebuild the index or re-embed) in a worker thread."""
        return cls(await trio.to_thread.run_sync(ItemStore, data_dir, embedder))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return await trio.to_thread.run_sync(self.embedder.embed, texts,
                                             limiter=self._embedding)

    async def put(self, record: Record, embedding: Vector) -> bool:
        return await self._run(self.store.put, record, embedding)

    async def put_many(self, entries: Sequence[tuple[Record, Vector]]) -> int:
        return await self._run(self.store.put_many, entries)

    async def get(self, item_id: str) -> Record | None:
        return await self._run(self.store.get, item_id)

    async def delete(self, item_id: str) -> bool:
        return await self._run(self.store.delete, item_id)

    async def delete_many(self, item_ids: Collection[str]) -> int:
        return await self._run(self.store.delete_many, item_ids)

    async def update_stats(self, item_id: str, stats: ItemStats) -> bool:
        return await self._run(self.store.update_stats, item_id, stats)

    async def update_stats_many(self, stats: Mapping[str, ItemStats]) -> int:
        return await self._run(self.store.update_stats_many, stats)

    async def records(self, domain: str | None = None) -> list[Record]:
        return await self._run(self.store.records, domain)

    async def count(self, domain: str | None = None) -> int:
        return await self._run(self.store.count, domain)

    async def embedding(self, item_id: str) -> Vector | None:
        return await self._run(self.store.embedding, item_id)

    async def search(self, vector: Vector, k: int, domain: str | None = None,
                     exclude: Collection[str] = ()) -> list[tuple[Record, float]]:
        return await self._run(self.store.search, vector, k, domain, exclude)

    async def put_scec(self, scec_hash: str, domain: str, body: bytes, prompt: str,
                       embedding: Vector) -> bool:
        return await self._run(self.store.put_scec, scec_hash, domain, body, prompt,
                               embedding)

    async def get_scec(self, scec_hash: str) -> StoredScec | None:
        return await self._run(self.store.get_scec, scec_hash)

    async def similar_scecs(self, vector: Vector, k: int, domain: str
                            ) -> list[tuple[StoredScec, float]]:
        return await self._run(self.store.similar_scecs, vector, k, domain)

    async def log(self, action: str, item_id: str, utility: float | None = None,
                  detail: Mapping[str, Any] | None = None) -> int:
        return await self._run(self.store.log, action, item_id, utility, detail)

    async def decisions(self, limit: int = 100, action: str | None = None) -> list[Decision]:
        return await self._run(self.store.decisions, limit, action)

    async def remember_refusal(self, key: str, utility: float, tasks: int) -> None:
        await self._run(self.store.remember_refusal, key, utility, tasks)

    async def refusal(self, key: str) -> tuple[float, float, int] | None:
        return await self._run(self.store.refusal, key)

    async def runs_by_domain(self) -> dict[str, int]:
        return await self._run(self.store.runs_by_domain)

    async def abstracted(self) -> set[tuple[str, str]]:
        return await self._run(self.store.abstracted)

    async def mark_abstracted(self, parent: str, domains: Sequence[str]) -> None:
        await self._run(self.store.mark_abstracted, parent, domains)

    async def flush(self) -> None:
        await self._run(self.store.flush)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):  # the index is saved even when cancelled
            await self._run(self.store.close)
