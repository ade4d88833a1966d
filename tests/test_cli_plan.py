"""`peerd plan` against one real daemon (a subprocess) serving a tiny random model.
Under the tools' grammar (the daemon's default) even the random model's step parses and
the plan answers, exit 0, `--json` printing its record; `--unconstrained` it writes
garbage, so the plan fails out of budget with exit 1, `--follow` showing its steps and
their parse failures live; `plan list` and `plan show` read both back. A plan with a
reference is scored and kept by the daemon's memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    daemon_logs_on_failure,
    run_cli,
    running,
    start_daemon,
    wait_for,
)
from models import tiny_llama_dir
from test_plans_model import long_context

WIDE = {"COLUMNS": "250"}


@pytest.mark.slow
def test_plan_follow_json_show_and_list(tmp_path: Path,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    model = long_context(tiny_llama_dir(tmp_path_factory), tmp_path)
    peer = start_daemon(tmp_path / "peer", "--name", "planner", "--model", str(model),
                        "--torch-threads", "1", "--tools", "calculator")
    at = ["--data-dir", str(peer.data_dir)]
    with running(peer):
        wait_for(lambda: peer.get("/status")["model"]["state"] == "ready", 60.0,
                 "the model to load", (peer,))
        done = run_cli("plan", "add 2 and 3", "--steps", "2", "--tokens", "200", "--json",
                       "--memory", "--reference", "5", *at, timeout_s=120.0)
        assert done.returncode == 0, (done.stdout, done.stderr)
        record = json.loads(done.stdout)
        assert record["status"] == "answered" and record["answer"] is not None
        # scored, and kept by the daemon's memory as an SCEC in the plans domain
        assert record["score"] in (0.0, 1.0) and record["domain"] == "plans"
        assert isinstance(record["scec"], str) and len(record["scec"]) == 64
        bad = run_cli("plan", "x", "--scorer", "exact", *at)
        assert bad.returncode == 1 and "'scorer'" in bad.stderr, bad.stderr
        assert record["steps"] and record["used"]["steps"] >= 1
        assert peer.metric("peerd_plan_steps_total", constrained="yes", parse="ok") >= 1
        follow = run_cli("plan", "--steps", "1", "--tokens", "20", "add 1 and 1",
                         "--unconstrained", "--follow", *at, env=WIDE, timeout_s=120.0)
        assert follow.returncode == 1
        out = follow.stdout
        assert "step 1" in out and "replan" in out and "failed: budget_" in out, out
        listed = json.loads(run_cli("plan", "list", "--json", *at).stdout)
        assert [p["status"] for p in listed] == ["failed", "answered"]
        shown = run_cli("plan", "show", record["id"], *at, env=WIDE)
        assert shown.returncode == 0 and "add 2 and 3" in shown.stdout
        assert f"score {record['score']:g} against '5'" in shown.stdout, shown.stdout
        missing = run_cli("plan", "show", "nope", *at)
        assert missing.returncode == 1 and "no such plan" in missing.stderr
