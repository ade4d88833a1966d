"""`peerd memory` against a real daemon, as subprocesses: every command prints a table or
`--json`, and what a user can get wrong is one line. The daemon has no model, so
nothing can be replayed: an offered item is refused in words, and learning needs a
model. Admission by replay on a real model is tests/test_memory_service.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    Daemon,
    daemon_logs_on_failure,
    free_port,
    run_cli,
    running,
    start_daemon,
)
from test_cli_rl import one_line_error

WIDE = {"COLUMNS": "250"}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("cli-memory") / "peer", "--name", "mem",
                     "--memory-embedder", "hashing")
    with running(d):
        yield d


def at(d: Daemon) -> list[str]:
    return ["--data-dir", str(d.data_dir)]


def test_an_empty_memory_in_tables_and_json(peer: Daemon) -> None:
    stats = run_cli("memory", "stats", *at(peer), env=WIDE)
    assert stats.returncode == 0, stats.stderr
    assert "0 items" in stats.stdout
    as_json = json.loads(run_cli("memory", "stats", "--json", *at(peer)).stdout)
    assert as_json["items"] == 0 and as_json["settings"]["top_k"] == 3
    found = run_cli("memory", "search", "What is 2 + 3?", *at(peer), env=WIDE)
    assert found.returncode == 0 and "nothing in the memory" in found.stdout
    assert json.loads(run_cli("memory", "search", "x", "--json", *at(peer)).stdout) == []
    assert run_cli("memory", "export", *at(peer)).stdout == ""


def test_an_item_with_nothing_to_replay_on_is_refused_in_words(peer: Daemon) -> None:
    got = run_cli("memory", "add", "Carry the one.", "--domain", "arithmetic",
                  "--kind", "rule", *at(peer), env=WIDE)
    assert got.returncode == 0, got.stderr
    assert "refused" in got.stdout and "no_tasks" in got.stdout
    as_json = json.loads(run_cli("memory", "add", "Add the tens first.", "--domain",
                                 "arithmetic", "--json", *at(peer)).stdout)
    assert (as_json["state"], as_json["reason"]) == ("refused", "no_tasks")
    log = json.loads(run_cli("memory", "log", "--json", *at(peer)).stdout)
    assert [row["reason"] for row in log][:2] == ["no_tasks", "no_tasks"]
    table = run_cli("memory", "log", *at(peer), env=WIDE)
    assert "refused" in table.stdout and "no_tasks" in table.stdout


def test_import_reports_bad_lines_and_keeps_serving(peer: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "mem.jsonl"
    f.write_text('not json\n{"body": "!!", "sig": ""}\n')
    got = json.loads(run_cli("memory", "import", str(f), "--json", *at(peer)).stdout)
    assert got["bad"] == 2 and [b["line"] for b in got["bad_lines"]] == [1, 2]
    assert run_cli("memory", "stats", *at(peer)).returncode == 0


@pytest.mark.parametrize(("command", "words"), [
    (["show", "nothex"], "64 hex"),
    (["show", "0" * 64], "404"),
    (["delete", "0" * 64], "404"),
    (["add", "x", "--domain", "Not A Domain"], "domain"),
    (["learn", "--task", "add", "-n", "2"], "no model"),
], ids=["show-bad-id", "show-unknown", "delete-unknown", "bad-domain", "learn-no-model"])
def test_what_a_user_gets_wrong_is_one_line(peer: Daemon, command: list[str],
                                            words: str) -> None:
    line = one_line_error(run_cli("memory", *command, *at(peer)), 1)
    assert words in line, line


def test_a_bad_flag_is_refused_before_any_daemon_is_asked(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(run_cli("memory", "add", "x", "--kind", "gossip", "--data-dir",
                                  str(tmp_path), "--api", api), 2)
    assert "gossip" in line and "no peerd daemon" not in line
    line = one_line_error(run_cli("memory", "stats", "--data-dir", str(tmp_path),
                                  "--api", api), 1)
    assert "`peerd start`" in line


def test_a_scored_tasks_flags_reach_the_api_and_its_errors_are_one_line(peer: Daemon
                                                                      ) -> None:
    bad = run_cli("task", "What is 1 + 1?", "--reference", "two", *at(peer))
    assert "'reference' holds no number" in one_line_error(bad, 1)
    bad = run_cli("task", "What is 1 + 1?", "--reference", "2", "--domain", "A B",
                  *at(peer))
    assert "'domain' must be a domain name" in one_line_error(bad, 1)
    bad = run_cli("task", "What is 1 + 1?", "--scorer", "exact", *at(peer))
    assert "'scorer' is for a task with a 'reference'" in one_line_error(bad, 1)
