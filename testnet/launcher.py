"""Start, inspect, crash and stop a local testnet of real `peerd` processes.

Why real OS processes: the testnet must exercise what users run — the CLI, the
HTTP API, libp2p over TCP, shutdown on signals — not an in-process imitation.

Each function here is what one CLI command does, importable so tests and benchmark
scripts drive the same code. `up` creates every identity first (offline, in this
process) so the full bootstrap graph is known, then starts all peers at once and
waits until each answers `GET /health`. If one dies or stays silent, everything
started is stopped again and the error carries the tail of that peer's log.

With a model (`up(..., model="smollm2")`) each peer serves one stage of its layers
(`testnet.plan`), and `up` returns only once every peer has loaded its stage and
every peer's ledger lists every stage: from then on any peer can be the entry of a
request that crosses the whole pipeline.

Data: `down` keeps `RUN_DIR/peers/*` (logs, ledgers) for post-mortems and marks the
run as down; the next `up` in that run dir wipes `RUN_DIR/peers/` and starts from
fresh identities, so runs never inherit each other's ledgers.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from peerd.identity import (
    IdentityError,
    load_or_create_key,
    load_or_create_token,
    peer_id_of,
    read_token,
)
from testnet import procs, serving
from testnet.peer_api import api_get, api_request, http_client, map_peers
from testnet.plan import ModelPlan, plan_model, rollout_stages
from testnet.procs import Proc
from testnet.state import (
    DEFAULT_BASE_PORT,
    PEERS_DIR,
    PROXY_LOG,
    STATE_FILE,
    PeerRecord,
    RunState,
    TestnetError,
    check_ports_free,
    default_run_dir,
    port_layout,
)

__all__ = [
    "DEFAULT_BASE_PORT", "MODEL_TIMEOUT_S", "PeerInfo", "api_get", "api_request", "down", "kill",
    "map_peers", "status", "up",
]  # fmt: skip

STOP_GRACE_S = 5.0
PROXY_START_TIMEOUT_S = 15.0
MODEL_TIMEOUT_S = 240.0  # loading takes 5-15 s a peer, far more when many share 2 cores


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One peer as `status` sees it now."""

    name: str
    peer_id: str
    pid: int
    alive: bool
    api: str  # base URL of the HTTP API
    token: str  # bearer token for everything but /health
    data_dir: str
    listen: str  # multiaddr the daemon listens on
    announce: str  # multiaddr the others dial (the proxy's, with latency)
    rtt_ms: dict[str, float]  # other peer name -> round trip measured by this peer
    connected: list[str]  # names (or ids, if not in this testnet) of connected peers
    error: str | None = None  # why /peers could not be read, if it could not
    layers: list[int] | None = None  # [start, end) of the decoder layers served; no model: None
    # The model slot's state from GET /status: "loading", "ready", "failed" ("none"
    # without a model); None if the peer is down or did not answer.
    model_state: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def up(
    n: int,
    run_dir: Path | None = None,
    base_port: int = DEFAULT_BASE_PORT,
    latency_ms: float = 0.0,
    *,
    heartbeat_s: float | None = None,
    log_level: str = "info",
    start_timeout_s: float = 60.0,
    settle_s: float = 10.0,
    model: str | None = None,
    stages: int | None = None,
    torch_threads: int | None = None,
    dtype: str = "auto",
    model_timeout_s: float = MODEL_TIMEOUT_S,
    peer_args: Sequence[str] = (),
    each_peer_args: Sequence[Sequence[str]] = (),
) -> list[PeerInfo]:
    """Start `n` peers (through a latency proxy if `latency_ms` > 0); return their status.

    Returns once every peer answers /health and, for at most `settle_s`, each has
    measured the RTT to min(n-1, 2) others. Raises `TestnetError` (after stopping
    whatever it started) if the run dir is in use, a port is taken, or a peer dies
    or does not come up within `start_timeout_s`.

    With `model`, peer i serves stage i mod `stages` (default n) of the model's layers,
    computing in `dtype` with `torch_threads` torch threads (default cores // n), and
    `up` also waits, up to `model_timeout_s`, until every peer's model is ready and every
    peer's ledger lists every peer's stage; a peer whose model fails to load fails `up`
    with its log tail.

    `peer_args` are appended to every peer's `peerd start` command line (any flag of
    `peerd start`), so a new flag can be tried on a local swarm. With `--rollout` among
    them every peer takes part in RL sampling: with one stage (the default then) each is
    a sampler holding the whole model; with more, pipeline samplers (the peers holding
    layer 0 sample through the others).

    `each_peer_args[i]` is appended to peer i's command line alone (after `peer_args`):
    peers that differ, e.g. one serving a model (`--model M`, waited for by the caller)
    and each offering its own `--mcp` servers.
    """
    if model is None and (stages is not None or torch_threads is not None or dtype != "auto"):
        raise TestnetError("--stages, --torch-threads and --dtype only apply with --model SPEC")
    if "--rollout" in peer_args:
        stages = rollout_stages(model, stages)
    run_dir = (run_dir or default_run_dir()).resolve()
    _refuse_if_running(run_dir)
    layout = port_layout(n, base_port, latency_ms > 0)
    roles: dict[int, str] = {}
    for i, (api, listen, announce) in enumerate(layout):
        roles |= {api: f"peer{i} API", listen: f"peer{i} libp2p"}
        if latency_ms > 0:
            roles[announce] = f"peer{i} proxy"
    check_ports_free(roles)
    plan = plan_model(model, n, stages, torch_threads, dtype) if model is not None else None

    peers_dir = run_dir / PEERS_DIR
    if peers_dir.exists() and not (run_dir / STATE_FILE).exists():
        raise TestnetError(
            f"{peers_dir} exists but {run_dir} holds no testnet; not wiping it. "
            "Pick an empty or new --run-dir"
        )
    shutil.rmtree(peers_dir, ignore_errors=True)
    records = []
    for i, (api, listen, announce) in enumerate(layout):
        data_dir = peers_dir / f"peer{i}"
        try:
            peer_id = peer_id_of(load_or_create_key(data_dir)).to_base58()
            load_or_create_token(data_dir)
        except IdentityError as exc:
            raise TestnetError(f"cannot create peer{i}'s identity: {exc}") from None
        layers = plan.layers[i] if plan else None
        records.append(
            PeerRecord(f"peer{i}", peer_id, str(data_dir), api, listen, announce,
                       Proc(0, 0.0), layers)
        )  # fmt: skip
    state = RunState(str(run_dir), base_port, latency_ms, heartbeat_s, list(records),
                     model=plan.spec if plan else None,
                     model_id=plan.model_id if plan else None)  # fmt: skip
    try:
        if latency_ms > 0:
            state.proxy = _start_proxy(run_dir, records, latency_ms)
        for i, rec in enumerate(records):  # recorded one by one: `_stop` sees each
            own = each_peer_args[i] if i < len(each_peer_args) else ()
            proc = _spawn_peer(rec, records, i, heartbeat_s, log_level, plan,
                               [*peer_args, *own])
            state.peers[i] = dataclasses.replace(rec, proc=proc)
        state.save()  # from here on `down` can clean up even if we are killed
        _wait_healthy(state, start_timeout_s)
        if plan is not None:
            deadline = time.monotonic() + model_timeout_s
            serving.wait_models_ready(state, plan, deadline, model_timeout_s)
            serving.wait_ledgers_list_models(state, plan, deadline, model_timeout_s)
    except BaseException:
        _stop(state)
        raise
    return _settle(run_dir, n, settle_s)


