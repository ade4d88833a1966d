"""What a testnet run is, on disk: `RUN_DIR/testnet.json`, and its port layout.

The state file is the only link between `up` and the later `status`, `kill` and
`down` commands, which run in other processes: it names every peer, its ports, its
data dir and its process, and the proxy's process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testnet.procs import Proc

STATE_FILE = "testnet.json"
PEERS_DIR = "peers"
PROXY_LOG = "proxy.log"
DEFAULT_BASE_PORT = 14100
# Offsets from the base port: peer i uses BASE+i for its API, BASE+1000+i for libp2p
# and BASE+2000+i for its latency proxy. Below 32768, out of the kernel's ephemeral
# range, so outgoing connections never squat on them.
LISTEN_OFFSET = 1000
PROXY_OFFSET = 2000
MAX_PEERS = 1000


class TestnetError(RuntimeError):
    """A testnet command cannot do what was asked; the message says what to do."""

    __test__ = False  # not a pytest test class, despite the name


def default_run_dir() -> Path:
    return Path(__file__).resolve().parent / ".run"


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """One peer of a run as `up` launched it."""

    name: str
    peer_id: str
    data_dir: str
    api_port: int
    listen_port: int
    announce_port: int  # the proxy's port with latency, else the listen port
    proc: Proc
    layers: tuple[int, int] | None = None  # decoder layers [start, end) it serves, if any

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def listen(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.listen_port}"

    @property
    def announce(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.announce_port}"

    @property
    def dial_addr(self) -> str:
        """What other peers bootstrap to: the announced address with our peer id."""
        return f"{self.announce}/p2p/{self.peer_id}"

    @property
    def log_path(self) -> Path:
        return Path(self.data_dir) / "peerd.log"


@dataclass(slots=True)
class RunState:
    """Contents of `RUN_DIR/testnet.json`."""

    run_dir: str
    base_port: int
    latency_ms: float
    heartbeat_s: float | None
    peers: list[PeerRecord]
    proxy: Proc | None = None
    up: bool = True
    started_at: float = field(default_factory=time.time)
    model: str | None = None  # the SPEC every peer serves a stage of, if any
    model_id: str | None = None  # what the peers advertise for it in the ledger

    def peer(self, name: str) -> PeerRecord:
        for record in self.peers:
            if record.name == name:
                return record
        names = ", ".join(r.name for r in self.peers)
        raise TestnetError(f"no peer named {name!r} in this testnet; peers are: {names}")

    def processes(self) -> list[Proc]:
        return [r.proc for r in self.peers] + ([self.proxy] if self.proxy else [])

    def save(self) -> None:
        path = Path(self.run_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)  # readers never see a half-written file

    @classmethod
    def load(cls, run_dir: Path) -> RunState | None:
        """The recorded run in `run_dir`, or None if there never was one."""
        path = run_dir / STATE_FILE
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
            raw["peers"] = [
                PeerRecord(
                    **{
                        **p,
                        "proc": Proc(**p["proc"]),
                        "layers": tuple(p["layers"]) if p.get("layers") else None,
                    }
                )
                for p in raw["peers"]
            ]
            raw["proxy"] = Proc(**raw["proxy"]) if raw["proxy"] else None
            return cls(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise TestnetError(
                f"{path} is unreadable ({exc}); stop any peerd processes it started by "
                f"hand, then delete it"
            ) from None


def port_layout(n: int, base_port: int, with_proxy: bool) -> list[tuple[int, int, int]]:
    """(api, listen, announce) ports of peers 0..n-1."""
    if not 1 <= n <= MAX_PEERS:
        raise TestnetError(f"--peers must be between 1 and {MAX_PEERS}, got {n}")
    top = base_port + (PROXY_OFFSET if with_proxy else LISTEN_OFFSET) + n - 1
    if base_port < 1024 or top > 65535:
        raise TestnetError(
            f"base port {base_port} puts ports outside 1024..65535 (highest would be {top}); "
            "pick another --base-port"
        )
    return [
        (
            base_port + i,
            base_port + LISTEN_OFFSET + i,
            base_port + (PROXY_OFFSET if with_proxy else LISTEN_OFFSET) + i,
        )
        for i in range(n)
    ]


def check_ports_free(ports: dict[int, str]) -> None:
    """Raise naming every port (and its role) that something else already holds."""
    taken = [f"{port} ({role})" for port, role in sorted(ports.items()) if not _bindable(port)]
    if taken:
        raise TestnetError(
            f"port(s) already in use on 127.0.0.1: {', '.join(taken)}. Stop what holds "
            "them, or pick another --base-port"
        )


def _bindable(port: int) -> bool:
    # SO_REUSEADDR as the daemon's servers set it, so TIME_WAIT leftovers of an
    # earlier run do not count as taken.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def free_base_port(n: int, lo: int = 20000, hi: int = 30000) -> int:
    """A base port in lo..hi whose API, libp2p and proxy ports for `n` peers are all
    free (for tests and benchmarks that must not clash with a running testnet)."""
    for _ in range(50):
        base = random.randrange(lo, hi - PROXY_OFFSET - n, 10)
        ports = [p for layout in port_layout(n, base, True) for p in layout]
        try:
            check_ports_free({p: "probe" for p in ports})
        except TestnetError:
            continue
        return base
    raise TestnetError(f"no free port range found in {lo}..{hi}")
