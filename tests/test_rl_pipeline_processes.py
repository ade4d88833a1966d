"""A pipeline sampler on real processes: a tiny random Llama split over two `peerd start
--layers A:B --rollout` daemons (the entry holds layer 0 and samples; the other is a
rollout shard), and a trainer daemon without a model running sync GRPO through the
real CLI. Every rollout the trainer trained came through the pipeline and passed its
log-prob check; both daemons end holding the run's last version, and at the one before
(a pipeline applies a version between generations: no generation asked for the last).

Slow: three daemons on a shared 2-core machine. The timeouts catch hangs; they time
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    Daemon,
    daemon_logs_on_failure,
    run_cli,
    running,
    start_daemon,
    wait_for,
)
from models import tiny_llama_dir
from rl_swarm import seven_task

STEPS = 3
RUN = "pipe"
TIMEOUT_S = 180.0


def rollout(d: Daemon) -> dict[str, Any]:
    got: dict[str, Any] = d.get("/status").get("rollout", {})
    return got


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT_S)
def test_sync_grpo_through_a_two_process_pipeline_sampler(tmp_path: Path) -> None:
    tiny = tiny_llama_dir(tmp_path)
    task = seven_task(tmp_path)
    model = ["--model", str(tiny), "--rollout", "--torch-threads", "1", "--dtype", "float32"]
    trainer = start_daemon(tmp_path / "trainer", "--name", "trainer")
    with running(trainer):
        shard = start_daemon(tmp_path / "shard", "--name", "shard", "--bootstrap",
                             trainer.p2p_addr, *model, "--layers", "2:4")
        with running(shard):
            entry = start_daemon(tmp_path / "entry", "--name", "entry", "--bootstrap",
                                 trainer.p2p_addr, "--bootstrap", shard.p2p_addr, *model,
                                 "--layers", "0:2")
            with running(entry):
                wait_for(lambda: "version" in rollout(entry) and "shard" in rollout(shard),
                         TIMEOUT_S, "the pipeline sampler and its shard to start",
                         (trainer, shard, entry))
                wait_for(lambda: {entry.peer_id, shard.peer_id} <= trainer.ledger_ids()
                         and shard.peer_id in entry.ledger_ids(), 30.0,
                         "every peer in the ledgers", (trainer, shard, entry))
                result = run_cli("rl", "train", "--model", str(tiny), "--task", str(task),
                                 "--mode", "sync", "--samplers", "1", "--group", "4",
                                 "--batch", "2", "--steps", str(STEPS), "--max-tokens", "3",
                                 "--lr", "0.02", "--seed", "1", "--run-id", RUN, "--json",
                                 "--data-dir", str(trainer.data_dir), timeout_s=TIMEOUT_S)
                assert result.returncode == 0, (result.stdout[-3000:], result.stderr)
                run = json.loads(result.stdout)
                assert run["state"] == "done" and run["step"] == STEPS, run
                assert run["staleness"] == {"0": STEPS * 2 * 4}, run
                assert run["samplers"] == [entry.peer_id] and not run["dropped"], run
                wait_for(lambda: all(f"{RUN}@{STEPS} (part)" in
                                     d.get("/status")["weights"]["held"]
                                     for d in (entry, shard)), 30.0,
                         "the pipeline to fetch the last version", (shard, entry))
                assert rollout(entry)["version"] == STEPS - 1
                assert rollout(shard)["shard"]["version"] == STEPS - 1
                assert rollout(entry)["pipeline"]["generations"] >= STEPS
                assert rollout(shard)["shard"]["admitted"] > 0
                assert rollout(shard)["shard"]["following"] == RUN
