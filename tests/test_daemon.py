"""`peerd start` as a process: what it prints, the files it keeps, how it stops, how it
refuses a broken data dir, and that a restarted peer starts warm."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    Daemon,
    connected_pair,
    daemon_logs_on_failure,
    free_port,
    run_cli,
    running,
    start_daemon,
    wait_for,
)
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import save_identity
from libp2p.peer.id import ID

from peerd.ledger.book import sign_entry
from peerd.ledger.store import LedgerStore
from protocols.ledger import LedgerEntry, SignedEntry

SHUTDOWN_LIMIT_S = 2.0  # the daemon's promise: exit 0 within two seconds of a signal


@pytest.fixture(scope="module")
def anchor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A peer for others to connect to, so they have something to leave on shutdown."""
    daemon = start_daemon(tmp_path_factory.mktemp("anchor") / "anchor", "--name", "anchor")
    with running(daemon):
        yield daemon


@dataclass
class FirstRun:
    daemon: Daemon
    stdout: str
    peer_id: str
    exit_code: int


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstRun]:
    """One daemon started on an empty data dir, then stopped."""
    tmp = tmp_path_factory.mktemp("first")
    daemon = start_daemon(tmp / "data", stdout_path=tmp / "stdout.txt")
    with running(daemon):
        code = daemon.stop(signal.SIGTERM)
    yield FirstRun(daemon, (tmp / "stdout.txt").read_text(), daemon.peer_id, code)


def test_start_prints_peer_id_listen_address_and_api_url(first_run: FirstRun) -> None:
    d = first_run.daemon
    lines = [line.split() for line in first_run.stdout.splitlines()]
    assert ["peer", "id", d.peer_id] in lines, first_run.stdout
    assert ["listen", d.p2p_addr] in lines, first_run.stdout
    assert ["api", d.url] in lines, first_run.stdout
    assert first_run.exit_code == 0


