"""Finished tasks on disk, so that GET /v1/tasks/{id} still answers after a restart.

One SQLite table in the data directory: a row per finished task (done or failed), its
JSON as the API shows it, oldest dropped past `keep`. Tasks still running live only
in memory (service.py); a restart ends them anyway.

A database that cannot be read is moved aside (`tasks.db.corrupt-<time>`, nothing is
deleted) and a fresh one started: the archive is a convenience, never a reason for
the daemon not to start.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from peerd.datadir import open_records_db

log = logging.getLogger(__name__)

KEEP = 4096  # finished tasks kept


class TaskArchive:
    def __init__(self, path: Path, keep: int = KEEP) -> None:
        self.path, self.keep = path, keep
        self._db = open_records_db(path, (
            "CREATE TABLE IF NOT EXISTS tasks (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT "
            "UNIQUE NOT NULL, body TEXT NOT NULL)"), "tasks", "task archive")

    def put(self, task_id: str, body: dict[str, Any]) -> None:
        """Store a finished task (a second put of the same id replaces it). A failing
        disk is logged, not raised: the task's caller already has its answer."""
        try:
            self._db.execute("INSERT OR REPLACE INTO tasks (id, body) VALUES (?, ?)",
                             (task_id, json.dumps(body)))
            self._db.execute("DELETE FROM tasks WHERE n NOT IN (SELECT n FROM tasks ORDER BY"
                             " n DESC LIMIT ?)", (self.keep,))
        except sqlite3.Error as exc:
            log.error("could not archive task %s in %s: %s", task_id, self.path, exc)

    def get(self, task_id: str) -> dict[str, Any] | None:
        try:
            row = self._db.execute("SELECT body FROM tasks WHERE id = ?", (task_id,)).fetchone()
        except sqlite3.Error as exc:
            log.error("could not read task %s from %s: %s", task_id, self.path, exc)
            return None
        if row is None:
            return None
        try:
            body = json.loads(row[0])
        except (TypeError, ValueError):  # a hand-edited row
            return None
        return body if isinstance(body, dict) else None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM tasks").fetchone()[0])

    def close(self) -> None:
        self._db.close()
