"""The data dir's layout, and the light readers the CLI needs (no libp2p import).

    identity.key   ed25519 key, 0600: fixes the peer id
    api_token      bearer token for the local API, 0600
    ledger.sqlite  the capability ledger, 0600
    tasks.db       finished Symphony tasks this peer requested, 0600
    reputation.json  Symphony's record of other peers as workers
    proven.json    the peers our audits proved wrong, and their bans (peerd/proven.py)
    rl/liars.json  the samplers our RL runs caught lying, and their bans
    memory/replay_reputation.json  the memory's record of other peers as replayers
    daemon.json    while a daemon runs: pid, API URL, addresses
    lock           held (flock) by the running daemon: one daemon per data dir
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from peerd.durable import replace_text

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
TOKEN_FILE = "api_token"
LEDGER_DB = "ledger.sqlite"
TASKS_DB = "tasks.db"
REPUTATION_FILE = "reputation.json"
RUNTIME_FILE = "daemon.json"
LOCK_FILE = "lock"


class DataDirInUse(RuntimeError):
    pass


def connect_private_db(path: Path) -> sqlite3.Connection:
    """A SQLite database of the data dir: created owner-only if missing (SQLite gives
    its journal files the database's mode), autocommit, WAL. OSError when it cannot be
    created; sqlite3.DatabaseError when the file is not a database."""
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def open_records_db(path: Path, schema: str, table: str, what: str) -> sqlite3.Connection:
    """A records database of the data dir (connect_private_db) with `schema` applied and
    `table` readable. A file that is not a database, or whose table cannot be read, is
    moved aside (`<name>.corrupt-<time>`, logged as `what`) and a new one started: the
    records are a convenience, never a reason not to start."""
    def attempt() -> sqlite3.Connection:
        db = connect_private_db(path)
        try:
            db.execute(schema)
            db.execute(f"SELECT count(*) FROM {table}").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    try:
        return attempt()
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.warning("%s %s is unreadable (%s); moved to %s, starting anew", what, path, exc,
                    aside)
        os.replace(path, aside)
        return attempt()


def read_token(data_dir: Path) -> str | None:
    try:
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def read_json(path: Path) -> Any:
    """A small JSON file's content; None when it is missing or damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all: a crash leaves the old file or the new."""
    replace_text(path, json.dumps(data, indent=2))


def keep_json(path: Path, data: Any) -> None:
    """write_json for a record whose loss costs only what it learned (a reputation book):
    a disk error is logged, never raised into the work that updated it."""
    try:
        write_json(path, data)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)


def read_runtime_file(data_dir: Path) -> dict[str, Any] | None:
    data = read_json(data_dir / RUNTIME_FILE)
    return data if isinstance(data, dict) else None


def write_runtime_file(data_dir: Path, info: dict[str, Any]) -> None:
    write_json(data_dir / RUNTIME_FILE, info)


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir for this process; the lock dies with it. Returns the fd."""
    fd = os.open(data_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        running = read_runtime_file(data_dir) or {}
        pid = f" (pid {running['pid']})" if "pid" in running else ""
        raise DataDirInUse(f"another peerd{pid} is running with data dir {data_dir}; stop it "
                           "or pass another --data-dir") from None
    return fd
