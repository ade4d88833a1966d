"""Real `peerd start` processes for tests, each with its own data dir and free ports.

`start_daemon` runs `python -m peerd.cli start` with output to a log file, and
returns once *that* process answers `GET /health` (its pid is in the data dir's
daemon.json, so a stray process on a reused port cannot pass for it). A port taken
between probing and binding is retried with fresh ports. `Daemon.stop` sends a
signal and waits; `running` is a context manager that always stops what it started.

Test modules import the autouse fixture `daemon_logs_on_failure`, which prints the
log tail of every daemon involved in a failed test.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

STARTUP_TIMEOUT_S = 60.0  # generous: a loaded CI box can take tens of seconds
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 40
PORT_CLASH = ("already in use", "not available")

# Settings from the developer's shell must not leak into the daemons under test.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("PEERD_") and k not in ("COLUMNS", "LINES")}
# no audits of routes in the background (their passes, sessions and bans at random)
# unless a test asks for them: tests/test_audit.py audits on purpose
CLEAN_ENV["PEERD_AUDIT_RATE"] = "0"


class DaemonError(AssertionError):
    """A daemon did not start or stop as a test needs; the message has its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str,
             daemons: tuple[Daemon, ...] = ()) -> Any:
    """Poll until `condition()` is truthy and return its value, or fail saying `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "".join(d.describe() for d in daemons)
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{tails}")
        time.sleep(0.1)


@dataclass
class Daemon:
    data_dir: Path
    listen_port: int
    api_port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    args: list[str]
    peer_id: str = ""
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def token(self) -> str:
        return (self.data_dir / "api_token").read_text().strip()

    @property
    def p2p_addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.listen_port}/p2p/{self.peer_id}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    # ---- the API -----------------------------------------------------------------

    def request(self, method: str, path: str, *, token: str | None = "",
                headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """`token=""` uses the daemon's own token, `None` sends none."""
        token = self.token if token == "" else token
        auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.request(method, self.url + path, headers={**auth, **(headers or {})},
                             timeout=10.0, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET with the token; the JSON body of a 200, anything else fails the test."""
        r = self.request("GET", path, **kwargs)
        if r.status_code != 200:
            raise AssertionError(f"GET {path} answered {r.status_code}: {r.text[:300]}"
                                 f"{self.describe()}")
        return r.json()

    def ledger_ids(self) -> set[str]:
        return {row["peer_id"] for row in self.get("/ledger")}

    def peer_ids(self) -> set[str]:
        return {row["peer_id"] for row in self.get("/peers")}

    def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics; 0 when the labelled series does not exist yet."""
        return metric_value(self.request("GET", "/metrics").text, name, **labels)

    # ---- the process -------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited {self.proc.returncode}"
        tail = "\n".join(self.log().splitlines()[-LOG_TAIL_LINES:])
        return (f"\n--- peerd {self.peer_id or '?'} ({state}) api :{self.api_port} "
                f"listen :{self.listen_port} data {self.data_dir}\n--- {self.log_path} "
                f"(last {LOG_TAIL_LINES} lines):\n{tail}\n")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Signal the daemon and wait for it to exit; its exit code."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise DaemonError(f"peerd did not exit within {timeout_s} s of "
                                  f"{signal.Signals(sig).name}{self.describe()}") from None
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# Every daemon started in this process, so a failed test can show their logs.
_started: list[Daemon] = []


def peerd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "peerd.cli", *args]


def start_daemon(data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None, stdout_path: Path | None = None,
                 attempts: int = 5) -> Daemon:
    """Start `peerd start` on fresh free ports and wait until it serves its API.

    `args` are extra flags (e.g. `--bootstrap`, `--heartbeat-s`); the listen and API
    addresses, data dir and log level are chosen here. Output goes to `log_path`
    (default `<data dir>.log` beside it); stdout alone to `stdout_path` if given.
    """
    log_path = log_path or data_dir.parent / f"{data_dir.name}.log"
    last: Daemon | None = None
    for _ in range(attempts):
        listen_port, api_port = free_ports(2)
        daemon = spawn(data_dir, listen_port, api_port, list(args), env, log_path,
                       stdout_path)
        if wait_ready(daemon):
            return daemon
        last = daemon
        if not any(phrase in daemon.log() for phrase in PORT_CLASH):
            break
    assert last is not None
    raise DaemonError(f"peerd did not start{last.describe()}")