def status(run_dir: Path | None = None) -> list[PeerInfo]:
    """Every peer of the run: liveness from its pid, RTTs from its `GET /peers`."""
    state = _load(run_dir)
    names = {rec.peer_id: rec.name for rec in state.peers}
    return map_peers(state.peers, lambda rec: _peer_info(rec, names))


def kill(run_dir: Path | None, name: str) -> bool:
    """SIGKILL one peer, as a crash would. False if it was not running."""
    rec = _load(run_dir).peer(name)
    proc = rec.proc.handle()
    if proc is None:
        return False
    proc.send_signal(signal.SIGKILL)
    if procs.wait_gone([rec.proc], STOP_GRACE_S):
        raise TestnetError(f"{name} (pid {rec.proc.pid}) survived SIGKILL; check `ps`")
    return True


def down(run_dir: Path | None = None) -> int:
    """Stop all peers and the proxy (SIGTERM, then SIGKILL); return how many ran."""
    state = _load(run_dir)
    return _stop(state)


def _load(run_dir: Path | None) -> RunState:
    run_dir = (run_dir or default_run_dir()).resolve()
    state = RunState.load(run_dir)
    if state is None:
        raise TestnetError(
            f"no testnet in {run_dir}; start one with `python -m testnet up --peers N`"
        )
    return state


