"""The finished-task archive on real SQLite: round trip, the cap, bad rows, and a
corrupt file moved aside (not deleted, not fatal)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from peerd.agents.archive import TaskArchive
from peerd.plans.records import PlanStore


def test_round_trip_replace_and_cap(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    archive = TaskArchive(path, keep=3)
    for i in range(5):
        archive.put(f"t{i}", {"id": f"t{i}", "answer": str(i)})
    assert len(archive) == 3 and archive.get("t0") is None and archive.get("t1") is None
    assert archive.get("t4") == {"id": "t4", "answer": "4"}
    archive.put("t4", {"id": "t4", "answer": "four"})
    archive.close()
    again = TaskArchive(path, keep=3)  # another process, later
    assert again.get("t4") == {"id": "t4", "answer": "four"} and len(again) == 3
    assert again.get("nope") is None
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_hand_edited_row_reads_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    TaskArchive(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO tasks (id, body) VALUES ('bad', 'not json'), ('list', '[1]')")
    db.commit()
    db.close()
    archive = TaskArchive(path)
    assert archive.get("bad") is None and archive.get("list") is None


def test_a_corrupt_file_is_moved_aside_and_a_new_archive_started(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    path.write_bytes(b"this is not a database" * 100)
    archive = TaskArchive(path)
    archive.put("t", {"id": "t"})
    assert archive.get("t") == {"id": "t"}
    (aside,) = tmp_path.glob("tasks.db.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not a database")


def test_corrupt_plan_records_are_moved_aside_too(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    path.write_bytes(b"not sqlite either" * 100)
    store = PlanStore(path)
    store.put({"id": "p", "status": "answered", "goal": "g", "created": 1.0}, [])
    assert store.get("p") == ({"id": "p", "status": "answered", "goal": "g",
                               "created": 1.0}, [])
    (aside,) = tmp_path.glob("plans.db.corrupt-*")
    assert aside.read_bytes().startswith(b"not sqlite either")
    store.close()
