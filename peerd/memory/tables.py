"""The memory database's tables, and the rows they hold as Python values.

See peerd/memory/store.py for what is kept and why; this module has no logic of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from peerd.memory.item import ItemStats, Record, to_item
from protocols.codec import decode
from protocols.memory import MemoryItemMsg, SignedItem

Vector = npt.NDArray[np.float32]

STATS = ("weight", "admitted_utility", "uses", "delta_sum", "last_used", "admitted_at",
          "source")
RECORD_COLUMNS = "id, body, sig, " + ", ".join(STATS)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    label INTEGER PRIMARY KEY AUTOINCREMENT,  -- the index's label: never reused
    id TEXT NOT NULL UNIQUE, domain TEXT NOT NULL, kind TEXT NOT NULL,
    author TEXT NOT NULL, body BLOB NOT NULL, sig BLOB NOT NULL,
    embedding BLOB NOT NULL,  -- float32 [dim], unit norm
    weight REAL NOT NULL, admitted_utility REAL NOT NULL, uses INTEGER NOT NULL,
    delta_sum REAL NOT NULL, last_used REAL NOT NULL, admitted_at REAL NOT NULL,
    source TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS items_domain ON items (domain);
CREATE TABLE IF NOT EXISTS scecs (
    hash TEXT PRIMARY KEY, domain TEXT NOT NULL, body BLOB NOT NULL,
    prompt TEXT NOT NULL,  -- what `embedding` embeds: re-embedded when the embedder changes
    embedding BLOB NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS scecs_domain ON scecs (domain, created);
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, action TEXT NOT NULL,
    item_id TEXT NOT NULL, utility REAL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS decisions_action ON decisions (action, seq);
CREATE TABLE IF NOT EXISTS refusals (  -- candidates refused for no gain, by text and domain
    key TEXT PRIMARY KEY, at REAL NOT NULL, utility REAL NOT NULL, tasks INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS refusals_at ON refusals (at);
CREATE TABLE IF NOT EXISTS abstractions (  -- proven items abstracted, by target domain
    parent TEXT NOT NULL, domain TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (parent, domain));
"""


@dataclass(frozen=True, slots=True)
class StoredScec:
    hash: str
    domain: str
    body: bytes  # the SCEC's canonical bytes (peerd.memory.scec decodes them)
    prompt: str
    created: float


@dataclass(frozen=True, slots=True)
class Decision:
    seq: int
    at: float
    action: str  # admitted, refused, merged, pruned, evicted, deleted, imported, ...
    item_id: str
    utility: float | None
    detail: dict[str, Any]


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception. Re-entrant: a nested
    one joins the outer transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.outer = False

    def __enter__(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if self.outer:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def stats_row(s: ItemStats) -> tuple[float, float, int, float, float, float, str]:
    return (s.weight, s.admitted_utility, s.uses, s.delta_sum, s.last_used, s.admitted_at,
            s.source)


def record_of(row: Iterable[Any]) -> Record:
    item_id, body, sig, *stats = row
    signed = SignedItem(body=body, sig=sig)
    return Record(item=to_item(item_id, decode(body, MemoryItemMsg)), signed=signed,
                  stats=ItemStats(*stats))


def vector_of(blob: bytes) -> Vector:
    return np.frombuffer(blob, dtype=np.float32)
