"""`peerd tools` against one real daemon (a subprocess) offering the built-ins, read_file
inside a directory: the listing and a call in tables and `--json`, and what a user
gets wrong as one line. The tools between peers are tests/test_tools_swarm.py."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    daemon_logs_on_failure,
    metric_value,
    run_cli,
    running,
    start_daemon,
)
from test_cli_rl import one_line_error

WIDE = {"COLUMNS": "250"}


@pytest.mark.slow
def test_tools_list_and_call_with_json_and_errors_in_words(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "note.txt").write_text("hello tools")
    (tmp_path / "secret.txt").write_text("no")
    peer = start_daemon(tmp_path / "peer", "--name", "toolsmith", "--tools-dir", str(files),
                        "--memory-embedder", "hashing")
    at = ["--data-dir", str(peer.data_dir)]
    with running(peer):
        rows = json.loads(run_cli("tools", "--json", *at).stdout)
        assert sorted(r["tool"] for r in rows) == ["calculator", "memory_search", "read_file"]
        assert all(r["self"] and r["peer_name"] == "toolsmith" for r in rows)
        table = run_cli("tools", *at, env=WIDE)
        assert table.returncode == 0 and "read_file" in table.stdout, table.stderr
        full = json.loads(run_cli("tools", "--peer", "toolsmith", "--json", *at).stdout)
        assert {t["name"] for t in full["tools"]} == {"calculator", "memory_search",
                                                      "read_file"}
        got = json.loads(run_cli("tools", "call", "calculator", "--args",
                                 '{"expression": "6 * 7"}', "--json", *at).stdout)
        assert got["ok"] and got["result"] == {"value": "42"}
        read = run_cli("tools", "call", "read_file", "--args", '{"path": "note.txt"}', *at)
        assert read.returncode == 0 and "hello tools" in read.stdout, read.stderr
        for args, code, words in [
                (["read_file", "--args", '{"path": "../secret.txt"}'], 1, "climbs out"),
                (["calculator", "--args", '{"expression": 7}'], 1, "invalid_arguments"),
                (["shell", "--args", "{}"], 1, "no live peer offers"),
                (["calculator", "--args", "not json"], 2, "--args is not JSON"),
                (["calculator", "--args", "[1]"], 2, "JSON object")]:
            line = one_line_error(run_cli("tools", "call", *args, *at), code)
            assert words in line, line
        assert run_cli("status", *at).returncode == 0  # still serving
        text = httpx.get(f"{peer.url}/metrics", timeout=5.0,
                         headers={"Authorization": f"Bearer {peer.token}"}).text
        assert metric_value(text, "peerd_tool_calls_total", tool="read_file",
                            outcome="tool_error") == 1.0
