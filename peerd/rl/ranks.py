"""A learner group under torchrun, as the trainer's policy: `RankedPolicy`.

With a run's `ranks` N > 1 the trainer peer starts N learner processes with torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N -m
peerd.rl.rank_worker`: a standalone rendezvous on a free local port) and talks to rank
0 alone. Rank 0 broadcasts each command that changes the weights (train, load_tensors,
resume, close) to the other ranks; every rank trains its rows of the same batch under
DDP, whose all-reduce makes their gradients, and so their weights, the same after
every step (learner.py). Scoring, exporting and checkpointing therefore run on rank 0
only: its weights are every rank's.

The channel: a unix socket in a private directory (mkdtemp, mode 0700; the socket 0600;
not the run dir, whose path may pass the 108 bytes a socket path may have), accepted
once and then unlinked. The connecting process must run as our user, be a child of the
torchrun process we started (SO_PEERCRED and /proc, on Linux) and send the random token
we put in its environment. Pipes would do, but torchrun's workers inherit its stdin and
stdout, and any library that prints would corrupt the frames. Frames are
length-prefixed: a JSON head and a blob (safetensors bytes, or empty). This side never
unpickles anything; pickle travels only between the ranks (broadcast_object_list),
all of them our children.

Every call has a deadline and watches the group: if torchrun exits (a rank died, and
torchrun ended the others), the call raises GroupError naming the rank, its exit code
and the last lines of its stderr (RUN_DIR/ranks/rank<R>.log). `close` ends the group,
politely and then by signal, and kills any rank left behind (found by the token in its
environment), so no learner process outlives the run.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peerd.rl.checkpoint import CheckpointError
from peerd.rl.types import Rollout

START_TIMEOUT_S = 600.0  # torchrun's rendezvous and every rank loading the model
CALL_TIMEOUT_S = 1800.0  # one command (a training step of a large model on CPU)
STOP_TIMEOUT_S = 30.0  # a group asked to close, before signals
POLL_S = 0.2  # how often a waiting call looks at the group
TAIL_LINES = 15
TOKEN_ENV, SOCKET_ENV, LOGS_ENV = "PEERD_RANKS_TOKEN", "PEERD_RANKS_SOCKET", "PEERD_RANKS_LOGS"
WORKER = "peerd.rl.rank_worker"
BROADCAST = frozenset({"train", "load_tensors", "resume", "close"})  # every rank runs

HEADER = struct.Struct(">IQ")  # JSON head bytes, blob bytes
MAX_HEAD = 1 << 30
MAX_BLOB = 1 << 40


class GroupError(RuntimeError):
    """The learner group failed or stopped answering; the message says which rank, how,
    and what it last wrote."""


# ---- frames (both ends) --------------------------------------------------------------


def send_frame(sock: socket.socket, head: dict[str, Any], blob: bytes = b"") -> None:
    body = json.dumps(head).encode()
    sock.sendall(HEADER.pack(len(body), len(blob)) + body)
    if blob:
        sock.sendall(blob)


def recv_frame(sock: socket.socket, check: Callable[[], None] | None = None
               ) -> tuple[dict[str, Any], bytes]:
    """One frame. EOFError if the other end closed; `check` runs whenever the socket's
    timeout passes without data (it raises to give up)."""
    n_head, n_blob = HEADER.unpack(_recv_exact(sock, HEADER.size, check))
    if n_head > MAX_HEAD or n_blob > MAX_BLOB:
        raise ValueError(f"a frame of {n_head} + {n_blob} bytes is past the limits")
    head = json.loads(_recv_exact(sock, n_head, check))
    if not isinstance(head, dict):
        raise ValueError("a frame's head must be a JSON object")
    return head, _recv_exact(sock, n_blob, check) if n_blob else b""


def _recv_exact(sock: socket.socket, n: int, check: Callable[[], None] | None) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        except TimeoutError:
            if check is not None:
                check()
            continue
        if k == 0:
            raise EOFError("the other end closed the channel")
        got += k
    return bytes(buf)


def rollout_json(r: Rollout) -> dict[str, Any]:
    return asdict(r)


def rollout_of(d: dict[str, Any]) -> Rollout:
    return Rollout(**{**d, "prompt_ids": tuple(d["prompt_ids"]),
                      "completion_ids": tuple(d["completion_ids"]),
                      "behaviour_logprobs": tuple(d["behaviour_logprobs"])})


# ---- the daemon's side -----------------------------------------------------------------


class RankedPolicy:
    """session.Policy's methods (learner_policy.py), run by a learner group. Blocking:
    the trainer calls them off the event loop (trio.to_thread). Build with `launch`,
    then `wait_ready`; always `close`."""

    def __init__(self, proc: subprocess.Popen[bytes], listener: socket.socket,
                 private: Path, logs: Path, token: str, ranks: int, setup: dict[str, Any],
                 *, start_timeout_s: float, call_timeout_s: float) -> None:
        self.proc = proc
        self.ranks = ranks
        self.logs = logs
        self.pids: list[int] = []  # every rank's, once ready
        self.call_timeout_s = call_timeout_s
        self._listener: socket.socket | None = listener
        self._private = private
        self._token = token
        self._setup = setup
        self._start_deadline = time.monotonic() + start_timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # one command at a time on the channel
        self._closed = False
        self._failure = ""

    @classmethod
    def launch(cls, spec: Any, run_dir: Path, *, threads: int, device: str = "cpu",
               start_timeout_s: float = START_TIMEOUT_S,
               call_timeout_s: float = CALL_TIMEOUT_S) -> RankedPolicy:
        """Start `spec.ranks` learner processes for the run `spec` (a RunSpec), each
        with `threads` torch threads on `device` (CUDA_VISIBLE_DEVICES as it is)."""
        import peerd

        private = Path(tempfile.mkdtemp(prefix="peerd-ranks-"))  # 0700
        path = private / "rank0.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, 0o600)
            listener.listen(1)
            listener.settimeout(POLL_S)
            logs = run_dir / "ranks"
            logs.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(32)
            root = str(Path(peerd.__file__).resolve().parent.parent)  # this very peerd
            env = {**os.environ, TOKEN_ENV: token, SOCKET_ENV: str(path),
                   LOGS_ENV: str(logs), "OMP_NUM_THREADS": str(threads),
                   "PYTHONPATH": os.pathsep.join(
                       p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(spec.ranks), "-m", WORKER, "--device", device]
            with (logs / "torchrun.log").open("ab") as out:
                proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            listener.close()
            shutil.rmtree(private, ignore_errors=True)
            raise
        setup = {"op": "setup", "spec": spec.to_json(), "threads": threads,
                 "keep": spec.staleness}
        return cls(proc, listener, private, logs, token, spec.ranks, setup,
                   start_timeout_s=start_timeout_s, call_timeout_s=call_timeout_s)

    def wait_ready(self) -> None:
        """Until every rank has loaded the policy (GroupError if it cannot)."""
        with self._lock:
            assert self._listener is not None, "wait_ready is called once"
            try:
                while self._sock is None:
                    self._check(self._start_deadline, "start")
                    try:
                        conn, _ = self._listener.accept()
                    except TimeoutError:
                        continue
                    conn.settimeout(POLL_S)
                    try:
                        hello, _ = recv_frame(conn, lambda: self._check(
                            self._start_deadline, "start"))
                    except (EOFError, ValueError, OSError):
                        conn.close()
                        continue
                    if not (self._from_child(conn) and hmac.compare_digest(
                            str(hello.get("token", "")), self._token)):
                        conn.close()  # not our rank 0: it gets nothing
                        continue
                    self._sock = conn
            finally:
                self._listener.close()
                self._listener = None
                shutil.rmtree(self._private, ignore_errors=True)
            head, _ = self._exchange(self._setup, b"", self._start_deadline, "start")
            self.pids = [int(p) for p in head["pids"]]

    def _from_child(self, conn: socket.socket) -> bool:
        """The peer process is ours: our user, and a child of our torchrun."""
        if not hasattr(socket, "SO_PEERCRED"):
            return True  # the token alone
        creds = struct.Struct("3i")
        pid, uid, _ = creds.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   creds.size))
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return uid == os.getuid() and int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid

    # ---- the Policy's methods ------------------------------------------------------

    def score(self, rollouts: Sequence[Rollout], temperature: float) -> list[list[float]]:
        head, _ = self._call({"op": "score", "rollouts": [rollout_json(r) for r in rollouts],
                              "temperature": temperature})
        return [list(map(float, row)) for row in head["logprobs"]]

    def remember(self, version: int, tensors: dict[str, Any]) -> None:
        """Rank 0 keeps `version`'s trained tensors. Every caller passes the policy's
        current export, which rank 0 holds already: it keeps its own copy, and the
        tensors need not travel."""
        self._call({"op": "remember", "version": version})

    def score_at(self, version: int, rollouts: Sequence[Rollout], temperature: float
                 ) -> list[list[float]] | None:
        head, _ = self._call({"op": "score_at", "version": version, "temperature": temperature,
                              "rollouts": [rollout_json(r) for r in rollouts]})
        got = head["logprobs"]
        return None if got is None else [list(map(float, row)) for row in got]

    def train(self, rollouts: Sequence[Rollout], advantages: Sequence[float],
              loss_fn: Any, temperature: float,
              tolerances: Sequence[float | None] | None = None) -> dict[str, Any]:
        from peerd.rl.grpo import GrpoLoss

        if not isinstance(loss_fn, GrpoLoss):  # its settings cross; a function cannot
            raise TypeError(f"a learner group trains with a GrpoLoss, not {loss_fn!r}")
        head, _ = self._call({"op": "train", "rollouts": [rollout_json(r) for r in rollouts],
                              "advantages": [float(a) for a in advantages],
                              "loss": loss_fn.to_json(), "temperature": temperature,
                              "tolerances": None if tolerances is None else list(tolerances)})
        return dict(head["stats"])

    def export(self) -> tuple[dict[str, Any], float | None]:
        from safetensors.torch import load

        head, blob = self._call({"op": "export"})
        return load(blob), head["scale"]

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save

        self._call({"op": "load_tensors"}, save(tensors))

    def save(self, run_dir: Path, step: int, version: int, state: dict[str, Any]
             ) -> Path | None:
        head, _ = self._call({"op": "save", "run_dir": str(run_dir), "step": step,
                              "version": version, "state": state})
        return None if head["path"] is None else Path(head["path"])

    def resume(self, run_dir: Path) -> tuple[int, int, dict[str, Any]] | None:
        head, _ = self._call({"op": "resume", "run_dir": str(run_dir)})
        found = head["found"]
        return None if found is None else (int(found[0]), int(found[1]), dict(found[2]))

    # ---- the channel ---------------------------------------------------------------

    def _call(self, head: dict[str, Any], blob: bytes = b"") -> tuple[dict[str, Any], bytes]:
        with self._lock:
            if self._sock is None or self._closed:
                raise GroupError(self._failure or "the learner group is not running")
            return self._exchange(head, blob, time.monotonic() + self.call_timeout_s,
                                  str(head["op"]))

    def _exchange(self, head: dict[str, Any], blob: bytes, deadline: float, what: str
                  ) -> tuple[dict[str, Any], bytes]:
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(max(POLL_S, deadline - time.monotonic()))  # sendall's
            send_frame(sock, head, blob)
            sock.settimeout(POLL_S)
            reply, data = recv_frame(sock, lambda: self._check(deadline, what))
        except (EOFError, OSError, ValueError) as exc:
            self._check(time.monotonic() + STOP_TIMEOUT_S, what, wait=True)
            raise self._fail(f"the learner group broke off during {what!r}: {exc}") from exc
        if not reply.get("ok"):
            error = str(reply.get("error", "?"))
            if reply.get("type") == "CheckpointError":
                raise CheckpointError(str(reply.get("message", error)))
            if what in ("start", *BROADCAST):  # the ranks are ending: say which began it
                with contextlib.suppress(GroupError):
                    self._check(time.monotonic() + STOP_TIMEOUT_S, what, wait=True)
                error = f"{error}; {self._death()}" if self.proc.poll() is not None \
                    else error
            raise self._fail(f"learner rank 0 failed {what!r}: {error}")
        return reply, data

    def _check(self, deadline: float, what: str, *, wait: bool = False) -> None:
        """Raise GroupError if the group has exited (with `wait`: once it exits, or at
        `deadline`) or `deadline` has passed."""
        while True:
            if self.proc.poll() is not None:
                raise self._fail(self._death())
            if time.monotonic() > deadline:
                raise self._fail(f"the learner group did not answer {what!r} in time "
                                 f"(logs in {self.logs})")
            if not wait:
                return
            time.sleep(POLL_S)

    def _fail(self, message: str) -> GroupError:
        self._failure = self._failure or message
        return GroupError(self._failure)

    def _death(self) -> str:
        """Which rank ended the group, its exit code, and its last words."""
        code = self.proc.returncode
        summary = _tail(self.logs / "torchrun.log", 200).rpartition("Root Cause")[2]
        found = re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", summary)
        if found:
            rank, exit_code = int(found[-1][0]), int(found[-1][1])
            how = f"rank {rank} of {self.ranks} exited with code {exit_code}" + (
                f" ({signal.Signals(-exit_code).name})" if -exit_code in
                signal.valid_signals() else "")
        else:
            rank = 0
            how = f"the learner group (torchrun) exited with code {code}"
        last = _tail(self.logs / f"rank{rank}.log", TAIL_LINES) or \
            _tail(self.logs / "torchrun.log", TAIL_LINES)
        return f"{how}; its last lines:\n{last.rstrip()}"

    # ---- the end -------------------------------------------------------------------

    def close(self) -> None:
        """End the group: asked to close, then SIGTERM, then SIGKILL; any rank left
        behind is killed. Safe to call at any time, more than once, from any thread."""
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None and self._sock is not None and \
                self._lock.acquire(timeout=POLL_S * 5):
            try:
                self._sock.settimeout(STOP_TIMEOUT_S)
                send_frame(self._sock, {"op": "close"})
                self.proc.wait(STOP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                self._lock.release()
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, None)):
            if self.proc.poll() is None:
                self.proc.send_signal(sig)  # torchrun passes SIGTERM on to its ranks
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(wait)
        for pid in self.pids:
            if _ours(pid, self._token):  # orphaned (torchrun was killed): ours to end
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if self._sock is not None:
            self._sock.close()
        if self._listener is not None:  # closed before it was ready
            self._listener.close()
        shutil.rmtree(self._private, ignore_errors=True)


def _ours(pid: int, token: str) -> bool:
    """Whether `pid` is still one of our ranks (not a process that reused its id)."""
    try:
        return f"{TOKEN_ENV}={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
