"""The testnet launcher: its bookkeeping on its own, then real `peerd` processes.

The `slow` tests start real daemons (and, with latency, the proxy process) in a run
dir under tmp_path, on ports drawn at random and checked free, and always call
`down` so that no process outlives the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from testnet import TestnetError, api_get, down, kill, status, up
from testnet import procs as procs_mod
from testnet.cli import main as cli_main
from testnet.procs import Proc
from testnet.state import RunState, check_ports_free, free_base_port, port_layout

STATUS_FIELDS = {"name", "peer_id", "pid", "alive", "api", "token", "data_dir", "listen",
                 "announce", "rtt_ms"}  # fmt: skip




def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.25)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_port_layout() -> None:
    assert port_layout(2, 20000, with_proxy=True) == [(20000, 21000, 22000), (20001, 21001, 22001)]
    assert port_layout(1, 20000, with_proxy=False) == [(20000, 21000, 21000)]
    with pytest.raises(TestnetError, match="--base-port"):
        port_layout(10, 65000, with_proxy=True)
    with pytest.raises(TestnetError, match="--peers"):
        port_layout(0, 20000, with_proxy=False)


def test_taken_port_is_named() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(TestnetError, match=f"{port} \\(peer3 API\\).*--base-port"):
            check_ports_free({port: "peer3 API"})


def test_commands_without_a_testnet_say_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(TestnetError, match="python -m testnet up"):
        status(tmp_path)
    result = CliRunner().invoke(cli_main, ["down", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no testnet in" in result.output


def test_liveness_ignores_zombies_and_reused_pids(tmp_path: Path) -> None:
    assert Proc.of(os.getpid()).alive
    assert not Proc(os.getpid(), 0.0).alive  # same pid, another start time: not ours
    child = procs_mod.spawn([sys.executable, "-c", "pass"], tmp_path / "child.log")
    assert procs_mod.wait_gone([child], 10) == []
    assert gone(child.pid)


def test_up_refuses_a_run_dir_in_use_and_down_tolerates_dead_peers(tmp_path: Path) -> None:
    state = RunState(str(tmp_path), 20000, 0.0, None, peers=[], proxy=Proc.of(os.getpid()))
    state.save()
    with pytest.raises(TestnetError, match=r"already running.*testnet down"):
        up(2, tmp_path, 20000)
    state.proxy = Proc(2**22 + 1, 0.0)  # above pid_max: never a live process
    state.save()
    assert down(tmp_path) == 0
    reloaded = RunState.load(tmp_path)
    assert reloaded is not None and not reloaded.up


def test_up_never_wipes_a_folder_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "peers" / "precious").mkdir(parents=True)
    with pytest.raises(TestnetError, match="holds no testnet"):
        up(1, tmp_path, free_base_port(1))
    assert (tmp_path / "peers" / "precious").is_dir()


@pytest.mark.slow
def test_up_status_kill_down(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    try:
        infos = up(3, run_dir, free_base_port(3))
        assert [p.name for p in infos] == ["peer0", "peer1", "peer2"]
        assert all(p.alive for p in infos)
        assert len({p.peer_id for p in infos}) == 3

        def all_connected() -> bool:
            for peer in infos:
                seen = {p["peer_id"] for p in api_get(peer, "/peers")}
                if not {o.peer_id for o in infos if o is not peer} <= seen:
                    return False
            return True

        wait_for(all_connected, 30, "every peer to list the other two in GET /peers")

        listed = subprocess.run(
            [sys.executable, "-m", "testnet", "status", "--json", "--run-dir", str(run_dir)],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        rows = json.loads(listed.stdout)
        assert isinstance(rows, list) and len(rows) == 3
        assert all(row.keys() >= STATUS_FIELDS and row["alive"] for row in rows)

        with pytest.raises(TestnetError, match="already running"):
            up(3, run_dir, free_base_port(3))

        assert kill(run_dir, "peer1")
        now = {p.name: p for p in status(run_dir)}
        assert not now["peer1"].alive and gone(now["peer1"].pid)
        assert now["peer0"].alive and now["peer2"].alive
        assert not kill(run_dir, "peer1")
        with pytest.raises(TestnetError, match="peer0, peer1, peer2"):
            kill(run_dir, "peer7")
    finally:
        down(run_dir)
    state = RunState.load(run_dir)
    assert state is not None and not state.up
    assert all(gone(proc.pid) for proc in state.processes())


@pytest.mark.slow
def test_latency_proxy_shows_in_measured_rtt(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    try:
        up(2, run_dir, free_base_port(2), latency_ms=25)
        state = RunState.load(run_dir)
        assert state is not None and state.proxy is not None and state.proxy.alive

        def rtt_measured() -> bool:
            return all(p.rtt_ms for p in status(run_dir))

        wait_for(rtt_measured, 30, "both peers to measure an RTT")
        peer0, peer1 = status(run_dir)
        assert peer0.announce != peer0.listen
        assert peer0.rtt_ms["peer1"] >= 50 and peer1.rtt_ms["peer0"] >= 50
    finally:
        down(run_dir)
    assert all(gone(proc.pid) for proc in state.processes())
