"""Echo on real processes: `python -m testnet up --model M --rollout` starts three
sampler peers, a peer started without a model trains through `peerd rl train`, and a
tiny random Llama learns the trivially learnable "7" task (tests/test_rl_train.py)
in async mode, over libp2p between OS processes, driven by the real CLI.

Then the run is resumed for a few more steps and a sampler peer is SIGKILLed part way:
the run finishes on the other two. (A resume, not a fresh run: a sampler serves the
run it follows until that run has been quiet for sampler.RUN_IDLE_S, 30 s.)

Slow: four daemons on a shared 2-core machine. The timeouts catch hangs; they time
nothing. The fast test beside it: `up --rollout` gives every peer the whole model,
and refuses what cannot be, before any process starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    CLEAN_ENV,
    Daemon,
    daemon_logs_on_failure,
    peerd_command,
    run_cli,
    running,
    start_daemon,
    wait_for,
)
from models import tiny_llama_dir
from rl_swarm import seven_task

from testnet import TestnetError, api_request, down, status, up
from testnet.plan import rollout_stages
from testnet.state import free_base_port

STEPS = 10  # the first run (lr 0.02 learns in about 6, and may collapse past 12)
MORE = 4  # the resumed run's extra steps, a sampler killed after the first of them
STALENESS = 1
RUN = "echo"
TESTNET_TIMEOUT_S = 180.0  # three model peers loading on two shared cores
RUN_TIMEOUT_S = 180.0


def run_testnet(*args: str, timeout_s: float = TESTNET_TIMEOUT_S) -> str:
    result = subprocess.run([sys.executable, "-m", "testnet", *args], capture_output=True,
                            text=True, timeout=timeout_s, env=CLEAN_ENV,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def train_args(tiny: Path, task: Path, trainer: Daemon, steps: int) -> list[str]:
    return ["rl", "train", "--model", str(tiny), "--task", str(task), "--mode", "async",
            "--staleness", str(STALENESS), "--samplers", "3", "--group", "8", "--batch", "4",
            "--steps", str(steps), "--max-tokens", "3", "--lr", "0.02", "--seed", "1",
            "--run-id", RUN, "--json", "--data-dir", str(trainer.data_dir)]


def finished(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, (result.returncode, result.stdout[-3000:], result.stderr)
    run: dict[str, Any] = json.loads(result.stdout)
    return run


def sampler_status(run_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> the rollout part of each live peer's /status."""
    return {p.name: api_request(p, "GET", "/status")["rollout"]
            for p in status(run_dir) if p.alive}


def test_rollout_peers_hold_the_whole_model_unless_staged(tmp_path: Path) -> None:
    tiny = tiny_llama_dir(tmp_path)
    with pytest.raises(TestnetError, match="--rollout needs --model"):
        up(2, tmp_path / "a", free_base_port(2), peer_args=["--rollout"])
    assert not (tmp_path / "a" / "peers").exists()
    assert rollout_stages(str(tiny), None) == rollout_stages(str(tiny), 1) == 1
    assert rollout_stages(str(tiny), 2) == 2  # pipeline samplers


@pytest.mark.slow
@pytest.mark.timeout(TESTNET_TIMEOUT_S + 2 * RUN_TIMEOUT_S)
def test_async_grpo_on_a_testnet_learns_and_survives_a_killed_sampler(tmp_path: Path
                                                                       ) -> None:
    tiny = tiny_llama_dir(tmp_path)
    task = seven_task(tmp_path)
    run_dir = tmp_path / "testnet"
    t0 = time.monotonic()
    try:
        run_testnet("up", "--peers", "3", "--model", str(tiny), "--rollout",
                    "--run-dir", str(run_dir), "--base-port", str(free_base_port(3)), "--json")
        print(f"testnet up after {time.monotonic() - t0:.0f} s")
        peers = status(run_dir)
        assert all(p.alive and p.model_state == "ready" for p in peers), peers
        wait_for(lambda: all("version" in s for s in sampler_status(run_dir).values()),
                 60.0, "every peer's rollout sampler to start")
        entry = f"{peers[0].announce}/p2p/{peers[0].peer_id}"
        with running(start_daemon(tmp_path / "trainer", "--name", "trainer",
                                  "--bootstrap", entry)) as (trainer,):
            print(f"trainer up after {time.monotonic() - t0:.0f} s")
            # ---- a run through the CLI: it learns, on every sampler, within the bound
            run = finished(run_cli(*train_args(tiny, task, trainer, STEPS),
                                   timeout_s=RUN_TIMEOUT_S))
            rewards = [json.loads(line)["reward"]
                       for line in Path(run["metrics"]).read_text().splitlines()]
            print("rewards", rewards, "staleness", run["staleness"])
            assert run["state"] == "done" and run["step"] == STEPS, run
            assert len(rewards) == STEPS
            half = STEPS // 2
            assert sum(rewards[half:]) / half > sum(rewards[:half]) / half + 0.1, rewards
            assert {int(k) for k in run["staleness"]} <= set(range(STALENESS + 1)), run
            assert sum(run["staleness"].values()) == STEPS * 4 * 8  # every rollout trained
            served = {name: s["requests_served"] for name, s in sampler_status(run_dir).items()}
            assert sum(n > 0 for n in served.values()) >= 2, served
            assert len(run["samplers"]) == 3 and not run["dropped"], run
            assert Path(run["plot"]).stat().st_size > 0

            listed = run_cli("rl", "status", "--json", "--data-dir", str(trainer.data_dir))
            assert listed.returncode == 0, listed.stderr
            assert [(r["id"], r["state"], r["step"]) for r in json.loads(listed.stdout)] == [
                (RUN, "done", STEPS)]

            # ---- resumed for MORE steps; a sampler dies once the first of them is done
            more = subprocess.Popen(
                peerd_command(*train_args(tiny, task, trainer, STEPS + MORE), "--resume"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLEAN_ENV,
                stdin=subprocess.DEVNULL)
            try:
                def step() -> int:
                    got = trainer.request("GET", f"/v1/rl/runs/{RUN}")
                    return int(got.json()["step"]) if got.status_code == 200 else 0

                wait_for(lambda: step() > STEPS or more.poll() is not None, RUN_TIMEOUT_S,
                         "the resumed run's first step")
                if more.poll() is not None:
                    out, err = more.communicate()
                    raise AssertionError(f"the resumed run ended before the kill: "
                                         f"{out[-2000:]} {err[-2000:]}")
                assert "killed peer2" in run_testnet("kill", "peer2", "--run-dir", str(run_dir))
                out, err = more.communicate(timeout=RUN_TIMEOUT_S)
            finally:
                if more.poll() is None:
                    more.kill()
                    more.communicate()
            resumed = finished(subprocess.CompletedProcess(more.args, more.returncode,
                                                           out, err))
            print("after the kill", {k: resumed[k] for k in ("step", "version", "staleness",
                                                             "dropped", "refused")})
            assert resumed["state"] == "done" and resumed["step"] == STEPS + MORE, resumed
            assert resumed["version"] > run["version"]
            assert {int(k) for k in resumed["staleness"]} <= set(range(STALENESS + 1))
            assert not {p.name: p for p in status(run_dir)}["peer2"].alive
            after = sampler_status(run_dir)
            assert sorted(after) == ["peer0", "peer1"]
            assert any(s["requests_served"] > served[name] for name, s in after.items()), (
                served, after)
    finally:
        down(run_dir)
