"""`peerd rl`, run as subprocesses: what a user can get wrong, each one line.

Bad flags are refused before anything is asked of a daemon (exit 2); no daemon is one
line saying how to start one (exit 1); a daemon that refuses a run's settings names
the setting (exit 1) and starts nothing. A real daemon without a model (a trainer
peer needs none) lists no runs. Training itself, through this CLI on a testnet of
real processes, is tests/test_rl_testnet.py.
"""

from __future__ import annotations

import json
import subprocess
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

WIDE = {"COLUMNS": "250"}


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The error a failed command printed: one line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("peerd: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A peer without a model: it can train, and has no run yet."""
    d = start_daemon(tmp_path_factory.mktemp("cli-rl") / "trainer", "--name", "trainer")
    with running(d):
        yield d


def at(d: Daemon) -> list[str]:
    return ["--data-dir", str(d.data_dir)]


def runs(d: Daemon) -> list[dict[str, object]]:
    got: list[dict[str, object]] = d.get("/v1/rl/runs")
    return got


# ---- bad flags: refused before any daemon is asked ---------------------------------------


@pytest.mark.parametrize(("flags", "named"), [
    (["--samplers", "x"], "--samplers"),
    (["--samplers", "-1"], "--samplers"),
    (["--mode", "fast"], "fast"),
    (["--update", "qlora"], "qlora"),
    (["--group", "many"], "--group"),
    (["--bogus"], "--bogus"),
], ids=["samplers-x", "samplers-negative", "mode", "update", "group", "unknown-flag"])
def test_a_bad_flag_is_one_line_and_exit_2(tmp_path: Path, flags: list[str],
                                           named: str) -> None:
    # an API where nothing listens: the flag must be refused before it is tried
    api = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(run_cli("rl", "train", "--model", "m", "--data-dir", str(tmp_path),
                                  "--api", api, *flags), 2)
    assert named in line
    assert "no peerd daemon" not in line


def test_train_without_a_model_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = one_line_error(run_cli("rl", "train", "--data-dir", str(tmp_path)), 2)
    assert "--model" in line


# ---- no daemon ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["train", "--model", "m"], ["status"],
                                     ["status", "some-run"]],
                         ids=["train", "status", "status-run"])
def test_no_daemon_is_one_line_saying_how_to_start_one(tmp_path: Path,
                                                       command: list[str]) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(run_cli("rl", *command, "--data-dir", str(tmp_path), "--api", api),
                          1)
    assert "`peerd start`" in line and api in line


# ---- a daemon with no runs ---------------------------------------------------------------


def test_status_with_no_runs(trainer: Daemon) -> None:
    result = run_cli("rl", "status", *at(trainer), env=WIDE)
    assert result.returncode == 0, result.stderr
    assert "no RL runs on this peer" in result.stdout
    assert "peerd rl train" in result.stdout
    listed = run_cli("rl", "status", "--json", *at(trainer))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


def test_status_of_an_unknown_run_is_one_line(trainer: Daemon) -> None:
    line = one_line_error(run_cli("rl", "status", "no-such-run", *at(trainer)), 1)
    assert "404" in line and "no-such-run" in line


@pytest.mark.parametrize(("flags", "named"), [
    (["--lr", "5"], "lr"),
    (["--group", "1"], "group"),
    (["--staleness", "1000"], "staleness"),
    (["--temperature", "0"], "temperature"),
    (["--run-id", "a/b"], "run_id"),
    (["--memory-scecs", "-1"], "memory_scecs"),
    (["--ranks", "0"], "ranks"),
    (["--ranks", "9"], "ranks"),
], ids=["lr", "group", "staleness", "temperature", "run-id", "memory-scecs", "ranks-0",
        "ranks-9"])
def test_settings_the_daemon_refuses_start_nothing(trainer: Daemon, flags: list[str],
                                                   named: str) -> None:
    line = one_line_error(run_cli("rl", "train", "--model", "m", *at(trainer), *flags), 1)
    assert "400" in line and named in line
    assert runs(trainer) == []


def test_resume_with_nothing_to_resume_starts_nothing(trainer: Daemon,
                                                      tmp_path: Path) -> None:
    line = one_line_error(run_cli("rl", "train", "--model", "smollm2", *at(trainer), "--resume",
                                  "--out", str(tmp_path / "never")), 1)
    assert "409" in line and "nothing to resume" in line
    assert runs(trainer) == []


def test_an_unwritable_run_dir_starts_nothing(trainer: Daemon, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line_error(run_cli("rl", "train", "--model", "smollm2", *at(trainer),
                                  "--out", str(blocker / "run")), 1)
    assert "409" in line and "cannot write the run dir" in line and "--out" in line
    assert runs(trainer) == []
