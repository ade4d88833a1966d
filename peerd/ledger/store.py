"""The ledger's SQLite store: one row per peer, the signed bytes as received.

A restarted peer loads it (re-verifying every row) and starts warm; the gossip
service writes changed entries to it off the event loop.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from peerd.datadir import connect_private_db
from peerd.ledger.book import Accepted, Ledger, LedgerReject
from protocols.ledger import LedgerEntry, SignedEntry

log = logging.getLogger(__name__)


class LedgerStoreError(RuntimeError):
    """The SQLite file is corrupt or unreadable; the message names it."""


class LedgerStore:
    """SQLite persistence: one row per peer, the signed bytes as received."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = connect_private_db(path)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS entries (peer_id TEXT PRIMARY KEY, seq INTEGER"
                " NOT NULL, body BLOB NOT NULL, sig BLOB NOT NULL, expires_at REAL NOT NULL)"
            )
            self._db.execute("SELECT count(*) FROM entries").fetchone()
        except OSError as exc:
            raise LedgerStoreError(
                f"cannot create ledger database {path}: {exc.strerror}") from None
        except sqlite3.DatabaseError as exc:
            raise LedgerStoreError(
                f"ledger database {path} is corrupt or unreadable ({exc}). Move it aside "
                "(the peer re-learns the ledger from its neighbours) and start again."
            ) from None

    def load_into(self, ledger: Ledger, now: float,
                  on_reject: Callable[[str], None] | None = None) -> int:
        """Re-verify every stored entry; expired or tampered rows are dropped, and so
        are rows the book has no room for (a file written under a larger cap)."""
        try:
            rows = self._db.execute("SELECT peer_id, body, sig FROM entries").fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerStoreError(f"ledger database {self.path} is unreadable: {exc}") from None
        loaded = 0
        for peer_id, body, sig in rows:
            try:
                # SQLite keeps whatever type was written; a hand-edited row may hold text.
                if not isinstance(body, bytes) or not isinstance(sig, bytes):
                    raise LedgerReject(f"stored row of {peer_id!r:.60} is not a signed entry",
                                       reason="malformed")
                outcome = ledger.offer(SignedEntry(body=body, sig=sig), now)
                loaded += 1
                if isinstance(outcome, Accepted) and outcome.evicted:
                    self._forget(e.peer_id for e in outcome.evicted)
                    loaded -= len(outcome.evicted)
            except LedgerReject as exc:
                if on_reject is not None and exc.reason != "expired":
                    on_reject(exc.reason)
                self._forget([peer_id])
        return loaded

    def _forget(self, peer_ids: Iterable[str]) -> None:
        """Delete rows the book did not take, if the disk lets us: they are checked
        again at the next start (a full disk must not stop this one)."""
        try:
            self.delete(peer_ids)
        except sqlite3.Error as exc:
            log.warning("ledger database %s: rows not deleted (%s)", self.path, exc)

    def save(self, items: Iterable[tuple[LedgerEntry, SignedEntry]]) -> None:
        rows = [(e.peer_id, e.seq, s.body, s.sig, e.expires_at) for e, s in items]
        if rows:
            self._write("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?)", rows)

    def delete(self, peer_ids: Iterable[str]) -> None:
        ids = [(p,) for p in peer_ids]
        if ids:
            self._write("DELETE FROM entries WHERE peer_id = ?", ids)

    def _write(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        self._db.execute("BEGIN")
        try:
            self._db.executemany(sql, rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

