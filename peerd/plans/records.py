"""Plans as records on disk: GET /v1/plans/{id} and its events still answer after a
restart.

One SQLite table in the data directory (`plans.db`): a row per plan, its record as the
API shows it and its events as they were published, written when the plan starts and
when it ends; the oldest dropped past `keep`. A plan still `running` when the daemon
stopped is marked failed, reason "interrupted", when the store opens again.

A database that cannot be read is moved aside (`plans.db.corrupt-<time>`) and a fresh
one started, as the task archive does (agents/archive.py): the records are a
convenience, never a reason for the daemon not to start. A failing disk is logged.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from peerd.datadir import open_records_db

log = logging.getLogger(__name__)

KEEP = 1000  # plans kept
INTERRUPTED = "interrupted"


class PlanStore:
    def __init__(self, path: Path, keep: int = KEEP) -> None:
        self.path, self.keep = path, keep
        self._db = open_records_db(path, (
            "CREATE TABLE IF NOT EXISTS plans (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT "
            "UNIQUE NOT NULL, status TEXT NOT NULL, goal TEXT NOT NULL, created REAL NOT "
            "NULL, body TEXT NOT NULL, events TEXT NOT NULL)"), "plans", "plan records")

    def put(self, record: dict[str, Any], events: list[dict[str, Any]]) -> None:
        """Store a plan's record and events (again: replaced, keeping its place)."""
        try:
            row = self._db.execute("SELECT n FROM plans WHERE id = ?",
                                   (record["id"],)).fetchone()
            values = (record["status"], record["goal"], record["created"],
                      json.dumps(record), json.dumps(events))
            if row is None:
                self._db.execute("INSERT INTO plans (status, goal, created, body, events, id)"
                                 " VALUES (?, ?, ?, ?, ?, ?)", (*values, record["id"]))
                self._db.execute("DELETE FROM plans WHERE n NOT IN (SELECT n FROM plans "
                                 "ORDER BY n DESC LIMIT ?)", (self.keep,))
            else:
                self._db.execute("UPDATE plans SET status = ?, goal = ?, created = ?, "
                                 "body = ?, events = ? WHERE n = ?", (*values, row[0]))
        except sqlite3.Error as exc:
            log.error("could not keep plan %s in %s: %s", record.get("id"), self.path, exc)

    def get(self, plan_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(record, events), or None."""
        try:
            row = self._db.execute("SELECT body, events FROM plans WHERE id = ?",
                                   (plan_id,)).fetchone()
        except sqlite3.Error as exc:
            log.error("could not read plan %s from %s: %s", plan_id, self.path, exc)
            return None
        if row is None:
            return None
        try:
            record, events = json.loads(row[0]), json.loads(row[1])
        except (TypeError, ValueError):  # a hand-edited row
            return None
        if not isinstance(record, dict) or not isinstance(events, list):
            return None
        return record, events

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest plans, newest first: {id, goal, status, created}."""
        try:
            rows = self._db.execute("SELECT id, goal, status, created FROM plans ORDER BY n"
                                    " DESC LIMIT ?", (limit,)).fetchall()
        except sqlite3.Error as exc:
            log.error("could not list plans in %s: %s", self.path, exc)
            return []
        return [{"id": r[0], "goal": r[1], "status": r[2], "created": r[3]} for r in rows]

    def interrupt(self, now: float) -> int:
        """Mark every plan still `running` failed ("interrupted"): it was running when
        the daemon stopped. Returns how many."""
        try:
            rows = self._db.execute("SELECT id FROM plans WHERE status = 'running'"
                                    ).fetchall()
        except sqlite3.Error as exc:
            log.error("could not read plans in %s: %s", self.path, exc)
            return 0
        for (plan_id,) in rows:
            got = self.get(plan_id)
            if got is None:
                continue
            record, events = got
            record.update(status="failed", reason=INTERRUPTED, finished=now)
            events.append({"id": 0, "type": "plan.failed", "ts": now, "plan": plan_id,
                           "step": len(record.get("steps", [])), "reason": INTERRUPTED})
            self.put(record, events)
        return len(rows)

    def close(self) -> None:
        self._db.close()