def spawn(data_dir: Path, listen_port: int, api_port: int, args: list[str],
          env: dict[str, str] | None, log_path: Path,
          stdout_path: Path | None = None) -> Daemon:
    argv = peerd_command("start", "--data-dir", str(data_dir),
                         "--listen", f"/ip4/127.0.0.1/tcp/{listen_port}",
                         "--api", f"127.0.0.1:{api_port}", "--log-level", "info", *args)
    log = log_path.open("ab")
    log.write(f"$ {' '.join(argv)}\n".encode())
    log.flush()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(stdout_path.open("wb")) if stdout_path else log
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log,
                                env={**CLEAN_ENV, **(env or {})})
    daemon = Daemon(data_dir, listen_port, api_port, log_path, proc, argv, _log=log)
    _started.append(daemon)
    return daemon


def wait_ready(daemon: Daemon) -> bool:
    """True once the daemon answers /health at the API that its daemon.json, naming its
    pid, announces (which sets `api_port` when it was 0); False if it exited."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not daemon.alive():
            daemon._close_log()
            return False
        with contextlib.suppress(OSError, ValueError, httpx.HTTPError):
            runtime = json.loads((daemon.data_dir / "daemon.json").read_text())
            if runtime.get("pid") == daemon.proc.pid:
                r = httpx.get(runtime["api"] + "/health", timeout=1.0)
                if r.status_code == 200 and r.json().get("peer_id") == runtime["peer_id"]:
                    daemon.peer_id = runtime["peer_id"]
                    daemon.api_port = daemon.api_port or int(runtime["api"].rsplit(":")[-1])
                    if runtime["api"] != daemon.url:
                        raise DaemonError(f"daemon.json announces {runtime['api']}, not "
                                          f"{daemon.url}{daemon.describe()}")
                    return True
        time.sleep(0.05)
    daemon.kill()
    raise DaemonError(f"peerd did not answer /health within {STARTUP_TIMEOUT_S} s"
                      f"{daemon.describe()}")


@contextlib.contextmanager
def running(*daemons: Daemon) -> Iterator[tuple[Daemon, ...]]:
    """Stop (SIGTERM, then SIGKILL) every daemon on the way out, whatever happened."""
    try:
        yield daemons
    finally:
        for d in daemons:
            with contextlib.suppress(DaemonError):
                d.stop()
            d.kill()


def knows(x: Daemon, y: Daemon) -> bool:
    """X is connected to Y and holds Y's ledger entry."""
    return y.peer_id in x.ledger_ids() and y.peer_id in x.peer_ids()


def connected_pair(tmp: Path, *args: str) -> tuple[Daemon, Daemon]:
    """A and B (B bootstraps to A), returned once each has the other in its ledger and
    connection list. The caller stops them (e.g. with `running`)."""
    a = start_daemon(tmp / "a", "--name", "alpha", *args)
    try:
        b = start_daemon(tmp / "b", "--name", "beta", "--bootstrap", a.p2p_addr, *args)
    except BaseException:
        a.kill()
        raise
    try:
        for x, y in ((a, b), (b, a)):
            wait_for(functools.partial(knows, x, y), 20.0,
                     f"{x.peer_id} to connect to and learn of {y.peer_id}", (a, b))
    except BaseException:
        a.kill()
        b.kill()
        raise
    return a, b


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m peerd.cli ARGS` to completion, capturing its output."""
    return subprocess.run(peerd_command(*args), capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL,
                          env={**CLEAN_ENV, **(env or {})})


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m and m.group(1) == name and dict(_LABEL.findall(m.group(2) or "")) == labels:
            return float(m.group(3))
    return 0.0


@pytest.fixture(autouse=True)
def daemon_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """On failure, print the log tails of the daemons the test could have touched
    (pytest shows a failed test's teardown output)."""
    failed_before = request.session.testsfailed
    live = [d for d in _started if d.alive()]
    first_new = len(_started)
    yield
    if request.session.testsfailed > failed_before:
        for d in live + _started[first_new:]:
            print(d.describe())
