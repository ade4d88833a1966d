"""The OS processes a testnet starts: spawning, liveness, stopping, reaping.

`up` runs in one process and `status`/`kill`/`down` usually in others, so a process
is known by what the state file can hold: its pid and its start time. The start time
keeps a recycled pid from being mistaken for (or killed as) one of ours, and a
zombie counts as dead. Children of *this* process are also reaped here, or their
pids would linger as zombies for as long as a test or benchmark keeps running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
# Children started by this process; `reap` waits for the ones that have exited.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True, slots=True)
class Proc:
    """An OS process we started: pid plus start time, to survive pid reuse."""

    pid: int
    started_at: float

    @classmethod
    def of(cls, pid: int) -> Proc:
        try:
            return cls(pid, float(psutil.Process(pid).create_time()))
        except psutil.Error:  # exited already: keep a start time no process matches
            return cls(pid, 0.0)

    def handle(self) -> psutil.Process | None:
        """The live process, or None if it exited, is a zombie, or the pid was reused."""
        if self.pid <= 0:  # a placeholder for a process not started yet
            return None
        try:
            proc = psutil.Process(self.pid)
            if abs(float(proc.create_time()) - self.started_at) > 1.0:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return proc

    @property
    def alive(self) -> bool:
        return self.handle() is not None


def spawn(argv: list[str], log_path: Path) -> Proc:
    """Start `argv` detached, stdout and stderr appended to `log_path`, cwd its folder."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Lets `python -m peerd.cli` / `-m testnet` work from a source tree too.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for the launcher must not reach it
        )
    _children[child.pid] = child
    return Proc.of(child.pid)


def stop(procs: list[Proc], grace_s: float) -> tuple[int, list[Proc]]:
    """SIGTERM every live one, SIGKILL those alive after `grace_s`.

    Returns how many were alive, and those that survived even SIGKILL (for
    `grace_s` more): normally none.
    """
    live = [(p, h) for p in procs if (h := p.handle()) is not None]
    for _, handle in live:
        handle.terminate()
    stragglers = wait_gone([p for p, _ in live], grace_s)
    for proc in stragglers:
        handle = proc.handle()
        if handle is not None:
            handle.kill()
    return len(live), wait_gone(stragglers, grace_s)


def wait_gone(procs: list[Proc], timeout_s: float) -> list[Proc]:
    """Wait until none of `procs` is alive; those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        reap()
        left = [p for p in procs if p.alive]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def reap() -> None:
    """Collect the exit status of our children that have ended."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"
