"""A memory whose store takes no writes (a full disk, a read-only file, an I/O error; here
SQLite's `query_only`): what fails is the write, never the peer. The admission desk
refuses the candidate (reason "error") and answers whoever waits on it; an RL run that
hands the memory its SCECs counts them failed and trains on to the end."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from peerd.memory.service import Memory
from tests.models import tiny_llama_dir
from tests.rl_swarm import rl_swarm, seven_task
from tests.test_memory_service import peer, planted
from tests.test_rl_train import finished, spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


def query_only(memory: Memory, on: bool) -> None:
    """The memory's SQLite connection refuses every write, or takes them again."""
    items = memory.live_store().store
    with items._lock:
        items._db.execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")


async def test_a_candidate_the_store_cannot_keep_is_refused_and_the_desk_goes_on(
        tmp_path: Path, tiny: Path) -> None:
    """Its item's write fails, then so does the refusal's line in the log: the waiting
    caller is answered all the same, the peer serves on, and once the store takes writes
    again the same candidate is judged as ever."""
    async with peer(tmp_path, tiny) as (api, memory):
        candidate, runs = await planted(memory, "chat", helps=True)
        query_only(memory, True)
        with trio.fail_after(60):
            r = await api.post("/v1/memory", json={"text": candidate, "domain": "chat",
                                                   "origin": runs[0], "wait": True})
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["state"], got["reason"], got["item_id"]) == ("refused", "error", None)
        assert (await api.get("/status")).status_code == 200
        query_only(memory, False)
        with trio.fail_after(60):
            r = await api.post("/v1/memory", json={"text": candidate, "domain": "chat",
                                                   "origin": runs[0], "wait": True})
        again = r.json()
        assert again["state"] == "admitted", again
        log = (await api.get("/v1/memory/log")).json()
        assert [row["action"] for row in log] == ["admitted"]  # the refusal's line is lost


async def test_an_rl_run_whose_memory_keeps_no_scec_trains_to_the_end(
        tmp_path: Path, tiny: Path) -> None:
    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, _):
        memory = Memory(training.node, None, tmp_path / "mem", embedder="hashing")
        await training.node.start(memory)
        training.scored = memory
        query_only(memory, True)
        run = await finished(training, spec(tiny, seven_task(tmp_path), run_id="unkept",
                                            group=2, batch=2, steps=2, memory_scecs=4))
        assert run.to_json()["memory_scecs"] == {"kept": 0, "failed": 4}
        assert (await memory.live_store().runs_by_domain()) == {}