def test_the_data_dir_is_private(first_run: FirstRun) -> None:
    d = first_run.daemon.data_dir
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("identity.key", "api_token"):
        mode = stat.S_IMODE((d / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    assert not (d / "daemon.json").exists(), "a stopped daemon leaves no daemon.json"


def test_a_restart_keeps_the_peer_id_and_token(first_run: FirstRun) -> None:
    d = first_run.daemon.data_dir
    key, token = (d / "identity.key").read_bytes(), (d / "api_token").read_text()
    again = start_daemon(d)
    with running(again):
        assert again.peer_id == first_run.peer_id
        assert again.get("/status")["peer_id"] == first_run.peer_id
        assert again.token == token.strip()
    assert (d / "identity.key").read_bytes() == key
    assert (d / "api_token").read_text() == token


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_daemon_with_exit_0_within_two_seconds(
        anchor: Daemon, tmp_path: Path, sig: signal.Signals) -> None:
    d = start_daemon(tmp_path / "d", "--bootstrap", anchor.p2p_addr)
    with running(d):
        wait_for(lambda: anchor.peer_id in d.peer_ids(), 20.0, "a connection to the anchor",
                 (d, anchor))
        # An attached /events client must not hold the shutdown up.
        with httpx.stream("GET", d.url + "/events", headers={"Authorization": f"Bearer "
                          f"{d.token}"}, timeout=httpx.Timeout(5.0, read=10.0)) as events:
            assert next(events.iter_lines()).startswith(":")
            d.proc.send_signal(sig)
            t0 = time.monotonic()
            code = d.proc.wait(timeout=10.0)
            elapsed = time.monotonic() - t0
    assert code == 0, d.describe()
    assert elapsed < SHUTDOWN_LIMIT_S, f"exit took {elapsed:.2f} s{d.describe()}"
    assert f"{sig.name} received" in d.log()
    assert not (d.data_dir / "daemon.json").exists()
    wait_for(lambda: d.peer_id not in anchor.peer_ids(), 10.0,
             "the anchor to see the peer go", (anchor,))
    assert anchor.request("GET", "/health", token=None).status_code == 200


# ---- a broken data dir ---------------------------------------------------------------


def start_and_fail(data_dir: Path) -> str:
    """Run `peerd start` on DATA_DIR; it must exit non-zero with one line on stderr."""
    result = run_cli("start", "--data-dir", str(data_dir), "--listen",
                     f"/ip4/127.0.0.1/tcp/{free_port()}", "--api", f"127.0.0.1:{free_port()}")
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "peer id" not in result.stdout, "it must not have started"
    return lines[0]


def valid_key_bytes(tmp: Path) -> bytes:
    save_identity(create_new_key_pair(), tmp / "valid.key")
    return (tmp / "valid.key").read_bytes()


@pytest.mark.parametrize("content", ["random", "empty", "truncated"])
def test_a_corrupt_identity_key_is_refused_and_kept(tmp_path: Path, content: str) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir(mode=0o700)
    key = data_dir / "identity.key"
    key.write_bytes({"random": os.urandom(68), "empty": b"",
                     "truncated": valid_key_bytes(tmp_path)[:20]}[content])
    before = key.read_bytes()
    line = start_and_fail(data_dir)
    assert str(key) in line
    assert key.read_bytes() == before, "the key file was changed"
    # nothing but the data dir's lock appeared: no new identity, no token
    assert sorted(p.name for p in data_dir.iterdir()) == ["identity.key", "lock"]


def test_a_corrupt_ledger_database_is_refused_and_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir(mode=0o700)
    ledger = data_dir / "ledger.sqlite"
    ledger.write_bytes(os.urandom(16384))
    before = ledger.read_bytes()
    line = start_and_fail(data_dir)
    assert str(ledger) in line
    assert ledger.read_bytes() == before, "the database was changed"
    assert not (data_dir / "daemon.json").exists()


# ---- warm start ------------------------------------------------------------------------


def test_a_restarted_peer_starts_warm(tmp_path: Path) -> None:
    """B, restarted alone after A has gone, still knows A from its stored ledger."""
    # entries live 45 s: a stalled machine (shutdowns of 12 s seen on a loaded VM) must
    # not expire A before B is back
    a, b = connected_pair(tmp_path, "--heartbeat-s", "15")
    with running(a, b):
        seq_before = b.get("/status")["seq"]
        a_expires_at = time.time() + next(
            r["expires_in_s"] for r in b.get("/ledger") if r["peer_id"] == a.peer_id)
        assert a.stop() == 0
        assert b.stop() == 0
    b2 = start_daemon(b.data_dir, "--name", "beta", "--heartbeat-s", "15")
    with running(b2):
        rows = {r["peer_id"]: r for r in b2.get("/ledger")}
        assert b2.get("/peers") == [], "A is down: the entry can only come from disk"
    assert b2.peer_id == b.peer_id
    assert a.peer_id in rows, (
        f"A's entry is gone; it was due to expire {a_expires_at - time.time():.1f} s from now"
        f" (negative: the restart outlasted its ttl){b2.describe()}")
    assert rows[a.peer_id]["name"] == "alpha"
    assert rows[a.peer_id]["self"] is False
    assert rows[a.peer_id]["expires_in_s"] > 0
    assert rows[b.peer_id]["self"] is True
    assert rows[b.peer_id]["seq"] > seq_before, "our own entry is re-signed, not reloaded"


def signed(kp: KeyPair, name: str, age_s: float, ttl_s: float) -> tuple[LedgerEntry,
                                                                        SignedEntry]:
    pid = str(ID.from_pubkey(kp.public_key))
    entry = LedgerEntry(peer_id=pid, seq=7, timestamp=time.time() - age_s, ttl_s=ttl_s,
                        name=name, addrs=(f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{pid}",))
    return entry, sign_entry(entry, kp.private_key)


def test_a_warm_start_re_verifies_what_it_stored(tmp_path: Path) -> None:
    """Stored rows are checked again at start: live ones load; expired, forged and
    hand-edited rows and our own old entry do not."""
    data_dir = tmp_path / "d"
    data_dir.mkdir(mode=0o700)
    own = create_new_key_pair()
    save_identity(own, data_dir / "identity.key")
    live, expired, forged = (create_new_key_pair() for _ in range(3))
    forged_entry, forged_signed = signed(forged, "forged", 0, 600)
    rows = [signed(live, "live", 1, 600), signed(expired, "expired", 100, 10),
            (forged_entry, SignedEntry(body=forged_signed.body, sig=bytes(64))),
            signed(own, "old-self", 1, 600)]
    store = LedgerStore(data_dir / "ledger.sqlite")
    store.save(rows)
    store.close()
    with contextlib.closing(sqlite3.connect(data_dir / "ledger.sqlite")) as db, db:
        db.execute("INSERT INTO entries VALUES (?, 1, ?, ?, ?)",
                   ("12D3KooWEdited", "not bytes", "sig", time.time() + 600))

    d = start_daemon(data_dir, "--name", "new-self")
    with running(d):
        view = {r["name"]: r for r in d.get("/ledger")}
        forged_count = d.metric("peerd_rejections_total", reason="bad_signature")
        edited_count = d.metric("peerd_rejections_total", reason="malformed")
    assert sorted(view) == ["live", "new-self"]
    assert view["live"]["peer_id"] == str(ID.from_pubkey(live.public_key))
    assert view["new-self"]["peer_id"] == d.peer_id == str(ID.from_pubkey(own.public_key))
    assert view["new-self"]["seq"] > 7
    assert forged_count == 1
    assert edited_count == 1

    store = LedgerStore(data_dir / "ledger.sqlite")
    try:
        kept = store._db.execute("SELECT peer_id FROM entries").fetchall()
    finally:
        store.close()
    assert {p for (p,) in kept} == {view["live"]["peer_id"], d.peer_id}


def test_the_api_port_is_free_again_after_a_stop(first_run: FirstRun) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as any server would
        s.bind(("127.0.0.1", first_run.daemon.api_port))


def test_one_daemon_per_data_dir(tmp_path: Path) -> None:
    """A second daemon on a running peer's data dir is refused and harms nothing."""
    data_dir = tmp_path / "d"
    with running(start_daemon(data_dir)) as (first,):
        line = start_and_fail(data_dir)
        assert "another peerd" in line and str(data_dir) in line
        assert (data_dir / "daemon.json").exists(), "the refused start removed daemon.json"
        assert first.request("GET", "/health").status_code == 200
