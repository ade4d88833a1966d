"""The `peerd` command line, run as subprocesses: the admin commands against a real
daemon pair, and `peerd start` refusing what a user can get wrong."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    Daemon,
    connected_pair,
    daemon_logs_on_failure,
    free_port,
    run_cli,
    running,
    spawn,
    start_daemon,
    wait_for,
    wait_ready,
)

# Tables are checked at a width where rich does not have to shorten peer ids.
WIDE = {"COLUMNS": "250"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    a, b = connected_pair(tmp_path_factory.mktemp("cli"))
    with running(a, b):
        yield a, b


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """The error a failed command printed: exactly one line on stderr, nothing on stdout
    but start-up chatter."""
    assert result.returncode != 0, (result.stdout, result.stderr)
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("peerd: "), lines[0]
    return lines[0]


# ---- the admin commands against a running daemon ---------------------------------------


def test_id(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    out = ok(run_cli("id", "--data-dir", str(a.data_dir), env=WIDE))
    assert a.peer_id in out
    assert "alpha" in out
    assert a.p2p_addr in out
    data = json.loads(ok(run_cli("id", "--data-dir", str(a.data_dir), "--json")))
    assert data == {"peer_id": a.peer_id, "name": "alpha", "addrs": data["addrs"],
                    "api": a.url}
    assert a.p2p_addr in data["addrs"]


def test_status(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    out = ok(run_cli("status", "--data-dir", str(a.data_dir), env=WIDE))
    for text in ("name", "alpha", "peer_id", a.peer_id, "ledger_size", a.p2p_addr, a.url):
        assert text in out, text
    data = json.loads(ok(run_cli("status", "--data-dir", str(a.data_dir), "--json")))
    assert {"peer_id", "name", "addrs", "uptime_s", "peers", "ledger_size", "skills",
            "version", "data_dir", "api"} <= set(data)
    assert data["peer_id"] == a.peer_id
    assert data["peers"] == 1


def test_peers(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    out = ok(run_cli("peers", "--data-dir", str(a.data_dir), env=WIDE))
    assert "1 connected peers" in out
    assert b.peer_id in out
    assert "beta" in out
    rows = json.loads(ok(run_cli("peers", "--data-dir", str(a.data_dir), "--json")))
    assert [r["peer_id"] for r in rows] == [b.peer_id]
    assert {"peer_id", "name", "addrs", "rtt_ms", "connections", "offences"} <= set(rows[0])


def test_ledger(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    out = ok(run_cli("ledger", "--data-dir", str(a.data_dir), env=WIDE))
    assert "ledger: 2 peers" in out
    assert "alpha (self)" in out
    assert "beta" in out
    assert b.peer_id[-12:] in out
    rows = json.loads(ok(run_cli("ledger", "--data-dir", str(a.data_dir), "--json")))
    assert {r["peer_id"] for r in rows} == {a.peer_id, b.peer_id}
    for r in rows:
        assert {"seq", "name", "skills", "hardware", "expires_in_s", "self"} <= set(r)


def test_the_tables_survive_a_narrow_terminal(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    for command in ("peers", "ledger"):  # the widest tables
        out = ok(run_cli(command, "--data-dir", str(a.data_dir), env={"COLUMNS": "60"}))
        assert out.strip(), command


def test_events_prints_one_json_line_and_exits(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    out = ok(run_cli("events", "--data-dir", str(a.data_dir), "--json", "--replay", "20",
                     "--count", "1", timeout_s=30.0))
    lines = out.splitlines()
    assert len(lines) == 1, out
    event = json.loads(lines[0])
    assert {"id", "type", "ts"} <= set(event)
    assert event["type"] == "peer.connected"


def test_events_filter_by_type(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    out = ok(run_cli("events", "--data-dir", str(a.data_dir), "--json", "--replay", "50",
                     "--type", "ledger.accepted", "--count", "1"))
    event = json.loads(out)
    assert event["type"] == "ledger.accepted"
    assert event["peer_id"] == b.peer_id
    table = ok(run_cli("events", "--data-dir", str(a.data_dir), "--replay", "50",
                       "--type", "peer.connected", "--count", "1", env=WIDE))
    assert "peer.connected" in table
    assert b.peer_id in table


def test_advertise(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    data = json.loads(ok(run_cli("advertise", "--data-dir", str(a.data_dir), "--skill", "a",
                                 "--skill", "b", "--json")))
    assert data["peer_id"] == a.peer_id
    assert data["skills"] == ["a", "b"]
    assert isinstance(data["seq"], int)
    assert a.get("/status")["skills"] == ["a", "b"]
    wait_for(lambda: next(r for r in b.get("/ledger") if r["peer_id"] == a.peer_id)["skills"]
             == ["a", "b"], 10.0, "B to learn A's advertised skills", pair)
    out = ok(run_cli("advertise", "--data-dir", str(a.data_dir), "--skill", "c"))
    assert "advertising c" in out


def test_advertise_refused_by_the_daemon_is_one_line(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    line = one_line_error(run_cli("advertise", "--data-dir", str(a.data_dir), "--skill", "",
                                  "--json"), 1)
    assert "400" in line
    assert "skills" in line


def test_api_url_and_token_instead_of_the_data_dir(pair: tuple[Daemon, Daemon],
                                                   tmp_path: Path) -> None:
    a, _ = pair
    elsewhere = str(tmp_path / "no-daemon-here")
    for api in (a.url, f"127.0.0.1:{a.api_port}"):
        data = json.loads(ok(run_cli("status", "--data-dir", elsewhere, "--api", api,
                                     "--token", a.token, "--json")))
        assert data["peer_id"] == a.peer_id
    env = {"PEERD_API_URL": a.url, "PEERD_TOKEN": a.token, "PEERD_HOME": elsewhere}
    assert json.loads(ok(run_cli("id", "--json", env=env)))["peer_id"] == a.peer_id


def test_a_wrong_token_is_one_line(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    line = one_line_error(run_cli("status", "--api", a.url, "--token", "not-the-token"), 1)
    assert "refused the token" in line


@pytest.mark.parametrize("command", [["id"], ["status"], ["peers"], ["ledger"],
                                     ["events", "--count", "1"], ["advertise", "--skill", "x"]])
def test_no_daemon_says_how_to_start_one(tmp_path: Path, command: list[str]) -> None:
    # What a crashed daemon leaves behind: daemon.json naming a port nobody serves.
    data_dir = tmp_path / "gone"
    data_dir.mkdir()
    (data_dir / "daemon.json").write_text(json.dumps({"api": f"http://127.0.0.1:{free_port()}"}))
    line = one_line_error(run_cli(*command, "--data-dir", str(data_dir)), 1)
    assert "`peerd start`" in line
    assert "127.0.0.1" in line


def test_an_api_on_port_0_announces_the_port_it_got(tmp_path: Path) -> None:
    d = spawn(tmp_path / "d", free_port(), 0, [], None, tmp_path / "d.log")
    with running(d):
        assert wait_ready(d), d.describe()
        assert d.api_port != 0
        assert f"api      {d.url}" in d.log()
        data = json.loads(ok(run_cli("status", "--data-dir", str(d.data_dir), "--json")))
        assert data["peer_id"] == d.peer_id
        assert data["api"] == d.url


def test_no_daemon_at_an_explicit_api(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(run_cli("status", "--data-dir", str(tmp_path), "--api", url), 1)
    assert "`peerd start`" in line
    assert url in line


# ---- `peerd start` refusing bad input ---------------------------------------------------


def test_start_with_a_bad_api_address(tmp_path: Path) -> None:
    result = run_cli("start", "--data-dir", str(tmp_path / "d"), "--api", "nonsense")
    line = one_line_error(result, 2)
    assert "api" in line
    assert "nonsense" in line
    assert not (tmp_path / "d").exists()


def test_start_with_an_unknown_flag(tmp_path: Path) -> None:
    line = one_line_error(run_cli("start", "--data-dir", str(tmp_path), "--bogus"), 2)
    assert "--bogus" in line


def test_start_with_a_bad_listen_address(tmp_path: Path) -> None:
    line = one_line_error(run_cli("start", "--data-dir", str(tmp_path), "--listen",
                                  "/ip4/127.0.0.1/udp/4001"), 2)
    assert "listen" in line


def listening_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_start_with_the_api_port_in_use(tmp_path: Path) -> None:
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        result = run_cli("start", "--data-dir", str(tmp_path), "--api", f"127.0.0.1:{port}",
                         "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}")
    line = one_line_error(result)
    assert "already in use" in line
    assert str(port) in line
    assert not (tmp_path / "daemon.json").exists()


def test_start_with_the_api_port_of_a_running_peer(pair: tuple[Daemon, Daemon],
                                                   tmp_path: Path) -> None:
    a, _ = pair
    result = run_cli("start", "--data-dir", str(tmp_path), "--api", f"127.0.0.1:{a.api_port}",
                     "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}")
    assert "already in use" in one_line_error(result)
    assert a.get("/status")["peer_id"] == a.peer_id


def test_start_with_the_listen_port_in_use(tmp_path: Path) -> None:
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        result = run_cli("start", "--data-dir", str(tmp_path), "--api",
                         f"127.0.0.1:{free_port()}", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    line = one_line_error(result)
    assert "already in use" in line.lower()
    assert str(port) in line


@pytest.mark.parametrize("implicit", [False, True], ids=["--config", "data-dir"])
def test_start_with_a_bad_config_file_value(tmp_path: Path, implicit: bool) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    config = data_dir / "config.toml" if implicit else tmp_path / "peerd.toml"
    config.write_text('name = "fine"\nheartbeat_s = "x"\n')
    args = [] if implicit else ["--config", str(config)]
    line = one_line_error(run_cli("start", "--data-dir", str(data_dir), *args), 2)
    assert "heartbeat_s" in line
    assert str(config) in line


def test_start_with_a_bad_environment_value(tmp_path: Path) -> None:
    result = run_cli("start", "--data-dir", str(tmp_path), env={"PEERD_TARGET_PEERS": "lots"})
    line = one_line_error(result, 2)
    assert "PEERD_TARGET_PEERS" in line


def test_settings_precedence_end_to_end(tmp_path: Path) -> None:
    """defaults < config file < PEERD_* < flags, seen through a running daemon's API."""
    config = tmp_path / "peerd.toml"
    config.write_text('name = "from-file"\nheartbeat_s = 7.0\nskills = ["from-file"]\n')
    env = {"PEERD_NAME": "from-env", "PEERD_HEARTBEAT_S": "4"}
    flagged = start_daemon(tmp_path / "flag", "--config", str(config), "--name", "from-flag",
                           env=env)
    with running(flagged):
        unflagged = start_daemon(tmp_path / "env", "--config", str(config), env=env)
        with running(unflagged):
            for daemon, name in ((flagged, "from-flag"), (unflagged, "from-env")):
                status = daemon.get("/status")
                assert status["name"] == name
                assert status["skills"] == ["from-file"]
                own = next(r for r in daemon.get("/ledger") if r["self"])
                assert own["ttl_s"] == pytest.approx(4.0 * 3)  # PEERD_HEARTBEAT_S beat 7.0
