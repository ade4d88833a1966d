"""The store's journal: the SCECs (execution contexts that replays re-run) and the log of
every decision about an item. A mixin of `ItemStore`, sharing its connection and lock.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from peerd.embedding import Embedder
from peerd.memory.tables import Decision, StoredScec, Transaction, Vector, vector_of
from protocols.codec import decode
from protocols.errors import WireError
from protocols.memory import DOMAIN, SCEC_HASH, MemoryItemMsg

log = logging.getLogger(__name__)

SCEC_SEARCH_CAP = 10_000  # the newest SCECs of a domain that similar_scecs compares
# The SCECs a domain keeps: its newest (those similar_scecs compares), and any an item
# names as its origin. Every RL run and scored task adds some: trimmed every TRIM_EVERY
# new ones, as the decision log is.
SCECS_KEPT = SCEC_SEARCH_CAP
# The decision log keeps its newest entries: a peer judging candidates for months would
# otherwise grow it without bound. Trimmed every TRIM_EVERY writes, by sequence number.
DECISIONS_KEPT = 200_000
REFUSALS_KEPT = 50_000  # remembered no-gain refusals (the controller's refusal_memory_s)
TRIM_EVERY = 1_024


def nearest(sims: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.intp]:
    """The rows of the k largest similarities, largest first (ties: the lower row)."""
    if k <= 0 or len(sims) == 0:
        return np.zeros(0, dtype=np.intp)
    if k >= len(sims):
        return np.argsort(-sims, kind="stable")
    kth = -np.partition(-sims, k - 1)[k - 1]  # the k-th largest: O(n)
    rows = np.flatnonzero(sims >= kth)  # the k largest and any tied with the last
    return rows[np.argsort(-sims[rows], kind="stable")][:k]


class Journal:
    embedder: Embedder
    _db: sqlite3.Connection
    _lock: threading.RLock
    _scec_cache: dict[str, tuple[list[str], Vector]]  # domain -> hashes, [S, dim]

    def _tx(self) -> Transaction:
        return Transaction(self._db)

    def _unit(self, vector: Vector) -> Vector:
        """`vector` scaled to unit norm; ValueError unless it is a nonzero finite [dim]."""
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v)) if v.shape == (self.embedder.dim,) else math.nan
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError(f"an embedding of shape {np.shape(vector)} and norm {norm}: "
                             f"want a nonzero finite [{self.embedder.dim}]")
        return v / norm

    def put_scec(self, scec_hash: str, domain: str, body: bytes, prompt: str,
                 embedding: Vector) -> bool:
        """Keep an execution context and the embedding of its prompt; True when new."""
        if not SCEC_HASH.fullmatch(scec_hash):
            raise ValueError(f"{scec_hash!r:.70} is not an SCEC hash")
        if not DOMAIN.fullmatch(domain):
            raise ValueError(f"domain {domain!r:.40}")
        vector = self._unit(embedding)
        with self._lock, self._tx():
            cur = self._db.execute(
                "INSERT OR IGNORE INTO scecs (hash, domain, body, prompt, embedding, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (scec_hash, domain, body, prompt, vector.tobytes(), time.time()))
            if cur.rowcount == 0:
                return False
            cached = self._scec_cache.get(domain)
            if cached is not None:
                hashes, matrix = cached
                self._scec_cache[domain] = ([*hashes, scec_hash][-SCEC_SEARCH_CAP:],
                                            np.vstack([matrix, vector])[-SCEC_SEARCH_CAP:])
            assert cur.lastrowid is not None
            if cur.lastrowid % TRIM_EVERY == 0:
                self.trim_scecs()
            return True

    def trim_scecs(self) -> int:
        """Let go of every domain's SCECs past its newest SCECS_KEPT, but for those an
        item names as its origin; how many went."""
        with self._lock, self._tx():
            over = self._db.execute("SELECT domain FROM scecs GROUP BY domain HAVING "
                                    "COUNT(*) > ?", (SCECS_KEPT,)).fetchall()
            if not over:
                return 0
            try:
                origins = {decode(body, MemoryItemMsg).origin
                           for (body,) in self._db.execute("SELECT body FROM items")}
            except WireError as exc:  # an item we cannot read may name any of them
                log.warning("memory: SCECs not trimmed: an item does not decode: %s", exc)
                return 0
            gone = 0
            for (domain,) in over:
                old = self._db.execute(
                    "SELECT hash FROM scecs WHERE domain = ? ORDER BY created DESC, "
                    "rowid DESC LIMIT -1 OFFSET ?", (domain, SCECS_KEPT)).fetchall()
                drop = [(h,) for (h,) in old if h not in origins]
                self._db.executemany("DELETE FROM scecs WHERE hash = ?", drop)
                gone += len(drop)
                self._scec_cache.pop(domain, None)  # loaded again from what is left
            return gone

    def get_scec(self, scec_hash: str) -> StoredScec | None:
        with self._lock:
            row = self._db.execute("SELECT hash, domain, body, prompt, created FROM scecs "
                                   "WHERE hash = ?", (scec_hash,)).fetchone()
        return None if row is None else StoredScec(*row)

    def similar_scecs(self, vector: Vector, k: int, domain: str
                      ) -> list[tuple[StoredScec, float]]:
        """The k SCECs of `domain` whose prompts are nearest `vector` (exactly, over the
        domain's newest SCEC_SEARCH_CAP), with their cosine similarity, nearest first."""
        query = self._unit(vector)
        with self._lock:
            if domain not in self._scec_cache:
                rows = self._db.execute(
                    "SELECT hash, embedding FROM scecs WHERE domain = ? ORDER BY created "
                    "DESC LIMIT ?", (domain, SCEC_SEARCH_CAP)).fetchall()[::-1]
                matrix = (np.stack([vector_of(blob) for _, blob in rows]) if rows
                          else np.zeros((0, self.embedder.dim), dtype=np.float32))
                self._scec_cache[domain] = ([h for h, _ in rows], matrix)
            hashes, matrix = self._scec_cache[domain]
            sims = matrix @ query  # [S]
            top = nearest(sims, k)
            out = []
            for i in top:
                scec = self.get_scec(hashes[i])
                if scec is not None:
                    out.append((scec, float(sims[i])))
            return out

    # --- the decision log ----------------------------------------------------------

    def log(self, action: str, item_id: str, utility: float | None = None,
            detail: Mapping[str, Any] | None = None) -> int:
        """Record a decision about an item; its sequence number."""
        if not action or not action.isidentifier():
            raise ValueError(f"decision action {action!r:.40}")
        if utility is not None and not math.isfinite(utility):
            raise ValueError(f"decision utility {utility}")
        text = json.dumps(dict(detail or {}), sort_keys=True)
        with self._lock, self._tx():
            cur = self._db.execute(
                "INSERT INTO decisions (at, action, item_id, utility, detail) VALUES "
                "(?, ?, ?, ?, ?)", (time.time(), action, item_id, utility, text))
            seq = cur.lastrowid
            assert seq is not None
            if seq % TRIM_EVERY == 0:
                self._db.execute("DELETE FROM decisions WHERE seq <= ?",
                                 (seq - DECISIONS_KEPT,))
            return seq

    def remember_refusal(self, key: str, utility: float, tasks: int) -> None:
        """A candidate refused for no gain: `key` names its text in its domain."""
        if not math.isfinite(utility):
            raise ValueError(f"refusal utility {utility}")
        with self._lock, self._tx():
            self._db.execute("INSERT OR REPLACE INTO refusals (key, at, utility, tasks) "
                             "VALUES (?, ?, ?, ?)", (key, time.time(), utility, tasks))
            (count,) = self._db.execute("SELECT COUNT(*) FROM refusals").fetchone()
            if count > REFUSALS_KEPT:
                self._db.execute("DELETE FROM refusals WHERE key IN (SELECT key FROM "
                                 "refusals ORDER BY at LIMIT ?)", (count - REFUSALS_KEPT,))

    def refusal(self, key: str) -> tuple[float, float, int] | None:
        """(when, utility, tasks) of the last no-gain refusal of `key`, if remembered."""
        with self._lock:
            row = self._db.execute("SELECT at, utility, tasks FROM refusals WHERE key = ?",
                                   (key,)).fetchone()
        return None if row is None else (float(row[0]), float(row[1]), int(row[2]))

    def runs_by_domain(self) -> dict[str, int]:
        """The scored runs (SCECs) held, by domain."""
        with self._lock:
            rows = self._db.execute("SELECT domain, COUNT(*) FROM scecs GROUP BY domain")
            return {domain: int(n) for domain, n in rows.fetchall()}

    def abstracted(self) -> set[tuple[str, str]]:
        """(parent item, domain) pairs whose abstraction was tried, of items still held."""
        with self._lock:
            rows = self._db.execute("SELECT a.parent, a.domain FROM abstractions a JOIN "
                                    "items i ON i.id = a.parent").fetchall()
        return {(parent, domain) for parent, domain in rows}

    def mark_abstracted(self, parent: str, domains: Sequence[str]) -> None:
        """Tried: rows of items no longer held go, so the table stays the store's size."""
        now = time.time()
        with self._lock, self._tx():
            self._db.executemany("INSERT OR REPLACE INTO abstractions (parent, domain, at) "
                                 "VALUES (?, ?, ?)", [(parent, d, now) for d in domains])
            self._db.execute("DELETE FROM abstractions WHERE parent NOT IN "
                             "(SELECT id FROM items)")

    def decisions(self, limit: int = 100, action: str | None = None) -> list[Decision]:
        """The newest decisions first."""
        sql = "SELECT seq, at, action, item_id, utility, detail FROM decisions"
        args: tuple[Any, ...] = (limit,)
        if action is not None:
            sql, args = sql + " WHERE action = ?", (action, limit)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", args).fetchall()
        return [Decision(seq, at, act, item, utility, json.loads(detail))
                for seq, at, act, item, utility, detail in rows]
