"""`peerd start --mcp "CMD ARGS"` in a real daemon (a subprocess): the external server's
tools are offered and called through the API, /mcp refuses a missing token, and SIGTERM
stops the daemon within its promise and the server process with it. Between in-process
peers: tests/test_mcp.py."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    daemon_logs_on_failure,
    running,
    start_daemon,
    wait_for,
)

ARITH = Path(__file__).parent / "mcp_servers" / "arith.py"


def server_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_start_with_mcp_offers_the_servers_tools_and_stops_it(tmp_path: Path) -> None:
    marker = f"--name arith{os.getpid()}"  # this test's server, not another's
    d = start_daemon(tmp_path / "d", "--mcp", f"{sys.executable} {ARITH} {marker}",
                     "--mcp-capacity", "2", "--memory-embedder", "hashing")
    with running(d):
        wait_for(lambda: "add" in {r["tool"] for r in d.get("/v1/tools")}, 30.0,
                 "the external tools offered", (d,))
        rows = {r["tool"]: r for r in d.get("/v1/tools")}
        assert rows["add"]["capacity"] == 2 and "broken" not in rows
        got = d.request("POST", "/v1/tools/call", json={"tool": "add",
                                                        "arguments": {"a": 1, "b": 2}})
        assert got.json()["result"] == {"result": 3}, got.text
        assert d.get("/status")["mcp_servers"]["mcp0"]["state"] == "up"
        assert d.request("POST", "/mcp", token=None, json={}).status_code == 401
        assert len(server_pids(marker)) == 1
        d.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert d.proc.wait(timeout=10.0) == 0, d.describe()
        assert time.monotonic() - t0 < 2.0, d.describe()  # the daemon's promise
    wait_for(lambda: not server_pids(marker), 5.0, "the MCP server process to exit")
    assert "MCP server mcp0 stderr:" in d.log()