def _refuse_if_running(run_dir: Path) -> None:
    state = RunState.load(run_dir)
    live = [p.pid for p in state.processes() if p.alive] if state else []
    if live:
        raise TestnetError(
            f"a testnet is already running in {run_dir} (pids {live}); stop it with "
            f"`python -m testnet down --run-dir {run_dir}` or use another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def _start_proxy(run_dir: Path, records: list[PeerRecord], latency_ms: float) -> Proc:
    argv = [sys.executable, "-m", "testnet", "proxy", "--latency-ms", str(latency_ms)]
    for rec in records:
        argv += ["--map", f"{rec.announce_port}:{rec.listen_port}"]
    log_path = run_dir / PROXY_LOG
    proc = procs.spawn(argv, log_path)
    deadline = time.monotonic() + 15.0
    pending = [rec.announce_port for rec in records]
    while pending:
        if not proc.alive:
            raise TestnetError(f"the latency proxy exited at start-up:\n{procs.tail(log_path)}")
        if time.monotonic() > deadline:
            raise TestnetError(
                f"the latency proxy did not listen within 15 s:\n{procs.tail(log_path)}"
            )
        pending = [port for port in pending if not procs.accepts(port)]
        time.sleep(0.05)
    return proc


def _spawn_peer(
    rec: PeerRecord,
    records: list[PeerRecord],
    i: int,
    heartbeat_s: float | None,
    log_level: str,
    plan: ModelPlan | None,
    peer_args: Sequence[str] = (),
) -> Proc:
    argv = [
        *_peerd_command(), "start",
        "--data-dir", rec.data_dir,
        "--listen", rec.listen,
        "--announce", rec.announce,
        "--api", f"127.0.0.1:{rec.api_port}",
        "--name", rec.name,
        "--log-level", log_level,
    ]  # fmt: skip
    for j in _bootstrap_indices(i):
        argv += ["--bootstrap", records[j].dial_addr]
    if heartbeat_s is not None:
        argv += ["--heartbeat-s", str(heartbeat_s)]
    if plan is not None and rec.layers is not None:
        start, end = rec.layers
        argv += [
            "--model",
            plan.spec,
            "--layers",
            f"{start}:{end}",
            "--torch-threads",
            str(plan.torch_threads),
            "--dtype",
            plan.dtype,
        ]
    argv += peer_args
    return procs.spawn(argv, rec.log_path)


def _peerd_command() -> list[str]:
    script = Path(sys.executable).parent / "peerd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "peerd.cli"]


def _bootstrap_indices(i: int) -> list[int]:
    """peer0, the previous peer and one more earlier peer: a connected graph whose
    load on peer0 stays bounded because the daemon dials further peers itself."""
    if i == 0:
        return []
    return sorted({0, i - 1, random.Random(i).randrange(i)})


def _wait_healthy(state: RunState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(state.peers)
    while pending:
        serving.raise_if_exited(pending, "during start-up")
        if state.proxy and not state.proxy.alive:
            log_path = Path(state.run_dir) / PROXY_LOG
            raise TestnetError(f"the latency proxy died:\n{procs.tail(log_path)}")
        answered = map_peers(pending, _healthy)
        pending = [rec for rec, ok in zip(pending, answered, strict=True) if not ok]
        if pending and time.monotonic() > deadline:
            slow = pending[0]
            raise TestnetError(
                f"{', '.join(r.name for r in pending)} did not answer GET /health within "
                f"{timeout_s:.0f} s; last lines of {slow.log_path}:\n{procs.tail(slow.log_path)}"
            )
        time.sleep(0.2)


def _healthy(rec: PeerRecord) -> bool:
    try:
        reply = http_client().get(rec.api + "/health", timeout=2.0)
    except httpx.TransportError:
        return False
    try:
        answered = reply.json().get("peer_id") if reply.status_code == 200 else None
    except ValueError:  # not JSON: not (yet) our daemon
        return False
    if answered is None:
        return False
    if answered != rec.peer_id:
        raise TestnetError(
            f"{rec.api} answers as peer {answered}, not {rec.name} ({rec.peer_id}): another "
            "daemon holds that port; stop it or pick another --base-port"
        )
    return True


def _settle(run_dir: Path, n: int, settle_s: float) -> list[PeerInfo]:
    """Give peers up to `settle_s` to connect and measure RTTs; the last status."""
    want = min(n - 1, 2)
    deadline = time.monotonic() + settle_s
    while True:
        infos = status(run_dir)
        if all(len(p.rtt_ms) >= want for p in infos) or time.monotonic() > deadline:
            return infos
        time.sleep(0.5)


def _peer_info(rec: PeerRecord, names: dict[str, str]) -> PeerInfo:
    info = PeerInfo(
        name=rec.name,
        peer_id=rec.peer_id,
        pid=rec.proc.pid,
        alive=rec.proc.alive,
        api=rec.api,
        token=read_token(Path(rec.data_dir)) or "",
        data_dir=rec.data_dir,
        listen=rec.listen,
        announce=rec.announce,
        rtt_ms={},
        connected=[],
        layers=list(rec.layers) if rec.layers else None,
    )
    if not info.alive:
        return info
    if rec.layers is None:
        info = dataclasses.replace(info, model_state="none")
    else:
        model = serving.model_status(rec)
        info = dataclasses.replace(
            info, model_state=model.get("state"), layers=model.get("layers") or info.layers
        )
    try:
        peers: list[dict[str, Any]] = api_get(info, "/peers", timeout_s=3.0)
    except (httpx.HTTPError, ValueError) as exc:
        return dataclasses.replace(info, error=f"GET /peers failed: {exc!r}")
    rtt = {}
    connected = []
    for peer in peers:
        other = names.get(peer["peer_id"], peer["peer_id"])
        connected.append(other)
        if peer.get("rtt_ms") is not None:
            rtt[other] = float(peer["rtt_ms"])
    return dataclasses.replace(info, rtt_ms=rtt, connected=sorted(connected))


def _stop(state: RunState) -> int:
    """Stop everything the run recorded and mark it down; how many were running."""
    stopped, survivors = procs.stop(state.processes(), STOP_GRACE_S)
    state.up = False
    state.save()
    if survivors:
        raise TestnetError(f"processes {[p.pid for p in survivors]} survived SIGKILL")
    return stopped
